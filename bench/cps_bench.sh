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
#        METRICS=1 PREV_REV=<rev> REPEAT=3 ONLY=softpbx bench/cps_bench.sh   (softpbx as above,
#            then with the HTTP server on and /metrics scraped every second by
#            bench/scrape_metrics.py, then the tree of git revision <rev> (the code before the
#            counters) with its own profiles; the variants take turns REPEAT times; prints
#            ms/call of each in one run, and the last scrape's call counters)
#        WEBHOOKS=1 ONLY=softpbx bench/cps_bench.sh   (softpbx twice in one run: without CRM
#            events, then with every NOTIFY_* POSTed to a local CRM, bench/crm_sink.py, which
#            answers at once and counts what it got: lost and duplicate events are printed)
# Everything stays on 127.0.0.1; every step is bounded; the whole run is killed after MAX_S.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"; REPO="$(dirname "$HERE")"
SHARED=${SHARED:-$(cd "$REPO/../shared/bench" 2>/dev/null && pwd)}
RATES=${RATES:-100,200,400}; STEP_S=${STEP_S:-10}
SUT_PORT=${SUT_PORT:-5360}; UAS_PORT=${UAS_PORT:-5370}; UAC_PORT=${UAC_PORT:-5380}
SUT_CPU=${SUT_CPU:-1}; LOAD_CPU=${LOAD_CPU:-0}; MAX_S=${MAX_S:-900}; ONLY=${ONLY:-}
WEBHOOKS=${WEBHOOKS:-}; CRM_PORT=${CRM_PORT:-18480}
METRICS=${METRICS:-}; PREV_REV=${PREV_REV:-}; HTTP_PORT=${HTTP_PORT:-18490}
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
run_softpbx() {  # extra --set arguments follow (after the defaults: they win); SRC: the tree
  (cd "${SRC:-$REPO}" && PYTHONPATH="${SRC:-$REPO}" exec taskset -c "$SUT_CPU" "$PY" -m softpbx \
     run --profiles "$P" \
     --set global.db_path="$OUT/softpbx.db" --set global.log_level=warning \
     --set http.http_port=0 --set internal.sip_port="$SUT_PORT" --set external.sip_port="$SUT_PORT" \
     --set 'internal.transports=["udp"]' --set 'external.transports=["udp"]' \
     --set media.rtp_timeout=0 --set recording.enabled=false "$@") > "$OUT/softpbx.log" 2>&1 &
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
if { [ -n "$METRICS" ] || [ -n "$PREV_REV" ]; } && [ "$ONLY" != "sippy" ]; then
  if [ -n "$PREV_REV" ]; then  # that revision's tree and its own shipped profiles, same wiring
    mkdir -p "$OUT/prev" && git -C "$REPO" archive "$PREV_REV" | tar -x -C "$OUT/prev"
    PP="$OUT/prev/profiles"; cp -r "$OUT/prev/sip_profiles" "$PP"; rm -f "$PP"/gateways/*.toml
    cp "$P"/gateways/*.toml "$P/dialplan.toml" "$PP/"; mv "$PP"/uac.toml "$PP"/uas.toml "$PP/gateways/"
  fi
  # Variants take turns REPEAT times (other load on the machine hits them alike); results
  # append to one file per variant.
  for rep in $(seq "${REPEAT:-1}"); do
    if [ -n "$METRICS" ]; then
      # HTTP on but CRM events off: otherwise every call's webhooks to the built-in inspector
      # are what gets measured, not the metrics.
      run_softpbx --set http.http_port="$HTTP_PORT" --set 'crm.events=[]'
      taskset -c "$LOAD_CPU" "$PY" "$HERE/scrape_metrics.py" \
        --url "http://127.0.0.1:$HTTP_PORT/metrics" --max-s "$MAX_S" > "$OUT/scrape.txt" 2>&1 &
      SCRAPE_PID=$!
      echo "# [$rep] softpbx+metrics pid $SP_PID: HTTP on (no CRM events), /metrics scraped every second"
      SUT=external SUT_PID=$SP_PID LABEL=softpbx+metrics bash "$SHARED/sip/run_cps.sh" >> "$OUT/softpbx_metrics.jsonl"
      kill "$SCRAPE_PID"; wait "$SCRAPE_PID" 2>/dev/null
      kill "$SP_PID"; wait "$SP_PID" 2>/dev/null; SP_PID=""
      echo "# scrapes: $(cat "$OUT/scrape.txt")"
    fi
    if [ -n "$PREV_REV" ]; then
      P="$PP" SRC="$OUT/prev" run_softpbx
      echo "# [$rep] softpbx@$PREV_REV pid $SP_PID (that revision's tree, same venv)"
      SUT=external SUT_PID=$SP_PID LABEL="softpbx@$PREV_REV" bash "$SHARED/sip/run_cps.sh" >> "$OUT/softpbx_prev.jsonl"
      kill "$SP_PID"; wait "$SP_PID" 2>/dev/null; SP_PID=""
    fi
    if [ "$rep" -lt "${REPEAT:-1}" ]; then
      run_softpbx
      echo "# [$((rep + 1))] softpbx pid $SP_PID"
      SUT=external SUT_PID=$SP_PID LABEL=softpbx bash "$SHARED/sip/run_cps.sh" >> "$OUT/softpbx.jsonl"
      kill "$SP_PID"; wait "$SP_PID" 2>/dev/null; SP_PID=""
    fi
  done
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
for label in sorted(res):
    # Under other load a step may miss its latency target; CPU per call is still measured.
    every = sorted(r["sut_cpu_ms_per_call"] for r in res[label] if r["sut_cpu_ms_per_call"])
    if label.startswith("softpbx") and every:
        print(f"{label:16} ms/call over all {len(every)} steps: min {every[0]}, "
              f"median {every[len(every) // 2]}")
s, k = per_call("softpbx"), per_call("sippy")
print(f"softpbx median ms/call over passing steps: {s[1]}; sippy: {k[1]}")
if s[1] and k[1]:
    print(f"ratio softpbx/sippy = {s[1]/k[1]:.2f} (target: <= 0.5, i.e. <= 2.75 ms/call)")
print(f"results in {out}")
PYEOF
