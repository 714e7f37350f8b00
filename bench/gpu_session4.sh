#!/usr/bin/env bash
# Issue 6, session 4, on one GPU (~6 minutes cold): --cuda_graphs (forward + backward recorded as one CUDA graph per
# batch shape, cuda_graphs.py) against the stock Trainer, beside session 3's best (torch.compile reduce-overhead).
#   tests   the real-recording tests of tests/test_cuda_graphs.py (skipped on machines without a GPU);
#   graphs  eager model: stock, ours+bf16+buckets (no graphs), ours+bf16+buckets+graphs twice, with workers2, stock;
#   compile stock, session 3's ours+bf16+compile+buckets (reduce-overhead), ours+bf16+compile+buckets+graphs
#           (torch.compile mode default inside our recording), the two-task recipe with graphs, stock.
# Batch 32, 200 warm-up and 600 timed steps, buckets 16 32 64 128. Each phase has a time cap, so a failing phase
# costs its cap and no more.
# On the device machine, from the repo root, carrying .device-bundle:  OUT=... bash bench/gpu_session4.sh
# Dry run on CPU (figures meaningless; graphs are emulated): OUT=/tmp/g BENCH_DEVICE=cpu BENCH_STEPS="--steps 3
#     --warmup_steps 10 --max_train_samples 300" ENCODER=<encoder folder> DATA_DIR=../shared/data bash bench/gpu_session4.sh
set -u
OUT=${OUT:?}
if [[ -z "${ENCODER:-}" ]]; then
  source .device-bundle/activate
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pytest-site .device-bundle/pytest-wheels/*.whl
fi
logs=/tmp/gpu-session4-logs; mkdir -p "$logs" "$OUT"
R=$OUT/RESULTS-gpu.md
read -r -a steps <<<"${BENCH_STEPS:---steps 600 --warmup_steps 200}"
bench=(--device "${BENCH_DEVICE:-cuda}" --encoder "$ENCODER" --data_dir "$DATA_DIR" --out "$R" "${steps[@]}"
       --batch_size 32 --compile_mode reduce-overhead --profile_steps 20)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc
  python3 -c "import torch; print('torch', torch.__version__)"; } > "$OUT/env.txt" 2>&1

phase() {  # name, time cap (s), runs...
  local name=$1 cap=$2; shift 2
  local start=$SECONDS
  timeout "$cap" python3 bench/train_throughput.py "${bench[@]}" --runs "$@" --profile_dir "$logs/profiles-$name" \
    --note "phase $name (session 4)" > "$logs/$name.log" 2>&1
  echo "phase $name exit $? after $((SECONDS - start)) s" >> "$OUT/env.txt"
}
phase graphs 170 stock ours+bf16+buckets ours+bf16+buckets+graphs ours+bf16+buckets+graphs \
  ours+bf16+buckets+graphs+workers2 stock
start=$SECONDS
PYTHONPATH=/tmp/pytest-site:${PYTHONPATH:-} timeout 120 python3 -m pytest -q -p no:cacheprovider \
  -k "cuda_recorded or cuda_replays" tests/test_cuda_graphs.py > "$logs/tests.log" 2>&1
echo "tests exit $? after $((SECONDS - start)) s: $(tail -1 "$logs/tests.log")" >> "$OUT/env.txt"
[[ -z "${SKIP_COMPILE:-}" ]] && phase compile 230 stock ours+bf16+compile+buckets ours+bf16+compile+buckets+graphs \
  two_task+bf16+buckets+graphs stock
tar czf "$OUT/logs.tgz" -C "$logs" .
cat "$OUT/env.txt" "$R" 2>/dev/null
grep -h "run .*: {" "$logs"/*.log | cut -c1-300
tail -5 "$logs/tests.log"
