#!/usr/bin/env bash
# The GPU check (issue 19), one script, under 8 minutes on one H100:
#   1. the CUDA tests (they skip on a machine without CUDA);
#   2. ExPO and TIES at the 7B shape with --device cuda against the CPU path: the outputs must be
#      byte-identical (weightx computes in float32 with the same operation order on both devices);
#   3. the same cases against mergekit --cuda, side by side (benchmarks/run.py --device cuda), when
#      mergekit is installed (benchmarks/setup_mergekit.sh; the check says so when it is not);
#   4. a timeline of one CUDA run from torch's profiler: host reads, host-to-device copies and
#      kernels, and how much they overlap (summary printed, Chrome trace kept).
#
#   bash benchmarks/gpu_check.sh                 # 8 layers of the 7B shape (1.9B parameters)
#   GPU_CHECK_LAYERS=32 bash benchmarks/gpu_check.sh   # the whole 7B shape (needs ~95 GB of disk)
#
# Everything lands in $OUT (default /tmp/weightx-gpu-check): tests.txt, compare.txt, bench.md,
# bench.json, timeline.json (chrome://tracing), timeline.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/weightx-gpu-check}
LAYERS=${GPU_CHECK_LAYERS:-8}
GEN=${GEN:-../shared/bench/gen_checkpoints.py}
export HF_HUB_OFFLINE=1 WEIGHTX_CACHE="$OUT/cache"
mkdir -p "$OUT"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")'
nvidia-smi -L || true
t0=$(date +%s)

echo "== 1. CUDA tests"
"$PY" -m pytest -q tests/test_determinism.py tests/test_distill.py -k cuda 2>&1 | tee "$OUT/tests.txt" | tail -3

echo "== 2. data (7B shape, $LAYERS layers) and CPU vs CUDA bytes"
DATA="$OUT/data-$LAYERS"
if [ ! -f "$DATA/.complete" ]; then
  rm -rf "$DATA"
  "$PY" "$GEN" "$DATA" --hidden 4096 --intermediate 11008 --layers "$LAYERS" --heads 32 --kv-heads 32 --vocab 32000
  touch "$DATA/.complete"
fi
recipe() {  # recipe CASE OUT
  case "$1" in
    expo) printf 'models: {sft: %s, dpo: %s}\nbase: sft\ndeltas: [{model: dpo, edits: [{expo: {alpha: 0.3}}]}]\noutput: {path: %s, dtype: bfloat16, config_from: dpo}\n' "$DATA/sft" "$DATA/dpo" "$2" ;;
    ties) printf 'models: {base: %s, sft: %s, dpo: %s}\nbase: base\ndeltas: [{model: sft}, {model: dpo}]\ncombine: {ties: {density: 0.5}}\noutput: {path: %s, dtype: bfloat16, config_from: dpo}\n' "$DATA/base" "$DATA/sft" "$DATA/dpo" "$2" ;;
  esac
}
: > "$OUT/compare.txt"
for c in expo ties; do
  for dev in cpu cuda; do
    recipe "$c" "$OUT/$c-$dev" > "$OUT/$c.yaml"
    /usr/bin/time -f "$c $dev: %e s wall, %M KB maxrss" "$PY" -m weightx apply "$OUT/$c.yaml" --device "$dev" --overwrite --no-validate --no-push 2>&1 | tail -1 | tee -a "$OUT/compare.txt"
  done
  if cmp -s <(cd "$OUT/$c-cpu" && cat *.safetensors) <(cd "$OUT/$c-cuda" && cat *.safetensors); then
    echo "$c: CUDA output byte-identical to CPU" | tee -a "$OUT/compare.txt"
  else
    echo "$c: CUDA output DIFFERS from CPU" | tee -a "$OUT/compare.txt"
  fi
  rm -rf "$OUT/$c-cpu" "$OUT/$c-cuda"
done

echo "== 3. against mergekit --cuda"
if [ -x benchmarks/.venv-mergekit/bin/mergekit-yaml ]; then
  "$PY" benchmarks/run.py --data "$DATA" --device cuda --only expo,ties --repeats 1 \
    --tools weightx,mergekit,floor --json "$OUT/bench.json" --workdir "$OUT" | tee "$OUT/bench.md"
else
  echo "mergekit is not installed here (bash benchmarks/setup_mergekit.sh needs PyPI): skipped" | tee "$OUT/bench.md"
fi

echo "== 4. timeline of one CUDA ExPO run"
recipe expo "$OUT/expo-timeline" > "$OUT/expo.yaml"
"$PY" - "$OUT" <<'PY'
import sys, torch, weightx
from torch.profiler import ProfilerActivity, profile
out = sys.argv[1]
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    weightx.apply(f"{out}/expo.yaml", device="cuda", overwrite=True, progress=False)
prof.export_chrome_trace(f"{out}/timeline.json")
ev = prof.key_averages()
def total(pred):  # microseconds of device time in the events that match
    return sum(e.device_time_total for e in ev if pred(e.key)) / 1e6
copies = total(lambda k: "Memcpy HtoD" in k or "Memcpy DtoH" in k)
kernels = total(lambda k: not k.startswith("Memcpy") and not k.startswith("aten::") and not k.startswith("cuda"))
wall = max(e.time_range.end for e in prof.events()) / 1e6 - min(e.time_range.start for e in prof.events()) / 1e6
lines = [f"wall {wall:.2f} s; host<->device copies {copies:.2f} s; kernels {kernels:.2f} s",
         f"copies + kernels = {100 * (copies + kernels) / wall:.0f}% of the wall (the rest: host reads, bf16 conversion on the host, writes)"]
print("\n".join(lines))
open(f"{out}/timeline.txt", "w").write("\n".join(lines) + "\n\n" + ev.table(sort_by="self_device_time_total", row_limit=15) + "\n")
PY
rm -rf "$OUT/expo-timeline"
echo "== done in $(( $(date +%s) - t0 )) s; results in $OUT"
