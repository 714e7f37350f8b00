#!/usr/bin/env bash
# The GPU benchmarks in one call: about 6 minutes on one H100, never more than $BUDGET seconds (default 560,
# under the device tool's 600 s per command): each phase is capped by `timeout` and by what is left.
#
# On the device machine, from the repository root, with the bundle (wheels, fp16 encoder copy, data) carried:
#     source .device-bundle/activate && bash bench/gpu.sh
#     source .device-bundle/activate && PHASES=time_to_accuracy bash bench/gpu.sh    # a second call, ~2.5 min
# Results: $OUT/RESULTS-gpu.md (each phase appends its table when it ends) and $OUT/<phase>.log; the tables are
# printed last. The encoder copy is float16 to travel light; every run loads it as float32 weights.
# A dry run on CPU (figures meaningless): BENCH_DEVICE=cpu BENCH_STEPS="--steps 3 --warmup_steps 4
#     --max_train_samples 300" ENCODER=<encoder folder> DATA_DIR=../shared/data bash bench/gpu.sh
set -u
OUT=${OUT:-/tmp/bench-gpu}
BUDGET=${BUDGET:-560}
PHASES=${PHASES:-train_eager train_compile train_cudagraphs inference}
mkdir -p "$OUT"
RESULTS=$OUT/RESULTS-gpu.md
COMMON=(--device "${BENCH_DEVICE:-cuda}" --encoder "${ENCODER:?source .device-bundle/activate first}")
COMMON+=(--data_dir "${DATA_DIR:?}" --out "$RESULTS")
read -r -a STEPS <<<"${BENCH_STEPS:---steps 300 --warmup_steps 40}"
STEPS+=(--batch_size 32)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'datasets', datasets.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

phase() {  # phase NAME CAP COMMAND...: run one benchmark under min(CAP, time left), its output into NAME.log
    local name=$1 cap=$2
    shift 2
    [[ " $PHASES " == *" $name "* ]] || return 0
    local left=$((BUDGET - SECONDS))
    ((left < cap)) && cap=$left
    if ((cap < 30)); then
        echo "== $name skipped: ${left}s of the budget left"
        return 0
    fi
    echo "== $name (limit ${cap}s)"
    local started=$SECONDS
    timeout "$cap" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - started))s"
}

# 1. Eager: the stock Trainer against ours (fp32, bf16 autocast, + 2 dataloader workers) and the two-task run.
phase train_eager 110 python3 bench/train_throughput.py "${COMMON[@]}" "${STEPS[@]}" \
    --runs stock ours ours+bf16 ours+bf16+workers2 two_task --note "eager"
# 2. torch.compile (inductor), lengths padded to multiples of 8 to bound the shapes; stock again for the ratio.
phase train_compile 170 env TORCH_LOGS=recompiles python3 bench/train_throughput.py "${COMMON[@]}" "${STEPS[@]}" \
    --runs stock ours+bf16+compile+pad8 --note "torch.compile, default mode"
# 3. The same with CUDA graphs (reduce-overhead): launches bound this model at batch size 32. Ratio: phase 2's stock.
phase train_cudagraphs 170 env TORCH_LOGS=recompiles python3 bench/train_throughput.py "${COMMON[@]}" \
    "${STEPS[@]}" --runs ours+bf16+compile+pad8 --compile_mode reduce-overhead --note "torch.compile, reduce-overhead"
# 4. Inference: embeddings against sentence-transformers, both heads against one classifier, batch size 64.
phase inference 80 python3 bench/inference.py "${COMMON[@]}" --batch_size 64 --repeats 5
# 5. (PHASES=time_to_accuracy) One epoch of SST-2, stock vs ours: time to 0.88 and the accuracy at equal steps.
phase time_to_accuracy 240 python3 bench/time_to_accuracy.py "${COMMON[@]}" --runs stock ours --until end \
    --eval_steps 100

echo
cat "$RESULTS"
grep -h -B2 -A2 "Error\|error:" "$OUT"/*.log | grep -v "^BENCH_JSON" | tail -30
