#!/usr/bin/env bash
# The GPU benchmarks in one call (about 6-8 minutes on one H100, each phase capped by `timeout`).
#
# On the device machine, from the repository root, with the bundle (wheels, fp16 encoder copy, data) carried:
#     source .device-bundle/activate && bash bench/gpu.sh
# Results: $OUT/RESULTS-gpu.md (the tables, appended per phase) and one log per phase; the tables are printed last.
# The encoder copy is float16 to travel light; every run loads it as float32 weights (bf16 only via autocast).
set -u
OUT=${OUT:-/tmp/bench-gpu}
mkdir -p "$OUT"
RESULTS=$OUT/RESULTS-gpu.md
COMMON=(--device "${BENCH_DEVICE:-cuda}" --encoder "${ENCODER:?source .device-bundle/activate first}" --data_dir "${DATA_DIR:?}")
COMMON+=(--out "$RESULTS")
# BENCH_DEVICE=cpu BENCH_STEPS="--steps 2 --warmup_steps 1" checks this script on a CPU machine (figures meaningless).
read -r -a STEPS <<<"${BENCH_STEPS:---steps 300 --warmup_steps 40}"
STEPS+=(--batch_size 32)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__)" | tee -a "$OUT/gpu.txt"

phase() {  # phase NAME SECONDS COMMAND...: run one benchmark under a time limit, its output into NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - started))s"
}

# 1. Eager: the stock Trainer against ours (fp32, then bf16 autocast; dataloader workers), and the two-task run.
phase train_eager 150 python3 bench/train_throughput.py "${COMMON[@]}" "${STEPS[@]}" \
    --runs stock ours ours+bf16 ours+bf16+workers2 two_task --note "eager"
# 2. torch.compile (inductor, dynamic lengths padded to multiples of 8 to bound the shapes), stock again for the ratio.
phase train_compile 200 env TORCH_LOGS=recompiles python3 bench/train_throughput.py "${COMMON[@]}" "${STEPS[@]}" \
    --runs stock ours+bf16+compile+pad8 --note "torch.compile, default mode"
# 3. The same with CUDA graphs (mode reduce-overhead): launch overhead is what bounds this model at batch size 32.
phase train_cudagraphs 200 env TORCH_LOGS=recompiles python3 bench/train_throughput.py "${COMMON[@]}" "${STEPS[@]}" \
    --runs ours+bf16+compile+pad8 --compile_mode reduce-overhead --note "torch.compile, reduce-overhead (CUDA graphs)"
# 4. Inference: embeddings against sentence-transformers, both heads against one classifier, batch size 64.
phase inference 120 python3 bench/inference.py "${COMMON[@]}" --batch_size 64 --repeats 5

echo
cat "$RESULTS"
grep -h -A3 "Traceback\|Error" "$OUT"/*.log | tail -40
