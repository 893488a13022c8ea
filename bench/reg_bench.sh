#!/bin/bash
# CPU cost of an authenticated registration (REGISTER -> 401 -> REGISTER+digest -> 200):
# softpbx against the Kamailio registrar anchor, in the same run, with the shared anchor
# harness (../shared/bench/sip/run_reg.sh, SIPp reg_auth.xml, sipp_step.py).
#
#  1. makes sure SIPp, Kamailio and the anchor venv are there (runs the shared setup.sh once,
#     as root; SKIP_APT=1 when the packages are already installed);
#  2. writes bench profiles (bench/make_bench_profiles.py: NUSERS users u100000.. with password
#     pw-<user>, realm 127.0.0.1, db in a scratch dir, log level warning, no bans) and starts
#     softpbx on them pinned to core SUT_CPU (the load generator runs on LOAD_CPU);
#  3. SUT=external run_reg.sh against softpbx, stops softpbx, then SUT=kamailio run_reg.sh on
#     the same port, same rates, same users;
#  4. prints SUT CPU ms per registration at each rate for both, the highest passing rate and
#     the ratio softpbx/Kamailio (target: <= 0.5 ms per registration with 0 failures).
#
# Everything stays on 127.0.0.1 and every step is bounded (count = rate * STEP_S, SIPp
# -timeout); the whole run is killed after MAX_S seconds.
#
# Usage: bench/reg_bench.sh                       (defaults below; ~1-2 minutes)
#        RATES=500,1000,2000,3000 STEP_S=10 bench/reg_bench.sh
#        ONLY=softpbx bench/reg_bench.sh          (skip the Kamailio anchor; or ONLY=kamailio)
#        KEEP_GOING=1 ...                         (do not stop at the first failing step)
#        RATES=2000 STEP_S=40 ...                 (steady state: completed UDP transactions
#                                                  live 32 s, Timer J = 64*T1)
# softpbx runs from the checkout holding this script (`cd REPO && python -m softpbx`), so a
# clean tree can be measured with: git archive HEAD | tar -x -C DIR && PY=... DIR/bench/reg_bench.sh
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"; REPO="$(dirname "$HERE")"
SHARED=${SHARED:-$(cd "$REPO/../shared/bench" 2>/dev/null && pwd)}
RATES=${RATES:-500,1000,2000}; STEP_S=${STEP_S:-5}; NUSERS=${NUSERS:-10000}
SUT_PORT=${SUT_PORT:-5260}          # not 5060: the shipped profile / tests may be using it
UAC_PORT=${UAC_PORT:-5280}          # SIPp's local port
SUT_CPU=${SUT_CPU:-1}; LOAD_CPU=${LOAD_CPU:-0}
MAX_S=${MAX_S:-600}; ONLY=${ONLY:-}; KEEP_GOING=${KEEP_GOING:-}
PY=${PY:-$REPO/.venv/bin/python}     # a venv with softpbx's dependencies (aiohttp, uvloop ...)
export SUT_PORT UAC_PORT SUT_CPU LOAD_CPU RATES STEP_S NUSERS
. "$SHARED/env.sh"                   # BENCH_TMP, BENCH_PY, SIP_HOST (127.0.0.1)
case "$SIP_HOST" in 127.*) ;; *) echo "SIP_HOST must be a loopback address"; exit 2 ;; esac

# Bound the whole run (the script re-executes itself under timeout once).
# timeout signals its whole process group: softpbx, SIPp and Kamailio included.
if [ -z "${REG_BENCH_TIMED:-}" ]; then
  REG_BENCH_TIMED=1 exec timeout -k 10 "$MAX_S" bash "$0" "$@"
fi

# -- 1. anchors installed ------------------------------------------------------------------
export PATH="$PATH:/usr/sbin"
HAVE_PKGS=1
command -v sipp >/dev/null || HAVE_PKGS=""
command -v kamailio >/dev/null || HAVE_PKGS=""
if [ -z "$HAVE_PKGS" ] || [ ! -x "$BENCH_PY" ] || [ ! -x "$BENCH_TMP/rtpload" ]; then
  [ "$(id -u)" = 0 ] || { echo "need root once for $SHARED/setup.sh"; exit 2; }
  SKIP=$HAVE_PKGS
  echo "# running $SHARED/setup.sh (SKIP_APT=${SKIP:-})"
  SKIP_APT=$SKIP bash "$SHARED/setup.sh" || { echo "setup.sh failed"; exit 1; }
fi

OUT="$BENCH_TMP/softpbx_reg_$(date +%Y%m%d-%H%M%S)"; mkdir -p "$OUT"
PROFILES="$OUT/profiles"; DATA="$OUT/data"
SP_PID=""
cleanup() {
  if [ -n "$SP_PID" ] && kill -0 "$SP_PID" 2>/dev/null; then
    kill "$SP_PID"; for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$SP_PID" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$SP_PID" 2>/dev/null
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

port_busy() { [ -n "$(ss -Hlun "sport = :$1" 2>/dev/null)" ]; }
for p in "$SUT_PORT" "$UAC_PORT"; do
  if port_busy "$p"; then echo "UDP port $p is in use on this host; set SUT_PORT/UAC_PORT"; exit 1; fi
done

echo "# host: $(nproc) cores, loadavg $(cut -d' ' -f1-3 /proc/loadavg) before the run;" \
     "SUT on core $SUT_CPU, SIPp on core $LOAD_CPU; rates $RATES x ${STEP_S}s; $NUSERS users; port $SUT_PORT"
if REV="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"; then
  REV="commit $REV, $(git -C "$REPO" status --porcelain -- softpbx | wc -l) uncommitted files under softpbx/"
else REV="not a git checkout"; fi
echo "# softpbx from $REPO ($REV), $("$PY" -V 2>&1)"
echo "# results in $OUT"
RUN_ARGS=(); [ -n "$KEEP_GOING" ] && RUN_ARGS=(--keep-going)

# -- 2+3. softpbx ---------------------------------------------------------------------------
if [ "$ONLY" != kamailio ]; then
  "$PY" "$HERE/make_bench_profiles.py" "$PROFILES" --users "$NUSERS" --port "$SUT_PORT" \
      --ip "$SIP_HOST" --data-dir "$DATA" || exit 1
  ( cd "$REPO" && exec taskset -c "$SUT_CPU" "$PY" -m softpbx run --profiles "$PROFILES" ) \
      > "$OUT/softpbx.log" 2>&1 &
  SP_PID=$!
  for _ in $(seq 1 120); do
    port_busy "$SUT_PORT" && break
    kill -0 "$SP_PID" 2>/dev/null || break
    sleep 0.25
  done
  if ! port_busy "$SUT_PORT" || ! kill -0 "$SP_PID" 2>/dev/null; then
    echo "softpbx did not start; see $OUT/softpbx.log"; tail -20 "$OUT/softpbx.log"; exit 1
  fi
  echo "# softpbx pid $SP_PID listening on udp $SIP_HOST:$SUT_PORT ($(ps -o rss= -p "$SP_PID") kB RSS)"
  SUT=external SUT_PID="$SP_PID" LABEL=softpbx "$SHARED/sip/run_reg.sh" "${RUN_ARGS[@]}" \
      > "$OUT/softpbx.jsonl" 2> "$OUT/softpbx.steps"
  cat "$OUT/softpbx.steps" >&2
  echo "# softpbx after the run: $(ps -o rss= -p "$SP_PID") kB RSS;" \
       "log lines: $(wc -l < "$OUT/softpbx.log") ($(grep -c 'auth failure' "$OUT/softpbx.log") auth failures)"
  kill "$SP_PID"; for _ in $(seq 1 20); do kill -0 "$SP_PID" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$SP_PID" 2>/dev/null; SP_PID=""
  sleep 1
fi

# -- 3. Kamailio anchor, same port, same rates ---------------------------------------------
if [ "$ONLY" != softpbx ]; then
  SUT=kamailio LABEL=kamailio "$SHARED/sip/run_reg.sh" "${RUN_ARGS[@]}" \
      > "$OUT/kamailio.jsonl" 2> "$OUT/kamailio.steps"
  cat "$OUT/kamailio.steps" >&2
fi

# -- 4. figures -----------------------------------------------------------------------------
echo
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
TARGET = 0.5
runs = {}
for name in ("softpbx", "kamailio"):
    p = out / f"{name}.jsonl"
    if not p.exists():
        continue
    rows, best = [], None
    for line in p.read_text().splitlines():
        i = line.find("{")
        if i < 0:
            continue
        try:
            d = json.loads(line[i:])
        except json.JSONDecodeError:
            continue
        if "target_rate" in d:
            rows.append(d)
        elif "max_passing_rate" in d:
            best = d["max_passing_rate"]
    runs[name] = (rows, best)
print("registrations (REGISTER/401/REGISTER+digest/200), SUT CPU per registration:")
print(f"{'SUT':<9} {'rate/s':>6} {'ok':>6} {'fail':>5} {'retr':>5} {'reg/s':>7} {'rtt ms':>7} "
      f"{'SUT %CPU':>8} {'ms/reg':>7} {'host busy%':>10} {'rcvbuf err':>10}  pass")
for name, (rows, best) in runs.items():
    for d in rows:
        print(f"{name:<9} {d['target_rate']:>6} {d['ok']:>6} {d['failed']:>5} {d['retrans']:>5} "
              f"{d['achieved_cps'] or 0:>7} {d['rtt_ms_avg'] or 0:>7.2f} {d['sut_cpu_pct'] or 0:>8} "
              f"{d['sut_cpu_ms_per_call'] or 0:>7} {d['host_busy_pct']:>10} {d['udp_rcvbuf_errors']:>10}  "
              f"{'PASS' if d.get('pass') else 'FAIL'}")
    print(f"{name:<9} max passing rate: {best}")
if "softpbx" in runs and "kamailio" in runs:
    sp = {d["target_rate"]: d for d in runs["softpbx"][0] if d.get("sut_cpu_ms_per_call")}
    ka = {d["target_rate"]: d for d in runs["kamailio"][0] if d.get("sut_cpu_ms_per_call")}
    print("ratio softpbx / kamailio (CPU per registration):")
    for r in sorted(set(sp) & set(ka)):
        a, b = sp[r]["sut_cpu_ms_per_call"], ka[r]["sut_cpu_ms_per_call"]
        print(f"  rate {r:>6}: {a:.3f} ms / {b:.3f} ms = {a / b:.1f}x")
if "softpbx" in runs:
    rows, best = runs["softpbx"]
    fails = sum(d["failed"] for d in rows)
    # The issue's target: <= 0.5 ms CPU per registration, i.e. 2,000/s on one core, 0 failures.
    good = [d for d in rows if d.get("pass") and d["failed"] == 0 and d["target_rate"] >= 2000
            and (d["sut_cpu_ms_per_call"] or 99) <= TARGET]
    top = max((d for d in rows if d.get("pass")), key=lambda d: d["target_rate"], default=None)
    at_top = f"{top['sut_cpu_ms_per_call']} ms/reg at {top['target_rate']}/s" if top else "no step passed"
    print(f"softpbx target (<= {TARGET} ms/registration at >= 2000/s, 0 failures): "
          f"{'MET' if good else 'NOT MET'} (highest passing step: {at_top}; "
          f"failures over all steps: {fails})")
EOF
echo
"$PY" "$SHARED/sip/summarize.py" "$OUT"/*.jsonl
echo "# loadavg after: $(cut -d' ' -f1-3 /proc/loadavg); raw JSON: $OUT/{softpbx,kamailio}.jsonl," \
     "SIPp files: $BENCH_TMP/reg_softpbx, $BENCH_TMP/reg_kamailio"
