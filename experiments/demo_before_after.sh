#!/usr/bin/env bash
# Demo wall time before/after a change, same machine, one script run, alternating order.
#
#   experiments/demo_before_after.sh <old-commit> <new-commit> [rounds=1] [extra main.py flags...]
#   e.g. experiments/demo_before_after.sh d977bb3 HEAD 1 --config.analysis.enabled=False
#
# Clones each commit fresh from this repository into a temporary directory, then runs
# `python -m ntkcl_jax.main --config experiments/configs/demo.py` from each clone with the active
# Python environment (PYTHONPATH = the clone; no persistent compilation cache), rounds times,
# in the order old, new, new, old, ... Prints one line per run and the median of each.
set -euo pipefail
OLD=$1 NEW=$2 ROUNDS=${3:-1}
shift $(( $# < 3 ? $# : 3 ))
HERE=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d /tmp/demo_before_after.XXXXXX)
for name in old new; do
  commit=$([[ $name == old ]] && echo "$OLD" || echo "$NEW")
  git clone --quiet --no-checkout "$HERE" "$TMP/$name"
  git -C "$TMP/$name" checkout --quiet "$(git -C "$HERE" rev-parse "$commit")"
done
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores; old $(git -C "$TMP/old" rev-parse --short HEAD), new $(git -C "$TMP/new" rev-parse --short HEAD); flags: $*"
declare -A TIMES
run() {
  local name=$1 i=$2 t0 t1
  shift 2
  t0=$(date +%s.%N)
  (cd "$TMP/$name" && env -u JAX_COMPILATION_CACHE_DIR PYTHONPATH="$TMP/$name" JAX_PLATFORMS=cpu \
    python -m ntkcl_jax.main --config experiments/configs/demo.py --workdir "$TMP/work_${name}_$i" "$@" \
    > "$TMP/${name}_$i.log" 2>&1) || echo "$name round $i FAILED: $(tail -n 2 "$TMP/${name}_$i.log")"
  t1=$(date +%s.%N)
  local s; s=$(echo "$t1 - $t0" | bc)
  TIMES[$name]+="$s "
  echo "$name round $i: ${s} s wall, load $(cut -d' ' -f1 /proc/loadavg); $(grep -m1 -o 'wall time [0-9.]* s' "$TMP/${name}_$i.log")"
}
for ((i = 0; i < ROUNDS; i++)); do
  if (( i % 2 == 0 )); then run old "$i" "$@"; run new "$i" "$@"; else run new "$i" "$@"; run old "$i" "$@"; fi
done
python3 - "${TIMES[old]}" "${TIMES[new]}" <<'PY'
import statistics, sys
old, new = ([float(x) for x in a.split()] for a in sys.argv[1:3])
mo, mn = statistics.median(old), statistics.median(new)
print(f"median wall: old {mo:.1f} s, new {mn:.1f} s, new/old {mn / mo:.3f}")
PY
echo "logs and workdirs: $TMP"
