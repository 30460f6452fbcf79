#!/usr/bin/env bash
# The audio-path capacity runs of issue #16 on a quiet many-core machine, one after another:
# the server pinned to one core, the load process to others, so calls_per_core is one core's.
#   bash benchmarks/load_sweep.sh OUT_DIR [SERVER_CPU] [LOAD_CPUS]
# Needs voxphone importable (PYTHONPATH) and, without flite, SPEECH=/path/to/speech.wav.
set -euo pipefail
out=${1:?OUT_DIR}
server=${2:-2}
load=${3:-4-7}
mkdir -p "$out"
common=(--seconds 30 --server-cpus "$server" --load-cpus "$load")
[ -n "${SPEECH:-}" ] && common+=(--speech "$SPEECH")
run() {  # NAME ARGS...: one run, its JSON in OUT_DIR, one summary line
  local name=$1
  shift
  python3 benchmarks/load.py "${common[@]}" "$@" --out "$out/load-$name.json" >/dev/null 2>"$out/$name.err" || true
  python3 - "$out/load-$name.json" "$name" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError:
    print(sys.argv[2], "failed"); sys.exit()
us = r["server_cpu_cores"] * 1e6 / (r["calls"] * 50)
print(f"{sys.argv[2]:>22}: {r['calls_per_core']}/core cpu {r['server_cpu_cores']} ({us:.1f} us/packet) "
      f"p99 handled {r['packet_latency_ms'].get('p99')} ms, loop lag p99 {r['loop_lag_ms'].get('p99')}, "
      f"sender late p99 {r['sender_late_ms'].get('p99')}, frames dropped {r['frames']['dropped']}, "
      f"keeping up {r['keeping_up']}")
PY
}
for n in ${PCMU_CALLS:-600 700 800 1000}; do run "$n" --calls "$n"; done
for stop in port call; do run "${LAYER_CALLS:-600}-stop-at-$stop" --calls "${LAYER_CALLS:-600}" --stop-at "$stop"; done
run 1000-one-port-each --calls 1000 --ports 1000
run 1000-loss5-jitter20 --calls 1000 --loss 0.05 --jitter-ms 20
for n in ${OPUS_CALLS:-200 250 300}; do run "opus-$n" --calls "$n" --codec opus; done
# A browser's Opus (libwebrtc: 32 kbit/s for mono), cheaper to decode than libopus's defaults.
for n in ${OPUS32_CALLS:-250 300 350}; do
  run "opus32k-$n" --calls "$n" --codec opus --opus-bitrate 32000
done
# Twilio Media Streams, one websocket per caller (give the load processes room: TWILIO_LOAD).
for n in ${TWILIO_CALLS:-400 600}; do
  run "twilio-$n" --calls "$n" --transport twilio --load-cpus "${TWILIO_LOAD:-$load}"
done
