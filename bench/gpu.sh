#!/usr/bin/env bash
# The GPU benchmarks, by named phase. On the device machine, from the repository root, carrying .device-bundle:
#     OUT=/some/dir bash bench/gpu.sh PHASE [PHASE ...]
# Each phase runs under a time cap (and never past $BUDGET seconds in all, default 560: under the device tool's
# 600 s per command), writes its log to $OUT/logs/<phase>.log and appends its table to $OUT/RESULTS-gpu.md.
# Batch size 32 throughout. What each phase measured last is in bench/RESULTS.md.
#
#   throughput      (~4.5 min) eager runs: stock Trainer, ours (fp32, bf16, bf16 + 2 dataloader workers), two
#                   tasks; then stock against ours + bf16 + torch.compile reduce-overhead + pad-to-8.
#                   300 timed steps after 40 warm-up steps.
#   buckets         (~4.5 min) stock, ours and the bare loop, each bf16 + torch.compile reduce-overhead + length
#                   buckets 16 32 64 128, stock again; 600 timed steps after 200 warm-up; profiled.
#   pad8            (~3 min) stock, ours + compile + pad-to-8, two tasks + compile + buckets; as buckets.
#   graphs          (~3 min) --cuda_graphs: stock, ours + bf16 + buckets eager, ours + graphs twice, ours + graphs
#                   + 2 workers, stock; as buckets (profiled).
#   compile         (~4 min) stock, ours + compile reduce-overhead + buckets, ours + compile (mode default) +
#                   --cuda_graphs, two tasks + --cuda_graphs, stock; as buckets.
#   cold            (~2 min) stock, ours + bf16 + buckets + --cuda_graphs, stock, alone in a fresh process.
#   tests           (~20 s) the real-recording tests of tests/test_cuda_graphs.py (skipped without a GPU).
#   recipe          (~5 min) configs/default.yaml three times at once: A round_robin, B round_robin lr 1e-4,
#                   C proportional; bf16, TF32, fused AdamW, 2 dataloader workers. Metrics to $OUT/metrics_*.json.
#   recipe_graphs   (~2 min) configs/quick.yaml with and without --cuda_graphs (bf16, buckets 16 32 64), at once.
#   strategies      (~3 min) one epoch of configs/default.yaml per training strategy, six rows at once.
#   inference       (~1.5 min) embeddings against sentence-transformers, both heads against one classifier.
#   time_to_accuracy (~4 min) one epoch of SST-2, stock vs ours: time to 0.88 and accuracy at equal steps.
#
# Runs sharing the GPU at once (recipe, recipe_graphs, strategies) give accuracies, not speeds.
# Dry run on CPU (figures meaningless; graphs are emulated, the recipe_graphs graphs run stops at its check):
#     LOCAL=1 OUT=/tmp/g BENCH_DEVICE=cpu BENCH_STEPS="--steps 3 --warmup_steps 10 --max_train_samples 300" \
#         EXTRA="--max_steps 3 --max_train_samples 64" bash bench/gpu.sh graphs recipe
set -u
OUT=${OUT:?set OUT to the folder for logs and results}
BUDGET=${BUDGET:-560}
(($#)) || { sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 2; }
PHASES=" $* "
known=" throughput buckets pad8 graphs compile cold tests recipe recipe_graphs strategies inference time_to_accuracy "
for p in "$@"; do [[ "$known" == *" $p "* ]] || { echo "unknown phase '$p'; known:$known" >&2; exit 2; }; done
mkdir -p "$OUT"
logs=$OUT/logs; mkdir -p "$logs"
R=$OUT/RESULTS-gpu.md
if [[ -z "${LOCAL:-}" ]]; then
    source .device-bundle/activate
    GPU_FLAGS=(--bf16 true --tf32 true --optim adamw_torch_fused)
    if [[ -d .device-bundle/pytest-wheels ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pytest-site \
            .device-bundle/pytest-wheels/*.whl
    fi
else
    ENCODER=${ENCODER:-sentence-transformers/all-MiniLM-L6-v2} DATA_DIR=${DATA_DIR:-../shared/data}
    GPU_FLAGS=()
fi
read -r -a EXTRA_FLAGS <<<"${EXTRA:-}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc
  python3 -c "import torch, transformers, datasets, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__)"; } \
    >"$OUT/env.txt" 2>&1

phase() {  # phase NAME CAP COMMAND...: run NAME if asked for, under min(CAP, time left)
    local name=$1 cap=$2
    shift 2
    [[ "$PHASES" == *" $name "* ]] || return 0
    local left=$((BUDGET - SECONDS))
    ((left < cap)) && cap=$left
    if ((cap < 30)); then
        echo "phase $name skipped: ${left} s of the budget left" | tee -a "$OUT/env.txt"
        return 0
    fi
    local started=$SECONDS
    DEADLINE=$((SECONDS + cap))
    if declare -F "$1" >/dev/null; then  # a function: each command inside is capped by what is left (capped)
        "$@" >"$logs/$name.log" 2>&1
    else
        timeout "$cap" "$@" >"$logs/$name.log" 2>&1
    fi
    echo "phase $name exit $? after $((SECONDS - started)) s" | tee -a "$OUT/env.txt"
}
in_phases() { [[ "$PHASES" == *" $1 "* ]]; }
capped() { timeout "$((DEADLINE - SECONDS > 1 ? DEADLINE - SECONDS : 1))" "$@"; }  # inside a function phase

COMMON=(--device "${BENCH_DEVICE:-cuda}" --encoder "$ENCODER" --data_dir "$DATA_DIR" --out "$R")
read -r -a SHORT <<<"${BENCH_STEPS:---steps 300 --warmup_steps 40}"
read -r -a LONG <<<"${BENCH_STEPS:---steps 600 --warmup_steps 200}"
throughput=(python3 bench/train_throughput.py "${COMMON[@]}" --batch_size 32)
long=("${throughput[@]}" "${LONG[@]}" --compile_mode reduce-overhead --profile_steps 20)

throughput_phase() {
    capped "${throughput[@]}" "${SHORT[@]}" --runs stock ours ours+bf16 ours+bf16+workers2 two_task --note eager
    capped "${throughput[@]}" "${SHORT[@]}" --runs stock ours+bf16+compile+pad8 --compile_mode reduce-overhead \
            --note "torch.compile reduce-overhead (CUDA graphs)"
}
phase throughput 280 throughput_phase
phase buckets 270 "${long[@]}" --profile_dir "$logs/profiles-buckets" --note "phase buckets" \
    --runs stock ours+bf16+compile+buckets bare+bf16+compile+buckets stock
phase pad8 170 "${long[@]}" --profile_dir "$logs/profiles-pad8" --note "phase pad8" \
    --runs stock ours+bf16+compile+pad8 two_task+bf16+compile+buckets
phase graphs 170 "${long[@]}" --profile_dir "$logs/profiles-graphs" --note "phase graphs" \
    --runs stock ours+bf16+buckets ours+bf16+buckets+graphs ours+bf16+buckets+graphs \
    ours+bf16+buckets+graphs+workers2 stock
phase cold 120 "${throughput[@]}" "${LONG[@]}" --note "phase cold: a fresh process" \
    --runs stock ours+bf16+buckets+graphs stock
phase tests 120 env PYTHONPATH="/tmp/pytest-site:${PYTHONPATH:-}" python3 -m pytest -q -p no:cacheprovider \
    -W always -k "cuda_recorded or cuda_replays" tests/test_cuda_graphs.py
phase compile 230 "${long[@]}" --profile_dir "$logs/profiles-compile" --note "phase compile" \
    --runs stock ours+bf16+compile+buckets ours+bf16+compile+buckets+graphs two_task+bf16+buckets+graphs stock

summarise() {  # the final metrics of each $OUT/metrics_*.json
    python3 - "$OUT" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("metrics_*.json")):
    m = json.loads(f.read_text())
    final = m["final"]
    print(f.stem, "sst2_acc=%.4f" % final["sentiment"]["accuracy"], "question_acc=%.4f" % final["question"]["accuracy"],
          "gold_f1=%.4f" % final.get("question_gold", {}).get("f1_pos", float("nan")),
          "gold_noqm_f1=%.4f" % final.get("question_gold_noqm", {}).get("f1_pos", float("nan")),
          "train_s=%s" % m["train"]["wall_seconds"], "samples/s=%s" % m["train"]["samples_per_second"],
          "epochs:", [round(r["eval"].get("sentiment", {}).get("accuracy", float("nan")), 4) for r in m["epochs"]])
PY
}
train_common=(--encoder "$ENCODER" --data_dir "$DATA_DIR" --save_strategy no --overwrite_output_dir true
              --disable_tqdm true)
recipe_phase() {  # three variants of the full recipe at once; the GPU is launch-bound, so they share it well
    local runs=/tmp/gpu_recipe_runs
    declare -A variant=([A]="--task_sampling round_robin" [B]="--task_sampling round_robin --learning_rate 1e-4"
                        [C]="--task_sampling proportional")
    local name
    for name in A B C; do
        # shellcheck disable=SC2086  # a word list
        capped python3 train.py configs/default.yaml "${train_common[@]}" "${GPU_FLAGS[@]}" --dataloader_num_workers 2 \
            ${variant[$name]} "${EXTRA_FLAGS[@]}" --output_dir "$runs/$name" >"$logs/recipe_$name.log" 2>&1 &
    done
    wait
    for name in A B C; do cp "$runs/$name/metrics.json" "$OUT/metrics_recipe_$name.json" 2>/dev/null; done
    summarise
}
phase recipe 400 recipe_phase
recipe_graphs_phase() {  # the same seed with and without --cuda_graphs; at once, so no speed comparison
    local runs=/tmp/gpu_recipe_graphs_runs
    local flags=("${train_common[@]}" --bf16 true --optim adamw_torch_fused --pad_to_buckets 16 32 64 "${EXTRA_FLAGS[@]}")
    capped python3 train.py configs/quick.yaml "${flags[@]}" --output_dir "$runs/plain" >"$logs/recipe_plain.log" 2>&1 &
    capped python3 train.py configs/quick.yaml "${flags[@]}" --cuda_graphs true --output_dir "$runs/graphs" \
        >"$logs/recipe_graphs.log" 2>&1 &
    wait
    for name in plain graphs; do cp "$runs/$name/metrics.json" "$OUT/metrics_recipe_$name.json" 2>/dev/null; done
    summarise
}
phase recipe_graphs 200 recipe_graphs_phase
strategies_phase() {  # six rows at once on the one GPU: their samples/s are per process under sharing
    local work=/tmp/strategies row
    local flags=(--encoder "$ENCODER" "${GPU_FLAGS[@]}" --num_train_epochs 1 --disable_tqdm true "${EXTRA_FLAGS[@]}")
    for row in full lower_frozen encoder_frozen linear_probe round_robin temperature; do
        capped python3 bench/strategies.py --full --data_dir "$DATA_DIR" --runs "$row" --work_dir "$work" -- "${flags[@]}" \
            >"$logs/strategies_$row.log" 2>&1 &
    done
    wait
    capped python3 bench/strategies.py --full --data_dir "$DATA_DIR" --work_dir "$work" --reuse \
        --out "$OUT/RESULTS-strategies-gpu.md" -- "${flags[@]}"
    for d in "$work"/*/; do cp "$d/metrics.json" "$OUT/metrics_strategies_$(basename "$d").json" 2>/dev/null; done
}
phase strategies 240 strategies_phase
phase inference 80 python3 bench/inference.py "${COMMON[@]}" --batch_size 64 --repeats 5
phase time_to_accuracy 240 python3 bench/time_to_accuracy.py "${COMMON[@]}" --runs stock ours --until end \
    --eval_steps 100

tar czf "$OUT/logs.tgz" -C "$logs" . 2>/dev/null
cat "$OUT/env.txt" "$R" "$OUT/RESULTS-strategies-gpu.md" 2>/dev/null
in_phases recipe || in_phases recipe_graphs && summarise
grep -h "run .*: {" "$logs"/*.log 2>/dev/null | cut -c1-300
grep -h -B2 -A2 "Error\|error:" "$logs"/*.log 2>/dev/null | grep -v "^BENCH_JSON" | tail -30
