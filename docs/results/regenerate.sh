#!/usr/bin/env bash
# Regenerates every results table of README.md, docs/results/*.md and docs/benchmarks.md from the MLflow store
# (the project's mlruns/, or $MLFLOW_TRACKING_URI), after the commands each table names have run. Nothing in a results section
# is typed by hand: rerun this after new runs and commit the changed pages.
#
#   docs/results/regenerate.sh               tables from the tracking store (seconds)
#   docs/results/regenerate.sh --benchmarks  also rerun the speed benchmarks and insert their output (minutes;
#                                            needs MEDSEG_DATA_ROOT for the inference benchmark)
#
# A table whose runs are not in the store is left as it is, with a note on stderr.
set -uo pipefail
cd "$(dirname "$0")/../.."
MEDSEG="${MEDSEG:-medseg}"
PYTHON="${PYTHON:-python}"

table() {  # table FILE:BLOCK [medseg results options...]
  local target="$1"; shift
  if ! "$MEDSEG" results "$@" --into "$target"; then
    echo "skipped $target: no matching runs in this store (run the commands shown beside it first)" >&2
  fi
}

dev='params.`trainer.evaluate_test` = '"'"'False'"'"''

# MSD Hippocampus: the settings chosen on fold 0's validation split, then the 5-fold cross-validation
table docs/results/hippocampus.md:selection --experiment hippocampus_unet --kind training --split val --filter "$dev"
table docs/results/hippocampus.md:cv --experiment hippocampus_unet --kind cross-validation
table docs/results/index.md:hippocampus-cv --experiment hippocampus_unet --kind cross-validation
table README.md:hippocampus-cv --experiment hippocampus_unet --kind cross-validation
table docs/results/hippocampus.md:calibration --experiment hippocampus_unet --kind calibration
table docs/results/hippocampus.md:uncertainty --experiment hippocampus_unet --kind training --table uncertainty \
  --filter "params.\`trainer.evaluate_test\` = 'True'"

# LGG brain MRI: selection on fold 0's validation patients, the 5-fold cross-validation
table docs/results/lgg.md:selection --experiment lgg_flair --kind training --split val --filter "$dev"
table docs/results/lgg.md:cv --experiment lgg_flair --kind cross-validation
table docs/results/index.md:lgg-cv --experiment lgg_flair --kind cross-validation
table README.md:lgg-cv --experiment lgg_flair --kind cross-validation
table docs/results/lgg.md:crosssite --experiment lgg_crosssite --kind cross-site

# Instance segmentation
table docs/results/instance-segmentation.md:touching --experiment touching_mask_rcnn
table docs/results/instance-segmentation.md:hippocampus-objects --experiment quickstart_mask_rcnn --experiment quickstart --kind training

if [[ "${1:-}" == "--benchmarks" ]]; then
  bench() {  # bench FILE:BLOCK command...
    local target="$1"; shift
    local output
    if output="$("$@")"; then
      printf '```text\n%s\n```\n' "$output" | "$PYTHON" -c '
import sys
from pathlib import Path
from medseg_lightning.reporting.results import insert_between_markers
file, _, block = sys.argv[1].partition(":")
insert_between_markers(Path(file), block, sys.stdin.read())' "$target"
      echo "$target: benchmark output inserted"
    else
      echo "skipped $target: the benchmark failed" >&2
    fi
  }
  bench docs/benchmarks.md:train-overhead "$PYTHON" benchmarks/train_step_overhead.py --steps 30 --repeats 2 --channels-last
  bench docs/benchmarks.md:train-throughput "$PYTHON" benchmarks/train_throughput.py --steps 30 --repeats 2
  bench docs/explanation/saliency.md:saliency-sanity "$PYTHON" benchmarks/saliency_sanity.py \
    --data experiments/hippocampus_unet.yaml --experiment hippocampus_unet --cases 10
  # the study's trainings are kept in benchmarks/results/active_learning/results.json: with it, this only reports
  bench docs/how-to/triage.md:active-learning "$PYTHON" benchmarks/active_learning.py \
    --data experiments/hippocampus_unet.yaml --out benchmarks/results/active_learning --rounds 2 \
    --plot docs/images/active_learning.png
  bench docs/benchmarks.md:inference-speed "$PYTHON" benchmarks/inference_speed.py --cases 40 --repeats 3
fi
