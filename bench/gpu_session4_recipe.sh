#!/usr/bin/env bash
# Session 4, second GPU call (~3 minutes cold): train.py itself with --cuda_graphs on the quick recipe, beside the
# same run without it (same seed, bf16, buckets 16 32 64; the two run at the same time, so their wall times are
# not a speed comparison: bench/train_throughput.py is), plus the real-recording tests again.
# On the device machine, from the repo root, carrying .device-bundle:  OUT=... bash bench/gpu_session4_recipe.sh
# Dry run on CPU: LOCAL=1 OUT=/tmp/o EXTRA="--max_steps 3 --max_train_samples 64" bash bench/gpu_session4_recipe.sh
#   (the graphs run then stops at check_cuda_graphs: no GPU)
set -uo pipefail
OUT=${OUT:?set OUT to the folder for logs and metrics}
if [ -z "${LOCAL:-}" ]; then
  source .device-bundle/activate
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pytest-site .device-bundle/pytest-wheels/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt"
else
  ENCODER=${ENCODER:-sentence-transformers/all-MiniLM-L6-v2} DATA_DIR=${DATA_DIR:-../shared/data}
fi
PYTHONPATH=/tmp/pytest-site:${PYTHONPATH:-} timeout 90 python3 -m pytest -q -p no:cacheprovider -W always \
  -k "cuda_recorded or cuda_replays" tests/test_cuda_graphs.py > "$OUT/tests.log" 2>&1
echo "tests exit $?: $(tail -1 "$OUT/tests.log")" >> "$OUT/env.txt"
common="--encoder $ENCODER --data_dir $DATA_DIR --save_strategy no --overwrite_output_dir true --disable_tqdm true
  --bf16 true --optim adamw_torch_fused --pad_to_buckets 16 32 64 ${EXTRA:-}"
runs=/tmp/gpu_session4_runs
start=$(date +%s)
# shellcheck disable=SC2086  # word lists
timeout 200 python3 train.py configs/quick.yaml $common --output_dir "$runs/plain" > "$OUT/plain.log" 2>&1 &
# shellcheck disable=SC2086
timeout 200 python3 train.py configs/quick.yaml $common --cuda_graphs true --output_dir "$runs/graphs" > "$OUT/graphs.log" 2>&1 &
wait
echo "wall seconds for the two concurrent runs: $(( $(date +%s) - start ))" >> "$OUT/env.txt"
for name in plain graphs; do
  cp "$runs/$name/metrics.json" "$OUT/metrics_$name.json" 2>/dev/null || echo "run $name wrote no metrics.json" >> "$OUT/env.txt"
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("metrics_*.json")):
    m = json.loads(f.read_text())
    final = m["final"]
    print(f.stem, "sst2_acc=%.4f" % final["sentiment"]["accuracy"], "question_acc=%.4f" % final["question"]["accuracy"],
          "gold_f1=%.4f" % final.get("question_gold", {}).get("f1_pos", float("nan")),
          "gold_noqm_f1=%.4f" % final.get("question_gold_noqm", {}).get("f1_pos", float("nan")),
          "train_s=%s" % m["train"]["wall_seconds"], "samples/s=%s" % m["train"]["samples_per_second"])
PY
cat "$OUT/env.txt"
grep -h "AccumulateGrad\|CUDA graph\|Error\|error" "$OUT"/*.log | cut -c1-300 | sort | uniq -c | head -20
