#!/bin/bash
# CPU cost of a basic call through softpbx (INVITE..BYE, two legs, media relay set up), against
# the Sippy B2BUA anchor, in the same run, with the shared harness (run_cps.sh, sipp_step.py).
#
# Wiring (the issue's "trunk-to-trunk path"): the SIPp uac is an IP-authenticated gateway
# ("uac", 127.0.0.1:$UAC_PORT), the SIPp uas another ("uas", 127.0.0.1:$UAS_PORT); the dial
# plan sends any DID from a trunk to "gateway:uas" with the dialled number. softpbx relays
# media for every call (4 UDP sockets per call), as in production.
#
# Usage: bench/cps_bench.sh                   (RATES=100,200,400 STEP_S=10 by default)
#        RATES=200,300,400 STEP_S=10 ONLY=softpbx bench/cps_bench.sh
#        WEBHOOKS=1 ONLY=softpbx bench/cps_bench.sh   (softpbx twice in one run: without CRM
#            events, then with every NOTIFY_* POSTed to a local CRM, bench/crm_sink.py, which
#            answers at once and counts what it got: lost and duplicate events are printed)
# Everything stays on 127.0.0.1; every step is bounded; the whole run is killed after MAX_S.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"; REPO="$(dirname "$HERE")"
SHARED=${SHARED:-/work/shared/bench}
RATES=${RATES:-100,200,400}; STEP_S=${STEP_S:-10}
SUT_PORT=${SUT_PORT:-5360}; UAS_PORT=${UAS_PORT:-5370}; UAC_PORT=${UAC_PORT:-5380}
SUT_CPU=${SUT_CPU:-1}; LOAD_CPU=${LOAD_CPU:-0}; MAX_S=${MAX_S:-900}; ONLY=${ONLY:-}
WEBHOOKS=${WEBHOOKS:-}; CRM_PORT=${CRM_PORT:-18480}
PY=${PY:-$REPO/.venv/bin/python}
export SUT_PORT UAS_PORT UAC_PORT SUT_CPU LOAD_CPU RATES STEP_S
. "$SHARED/env.sh"
case "$SIP_HOST" in 127.*) ;; *) echo "SIP_HOST must be a loopback address"; exit 2 ;; esac
if [ -z "${CPS_BENCH_TIMED:-}" ]; then
  CPS_BENCH_TIMED=1 exec timeout -k 10 "$MAX_S" bash "$0" "$@"
fi
export PATH="$PATH:/usr/sbin"
if ! command -v sipp >/dev/null || [ ! -x "$BENCH_VENV/bin/b2bua" ]; then
  [ "$(id -u)" = 0 ] || { echo "need root once for $SHARED/setup.sh"; exit 2; }
  SKIP_APT=$(command -v sipp >/dev/null && echo 1) bash "$SHARED/setup.sh" || exit 1
fi
OUT="$BENCH_TMP/softpbx_cps_$(date +%Y%m%d-%H%M%S)"; mkdir -p "$OUT"
P="$OUT/profiles"; cp -r "$REPO/sip_profiles" "$P"
rm -f "$P"/gateways/*.toml
printf '[gateway]\nproxy = "127.0.0.1:%s"\ninbound_addresses = ["127.0.0.1:%s"]\nrecord = false\n' \
  "$UAC_PORT" "$UAC_PORT" > "$P/gateways/uac.toml"
printf '[gateway]\nproxy = "127.0.0.1:%s"\nrecord = false\n' "$UAS_PORT" > "$P/gateways/uas.toml"
cat > "$P/dialplan.toml" <<DP
[[inbound]]
did = "*"
destination = "gateway:uas"
DP
SP_PID=""
cleanup() { [ -n "$SP_PID" ] && kill "$SP_PID" 2>/dev/null; wait 2>/dev/null; }
trap cleanup EXIT
run_softpbx() {  # extra --set arguments follow
  (cd "$REPO" && exec taskset -c "$SUT_CPU" "$PY" -m softpbx run --profiles "$P" "$@" \
     --set global.db_path="$OUT/softpbx.db" --set global.log_level=warning \
     --set http.http_port=0 --set internal.sip_port="$SUT_PORT" --set external.sip_port="$SUT_PORT" \
     --set 'internal.transports=["udp"]' --set 'external.transports=["udp"]' \
     --set media.rtp_timeout=0 --set recording.enabled=false) > "$OUT/softpbx.log" 2>&1 &
  SP_PID=$!
  # log level is warning (no "running" line): ready once the UDP port is bound
  for _ in $(seq 100); do ss -Hlun "sport = :$SUT_PORT" | grep -q . && return 0; sleep 0.1; done
  echo "softpbx did not start:"; tail -5 "$OUT/softpbx.log"; exit 1
}
if [ "$ONLY" != "sippy" ]; then
  run_softpbx
  echo "# softpbx pid $SP_PID on 127.0.0.1:$SUT_PORT (core $SUT_CPU), uas on $UAS_PORT"
  SUT=external SUT_PID=$SP_PID LABEL=softpbx bash "$SHARED/sip/run_cps.sh" > "$OUT/softpbx.jsonl"
  kill "$SP_PID"; wait "$SP_PID" 2>/dev/null; SP_PID=""
fi
if [ -n "$WEBHOOKS" ] && [ "$ONLY" != "sippy" ]; then
  taskset -c "$LOAD_CPU" "$PY" "$HERE/crm_sink.py" --port "$CRM_PORT" --max-s "$MAX_S" \
    > "$OUT/crm_sink.json" 2> "$OUT/crm_sink.log" &
  CRM_PID=$!; sleep 1
  run_softpbx --set crm.webhook_url="http://127.0.0.1:$CRM_PORT/hook"
  echo "# softpbx+crm pid $SP_PID: every call's NOTIFY_START/END to 127.0.0.1:$CRM_PORT"
  SUT=external SUT_PID=$SP_PID LABEL=softpbx+crm bash "$SHARED/sip/run_cps.sh" > "$OUT/softpbx_crm.jsonl"
  sleep 3  # let the outbox drain before counting
  kill "$SP_PID"; wait "$SP_PID" 2>/dev/null; SP_PID=""
  kill "$CRM_PID"; wait "$CRM_PID" 2>/dev/null
  echo "# CRM received: $(cat "$OUT/crm_sink.json")"
  echo "# outbox rows not delivered: $("$PY" -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"select count(*) from outbox where state != 'delivered'\").fetchone()[0])" "$OUT/softpbx.db")"
fi
if [ "$ONLY" != "softpbx" ]; then
  SUT=sippy LABEL=sippy bash "$SHARED/sip/run_cps.sh" > "$OUT/sippy.jsonl"
fi
"$BENCH_PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); res = {}
for f in out.glob("*.jsonl"):
    for line in f.read_text().splitlines():
        try: d = json.loads(line[line.index("{"):])
        except ValueError: continue
        if "target_rate" in d: res.setdefault(d["label"], []).append(d)
for label, rows in sorted(res.items()):
    for r in rows:
        print(f"{label:8} rate={r['target_rate']:>5} ok={r['ok']:>6} failed={r['failed']:>4} "
              f"retrans={r['retrans']:>5} cpu={r['sut_cpu_pct']}% ms/call={r['sut_cpu_ms_per_call']} "
              f"rtt={r['rtt_ms_avg']}ms {'PASS' if r['pass'] else 'FAIL'}")
def per_call(label):
    v = [r["sut_cpu_ms_per_call"] for r in res.get(label, []) if r["pass"] and r["sut_cpu_ms_per_call"]]
    return min(v) if v else None, (sorted(v)[len(v)//2] if v else None)
s, k = per_call("softpbx"), per_call("sippy")
print(f"softpbx median ms/call over passing steps: {s[1]}; sippy: {k[1]}")
if s[1] and k[1]:
    print(f"ratio softpbx/sippy = {s[1]/k[1]:.2f} (target: <= 0.5, i.e. <= 2.75 ms/call)")
print(f"results in {out}")
PYEOF
