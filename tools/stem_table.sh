#!/usr/bin/env bash
# Patch stem against conv stem on the classification demo: the same recipe, data and epochs,
# only model.backbone.stem differs. Prints a markdown table (top-1 of tools/test.py, wall time of
# tools/train.py).
#
#   bash tools/stem_table.sh [DATA_ROOT] [NUM_CLASSES] [extra --cfg-options ...]
#
# DATA_ROOT defaults to data/synthetic/cls (written first if missing); any ImageNet-layout folder
# works. Work dirs go to work_dirs/stem_table/{conv,patch}.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
CONFIG=configs/demo/cls_synthetic.yaml
DATA=${1:-data/synthetic/cls}
NUM_CLASSES=${2:-10}
shift $(( $# > 2 ? 2 : $# ))
EXTRA=("$@")

if [[ ! -d "$DATA" && "$DATA" == data/synthetic/cls ]]; then
  "$PYTHON" tools/make_synthetic.py cls "$DATA"
fi

declare -A STEM=(
  [conv]=""  # the config's ConvStem
  [patch]="model.backbone.stem={_delete_: true, type: PatchEmbed}"
)

rows=()
mkdir -p work_dirs/stem_table  # the logs sit beside the work dirs, which train.py makes later
for name in conv patch; do
  work=work_dirs/stem_table/$name
  options=("data_root=$DATA" "num_classes=$NUM_CLASSES" "${EXTRA[@]}")
  [[ -n "${STEM[$name]}" ]] && options+=("${STEM[$name]}")
  start=$SECONDS
  "$PYTHON" tools/train.py "$CONFIG" --work-dir "$work" --cfg-options "${options[@]}" > "$work.train.log" 2>&1 \
    || { echo "training with the $name stem failed; see $work.train.log" >&2; exit 1; }
  seconds=$((SECONDS - start))
  "$PYTHON" tools/test.py "$CONFIG" "$(cat "$work/last_checkpoint")" --work-dir "$work/test" \
    --cfg-options "${options[@]}" > "$work.test.log" 2>&1 \
    || { echo "testing with the $name stem failed; see $work.test.log" >&2; exit 1; }
  top1=$("$PYTHON" -c "import json, sys; print(f\"{json.load(open(sys.argv[1]))['accuracy/top1']:.1f}\")" "$work/test/metrics.json")
  rows+=("| $name | $top1 | $seconds |")
done

echo "| stem | top-1 (%) | training time (s) |"
echo "| --- | --- | --- |"
printf '%s\n' "${rows[@]}"
