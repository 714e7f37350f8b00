#!/usr/bin/env bash
# GPU call 2 (one H100, ~8 minutes): training throughput against the stock Trainer (issue 6: eager and CUDA
# graphs) and the training-strategies comparison on full data (issue 4: one epoch of configs/default.yaml per
# row, the six rows at once on the one GPU, so their samples/s are per process under sharing).
# On the device machine, from the repo root, carrying .device-bundle:  OUT=... bash bench/gpu_session2.sh
set -u
OUT=${OUT:?}
source .device-bundle/activate
logs=/tmp/session2-logs; mkdir -p "$logs"
R=$OUT/RESULTS-gpu.md
bench=(--device cuda --encoder "$ENCODER" --data_dir "$DATA_DIR" --out "$R" --steps 300 --warmup_steps 40 --batch_size 32)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt"

timeout 110 python3 bench/train_throughput.py "${bench[@]}" --runs stock ours ours+bf16 ours+bf16+workers2 two_task \
  --note "eager" > "$logs/train_eager.log" 2>&1; echo "eager exit $?" >> "$OUT/env.txt"
timeout 160 python3 bench/train_throughput.py "${bench[@]}" --runs stock ours+bf16+compile+pad8 \
  --compile_mode reduce-overhead --note "torch.compile reduce-overhead (CUDA graphs)" > "$logs/train_cudagraphs.log" 2>&1
echo "cudagraphs exit $?" >> "$OUT/env.txt"

work=/tmp/strategies
gpu=(--encoder "$ENCODER" --bf16 true --tf32 true --optim adamw_torch_fused --num_train_epochs 1 --disable_tqdm true)
start=$SECONDS
for row in full lower_frozen encoder_frozen linear_probe round_robin temperature; do
  timeout 230 python3 bench/strategies.py --full --data_dir "$DATA_DIR" --runs "$row" --work_dir "$work" -- "${gpu[@]}" \
    > "$logs/strategies_$row.log" 2>&1 &
done
wait
echo "strategies: $((SECONDS - start)) s for six concurrent rows" >> "$OUT/env.txt"
python3 bench/strategies.py --full --data_dir "$DATA_DIR" --work_dir "$work" --reuse --out "$OUT/RESULTS-strategies-gpu.md" \
  -- "${gpu[@]}" > "$logs/strategies_table.log" 2>&1
cp "$work"/*/metrics.json "$logs/" 2>/dev/null; for d in "$work"/*/; do cp "$d/metrics.json" "$logs/metrics_$(basename "$d").json" 2>/dev/null; done
tar czf "$OUT/logs.tgz" -C "$logs" .
cat "$OUT/env.txt" "$R" "$OUT/RESULTS-strategies-gpu.md" 2>/dev/null
