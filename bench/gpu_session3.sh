#!/usr/bin/env bash
# Issue 6 on one GPU (~7 minutes cold, ~2 with ONLY_BUCKETS=1 on a warm machine): the stock Trainer against ours
# and the bare loop, both with CUDA graphs (torch.compile mode reduce-overhead), bf16 autocast and a few fixed
# length buckets (16 32 64 128), after a warm-up long enough to meet every bucket first (the "shapes (new when
# timed)" column says whether it did). Phase pad8 reruns session 1's pad8 setting with the long warm-up.
# Ran in session 3 on an H100 (three calls; bench/RESULTS.md, "Session 3: one H100"). Extra runs for a later
# session: EXTRA_RUNS="ours+bf16+compile+buckets+workers2 bare+bf16+compile+buckets+optcompile" adds a phase
# (session 4 measured --cuda_graphs instead: bench/gpu_session4.sh).
# On the device machine, from the repo root, carrying .device-bundle:  OUT=... bash bench/gpu_session3.sh
# Dry run on CPU (figures meaningless): OUT=/tmp/g BENCH_DEVICE=cpu BENCH_STEPS="--steps 3 --warmup_steps 2
#     --max_train_samples 300" ENCODER=<encoder folder> DATA_DIR=../shared/data bash bench/gpu_session3.sh
set -u
OUT=${OUT:?}
[[ -n "${ENCODER:-}" ]] || source .device-bundle/activate
logs=/tmp/gpu-session3-logs; mkdir -p "$logs" "$OUT"
R=$OUT/RESULTS-gpu.md
read -r -a steps <<<"${BENCH_STEPS:---steps 600 --warmup_steps 200}"
bench=(--device "${BENCH_DEVICE:-cuda}" --encoder "$ENCODER" --data_dir "$DATA_DIR" --out "$R" "${steps[@]}"
       --batch_size 32 --compile_mode reduce-overhead --profile_steps 20)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; } > "$OUT/env.txt" 2>&1

phase() {  # name, time cap (s), runs...
  local name=$1 cap=$2; shift 2
  local start=$SECONDS
  timeout "$cap" python3 bench/train_throughput.py "${bench[@]}" --runs "$@" --profile_dir "$logs/profiles-$name" \
    --note "phase $name: CUDA graphs (torch.compile mode reduce-overhead) on the compiled runs" > "$logs/$name.log" 2>&1
  echo "phase $name exit $? after $((SECONDS - start)) s" >> "$OUT/env.txt"
}
phase buckets 270 stock ours+bf16+compile+buckets bare+bf16+compile+buckets stock
[[ -z "${ONLY_BUCKETS:-}" ]] && phase pad8 170 stock ours+bf16+compile+pad8 two_task+bf16+compile+buckets
# shellcheck disable=SC2086  # a list of run names
[[ -n "${EXTRA_RUNS:-}" ]] && phase extra 200 stock $EXTRA_RUNS stock
tar czf "$OUT/logs.tgz" -C "$logs" .
cat "$OUT/env.txt" "$R" 2>/dev/null
grep -h "run .*: {" "$logs"/*.log | cut -c1-400
