#!/usr/bin/env bash
# The full recipe (configs/default.yaml: all SST-2 rows, 3 epochs) on one GPU, in three variants at once:
# A = round_robin sampling, B = round_robin with learning rate 1e-4, C = proportional sampling (what default.yaml now ships). At batch size 32 the GPU
# is bound by kernel launches, so three processes share one card well. Run from the repo root on the device
# machine after `bash ../shared/tools/device-bundle` here (carry .device-bundle):
#   OUT=/some/dir bash bench/gpu_recipe.sh
# Locally (smoke test): LOCAL=1 OUT=/tmp/o EXTRA="--max_steps 3 --max_train_samples 64" bash bench/gpu_recipe.sh
set -uo pipefail
OUT=${OUT:?set OUT to the folder for logs and metrics}
if [ -z "${LOCAL:-}" ]; then
  source .device-bundle/activate
  GPU_FLAGS="--bf16 true --tf32 true --optim adamw_torch_fused --dataloader_num_workers 2"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt"
else
  ENCODER=${ENCODER:-sentence-transformers/all-MiniLM-L6-v2} DATA_DIR=${DATA_DIR:-../shared/data}
  GPU_FLAGS=""
fi
python -c "import torch, transformers, datasets, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__)" >> "$OUT/env.txt"
common="--encoder $ENCODER --data_dir $DATA_DIR --save_strategy no --overwrite_output_dir true --disable_tqdm true $GPU_FLAGS ${EXTRA:-}"
runs=/tmp/gpu_recipe_runs
declare -A variant=([A]="--task_sampling round_robin" [B]="--task_sampling round_robin --learning_rate 1e-4" [C]="--task_sampling proportional")
start=$(date +%s)
for name in A B C; do
  python train.py configs/default.yaml $common ${variant[$name]} --output_dir "$runs/$name" > "$OUT/$name.log" 2>&1 &
done
wait
echo "wall seconds for the three concurrent runs: $(( $(date +%s) - start ))" >> "$OUT/env.txt"
for name in A B C; do
  cp "$runs/$name/metrics.json" "$OUT/metrics_$name.json" 2>/dev/null || echo "run $name wrote no metrics.json" >> "$OUT/env.txt"
done
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("metrics_*.json")):
    m = json.loads(f.read_text())
    final = m["final"]
    print(f.stem, "sst2_acc=%.4f" % final["sentiment"]["accuracy"], "question_acc=%.4f" % final["question"]["accuracy"],
          "gold_f1=%.4f" % final.get("question_gold", {}).get("f1_pos", float("nan")),
          "gold_noqm_f1=%.4f" % final.get("question_gold_noqm", {}).get("f1_pos", float("nan")),
          "train_s=%s" % m["train"]["wall_seconds"], "samples/s=%s" % m["train"]["samples_per_second"],
          "epochs:", [round(r["eval"].get("sentiment", {}).get("accuracy", float("nan")), 4) for r in m["epochs"]])
PY
cat "$OUT/env.txt"
