#!/usr/bin/env bash
# The Fashion-MNIST long recipes (and the variants they were chosen from) trained side by side on one GPU
# with Keras on JAX (scripts/fit_on_jax.py): small models at 28 px leave most of a GPU idle, so several
# processes share it. Usage: KERAS_BACKEND=jax scripts/fashion_recipes_on_gpu.sh OUT_DIR [SECONDS_EACH [NAME...]]
# (NAMEs: only those runs of the list below). Writes OUT_DIR/<name>.log per run (one line per epoch, the result
# JSON last) and prints a summary. GoogLeNet's XLA compilation and autotuning took 390-410 s beside five other
# runs on an H200 (ResNet's 39 s): give it the GPU to itself or time to spare.
set -u
out=${1:?usage: $0 OUT_DIR [SECONDS_EACH [NAME...]]}
limit=${2:-3000}
shift $(( $# < 2 ? $# : 2 ))
only=" $* "
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # processes share the GPU's memory
runs=(
  "resnet_w16_e40     models/resnet/fashion.yaml train.epochs=40"
  "resnet_w32_e30     models/resnet/fashion.yaml model.width=32 train.epochs=30"
  "mobilenet_v2_a10   models/mobilenet_v2/fashion.yaml"
  "mobilenet_v2_a05   models/mobilenet_v2/fashion.yaml model.alpha=0.5"
  "googlenet_w050     models/googlenet/fashion.yaml"
  "googlenet_w025     models/googlenet/fashion.yaml model.width=0.25"
  "mobilenet_v2_wd5e4 models/mobilenet_v2/fashion.yaml train.weight_decay=5e-4"  # next to try: not yet run
)
selected=()
for run in "${runs[@]}"; do
  name=${run%% *}
  if [ "$only" = "  " ] || [[ "$only" == *" $name "* ]]; then selected+=("$run"); fi
done
[ ${#selected[@]} -gt 0 ] || { echo "no run named $*; the names are: $(printf '%s ' "${runs[@]%% *}")" >&2; exit 2; }
for run in "${selected[@]}"; do
  set -- $run
  name=$1; shift
  timeout "$limit" python3 "$(dirname "$0")/fit_on_jax.py" "$@" --out "/tmp/fashion_runs/$name" \
    ${FASHION_DATA:+--data "$FASHION_DATA"} >"$out/$name.log" 2>&1 &
done
wait
for run in "${selected[@]}"; do
  set -- $run
  printf '%-18s %s\n' "$1" "$(grep -E '^epoch=' "$out/$1.log" | tail -1)"
  grep -E '^\{' "$out/$1.log" | tail -1
done
