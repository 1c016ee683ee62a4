#!/usr/bin/env bash
# The accelerator figures of README "GPU / TPU", in one go (< 10 min on one GPU; issue 12 item 6).
#
#   pip install -r requirements.txt -e ".[cuda12]"      # once
#   experiments/gpu_check.sh [OUT_DIR]                 # default experiments/results/gpu/<date>
#
# Records, with date, device (nvidia-smi) and jax version, in OUT_DIR:
#   backend.json        what JAX sees (backend, device kind and count)
#   step_f32.json       ViT-B/16 224 px train step, float32, model.matmul_precision "default"
#   step_f32_highest.json   ... the same with matmul precision "highest" (JAX_DEFAULT_MATMUL_PRECISION)
#   step_bf16.json      ... bfloat16 compute dtype
#                       (benchmarks step: images/s, XLA FLOPs per image, and the same process's
#                        float32 / bfloat16 dot FLOP/s, so img/s x FLOPs / dot rate = utilisation)
#   loop.json           benchmarks loop: trainer vs jitted step on the demo, host pipeline rate at
#                       224 px per core, cores needed to feed the measured step
#   summary.txt         the printed lines of all of the above
# Each part has its own time limit (4 x 130 s), so one failure does not lose the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/gpu/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOG="$OUT/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=3

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not found"
  echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
} | tee "$LOG"

python - > "$OUT/backend.json" <<'EOF'
import json
from ntkcl_jax import sharding
print(json.dumps(sharding.backend_info("gpu")))
EOF
if [[ $? -ne 0 ]]; then
  echo "JAX has no GPU backend here; install with pip install -e \".[cuda12]\"" | tee -a "$LOG"
  exit 1
fi
cat "$OUT/backend.json" | tee -a "$LOG"; echo | tee -a "$LOG"

part() {  # part <name> <limit_s> <command...>: JSON (last stdout line) to OUT/<name>.json
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$?
  grep -v '^{' "$OUT/$name.out" | tee -a "$LOG"
  tail -n 1 "$OUT/$name.out" > "$OUT/$name.json"
  [[ $rc -ne 0 ]] && echo "   $name exited $rc (see $OUT/$name.err)" | tee -a "$LOG"
}

STEP=(python -m experiments.benchmarks step --size vitb --ptm off --phase train --repeats 10
      --dot-size 8192 --dot-repeats 10 --json)
part step_f32 130 "${STEP[@]}" --dtype float32
part step_f32_highest 130 env JAX_DEFAULT_MATMUL_PRECISION=highest "${STEP[@]}" --dtype float32
part step_bf16 130 "${STEP[@]}" --dtype bfloat16
part loop 130 python -m experiments.benchmarks loop --repeats 2 --pipeline-images 256 --json

python - "$OUT" <<'EOF' | tee -a "$LOG"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
  try:
    return json.loads((out / f"{name}.json").read_text())
  except Exception as e:  # a failed part
    return {"error": repr(e)}
for name in ("step_f32", "step_f32_highest", "step_bf16"):
  d = load(name)
  rows = [r for r in d.get("results", []) if r.get("phase") == "train" and "img_s" in r]
  if not rows:
    print(f"{name}: no result ({d.get('error', 'see .err')})")
    continue
  r, dots = rows[0], d.get("dot_flop_s", {})
  flop_s = r["img_s"] * r["xla_flops_per_img"]
  share = flop_s / dots["bfloat16"] if dots.get("bfloat16") else float("nan")
  print(f"{name}: {r['img_s']:.1f} img/s, {flop_s / 1e12:.2f} TFLOP/s = {share:.1%} of this "
        f"process's bf16 dot rate ({dots.get('bfloat16', float('nan')) / 1e12:.1f} TFLOP/s)")
loop = load("loop")
if "loop" in loop:
  print(f"trainer / step (demo): {loop['loop']['ratio_median']:.3f}; "
        f"threads needed: {loop.get('threads_needed')}")
for k, v in loop.get("pipeline", {}).items():
  print(f"pipeline {k}: {v['img_per_cpu_s']:.0f} img per CPU-second")
EOF
echo "results in $OUT" | tee -a "$LOG"
