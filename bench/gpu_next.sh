#!/usr/bin/env bash
# Prepared for the next session that is lent a GPU (not run yet; ~6 minutes on one H100/H200): where the
# remaining gap to the issue-6 aim (>= 4x the stock Trainer at batch 32) sits. Each call compares, in one
# process, the stock Trainer, ours (MultiTaskTrainer) and `bare` (our model, batches and update in a plain
# PyTorch loop, no Trainer): `ours` minus `bare` is what the Trainer loop costs per step on that host.
# Each run also profiles 20 steps after its timed ones (top operators, launches per step: $OUT/profiles/).
# A second compiled run in one process reuses the first one's compilation: read its warm-up column with that in mind.
# On the device machine, from the repo root, carrying .device-bundle:  OUT=... bash bench/gpu_next.sh
# A dry run on CPU (figures meaningless): OUT=/tmp/g BENCH_DEVICE=cpu BENCH_STEPS="--steps 3 --warmup_steps 2
#     --max_train_samples 300" ENCODER=<encoder folder> DATA_DIR=../shared/data bash bench/gpu_next.sh
set -u
OUT=${OUT:?}
[[ -n "${ENCODER:-}" ]] || source .device-bundle/activate
logs=/tmp/gpu-next-logs; mkdir -p "$logs" "$OUT"
R=$OUT/RESULTS-gpu.md
read -r -a steps <<<"${BENCH_STEPS:---steps 300 --warmup_steps 40}"
bench=(--device "${BENCH_DEVICE:-cuda}" --encoder "$ENCODER" --data_dir "$DATA_DIR" --out "$R" "${steps[@]}" --batch_size 32)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt" 2>&1

timeout 120 python3 bench/train_throughput.py "${bench[@]}" --runs stock ours bare \
  --profile_steps 20 --profile_dir "$OUT/profiles/eager" --note "eager fp32" > "$logs/eager.log" 2>&1; echo "eager exit $?" >> "$OUT/env.txt"
timeout 240 python3 bench/train_throughput.py "${bench[@]}" --compile_mode reduce-overhead \
  --runs stock ours+bf16+compile+pad8 bare+bf16+compile+pad8 ours+bf16+compile+pad16 \
  --profile_steps 20 --profile_dir "$OUT/profiles/cudagraphs" --note "torch.compile reduce-overhead (CUDA graphs)" > "$logs/cudagraphs.log" 2>&1
echo "cudagraphs exit $?" >> "$OUT/env.txt"
timeout 90 python3 bench/train_throughput.py "${bench[@]}" --overhead_probe --runs stock ours bare \
  --note "overhead probe on the GPU host" > "$logs/probe.log" 2>&1; echo "probe exit $?" >> "$OUT/env.txt"
tar czf "$OUT/logs.tgz" -C "$logs" .
cat "$OUT/env.txt" "$R" 2>/dev/null
