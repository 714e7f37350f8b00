"""The benchmark scripts run end to end on the tiny encoder and report what they claim (not timed: the figures
themselves are only meaningful on a quiet machine, see docs/performance.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def bench_json(captured: str) -> dict:
    lines = [line for line in captured.splitlines() if line.startswith("BENCH_JSON ")]
    assert len(lines) == 1
    return json.loads(lines[0].removeprefix("BENCH_JSON "))


def test_train_throughput_measures_every_run_on_the_same_rows(tiny_encoder_dir, tiny_data_dir, tmp_path, capsys):
    import train_throughput

    out = tmp_path / "RESULTS.md"
    runs = ["stock", "ours", "two_task", "ours+nogroup+pad8", "ours+buckets"]
    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(tiny_data_dir), "--device", "cpu", "--out", str(out)]
    argv += ["--steps", "2", "--warmup_steps", "1", "--max_train_samples", "128", "--runs", *runs]
    result = train_throughput.main([*argv, "--pad_buckets", "16", "8"])
    by_run = {r["run"]: r for r in result["results"]}
    assert list(by_run) == runs
    for r in by_run.values():
        assert "error" not in r, r
        assert r["samples_per_second"] > 0 and r["peak_memory_mb"] > 0
    assert by_run["stock"]["ratio_vs_stock"] == 1.0
    # Length grouping is what removes the padding of random batches (seeded: the same shares every time).
    assert by_run["ours"]["padding_share"] < by_run["stock"]["padding_share"] - 0.1
    assert by_run["ours+nogroup+pad8"]["padding_share"] > by_run["ours"]["padding_share"]
    assert by_run["ours+nogroup+pad8"]["settings"]["pad_to_multiple_of"] == 8
    # The modifier reaches our collator (its bucketing is tested in test_data.py); buckets pad more than `ours`.
    assert list(by_run["ours+buckets"]["settings"]["pad_to_buckets"]) == [8, 16]
    assert by_run["ours+buckets"]["padding_share"] > by_run["ours"]["padding_share"]
    for r in by_run.values():  # three batches: each shape was met in warm-up (step 1) or the timed steps 2-3
        assert 1 <= r["shapes"] <= 3 and r["shapes"] - 1 == r["shapes_first_timed"]
    assert bench_json(capsys.readouterr().out)["results"] == json.loads(json.dumps(result["results"]))
    written = out.read_text()
    assert "### Training throughput (cpu)" in written and "| `two_task` |" in written
    assert "command: `python" in written and "torch 2." in written


def test_bare_loop_and_overhead_probe_take_the_same_batches_as_ours(tiny_encoder_dir, tiny_data_dir, tmp_path):
    import train_throughput

    out = tmp_path / "RESULTS.md"
    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(tiny_data_dir), "--device", "cpu", "--out", str(out)]
    argv += ["--steps", "3", "--warmup_steps", "1", "--max_train_samples", "128", "--runs", "ours", "bare"]
    result = train_throughput.main([*argv, "--overhead_probe"])
    ours, bare = result["results"]
    assert "error" not in ours and "error" not in bare, result["results"]
    # Same sampler, seed and collator: the same batches, hence the same padded positions.
    assert bare["padding_share"] == ours["padding_share"]
    # Same initial weights, rows, schedule and update rule; only dropout masks differ between the two loops.
    assert bare["train_loss"] == pytest.approx(ours["train_loss"], abs=0.05)
    assert "reshaped by --overhead_probe (random, 8 wide, 1 head)" in out.read_text()


def test_bare_loop_with_a_compiled_update_trains_like_the_plain_one(tiny_encoder_dir, tiny_data_dir):
    """`optcompile` (an experiment for the GPU: clipping and AdamW under torch.compile, tensor learning rate) must
    be the same update rule, so its figure compares like with like."""
    import train_throughput

    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(tiny_data_dir), "--device", "cpu"]
    argv += ["--steps", "3", "--warmup_steps", "1", "--max_train_samples", "128", "--learning_rate", "1e-2"]
    argv += ["--runs", "bare", "bare+optcompile"]
    plain, compiled = train_throughput.main(argv)["results"]
    assert "error" not in plain and "error" not in compiled, (plain, compiled)
    assert compiled["settings"]["optcompile"] and not plain["settings"]["optcompile"]
    # A large rate, so that a different or skipped update would show in the mean loss of steps 2-4.
    assert compiled["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-4)
    with pytest.raises(ValueError, match="optcompile is an experiment of the bare loop only"):
        train_throughput.main(["--encoder", str(tiny_encoder_dir), "--runs", "ours+optcompile"])


def test_profile_window_writes_each_runs_operators_without_touching_the_timed_steps(
    tiny_encoder_dir, tiny_data_dir, tmp_path
):
    import train_throughput

    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(tiny_data_dir), "--device", "cpu"]
    argv += ["--steps", "2", "--warmup_steps", "1", "--max_train_samples", "128", "--runs", "ours", "bare"]
    result = train_throughput.main([*argv, "--profile_steps", "2", "--profile_dir", str(tmp_path / "profiles")])
    assert all("error" not in r for r in result["results"]), result["results"]
    for run in ("ours", "bare"):
        text = (tmp_path / "profiles" / f"{run}.txt").read_text()
        assert text.startswith("steps 4..5 (2 steps, after the timed ones)")
        operators = int(text.splitlines()[1].rsplit(":", 1)[1])
        assert operators > 50  # a forward and backward through a 2-layer BERT and an optimizer step
        assert "aten::addmm" in text or "aten::linear" in text


def test_overhead_probe_keeps_the_structure_and_shrinks_the_width(tiny_encoder_dir, tmp_path):
    import json

    import train_throughput

    folder = train_throughput.overhead_probe_encoder(str(tiny_encoder_dir), str(tmp_path / "probe"))
    original = json.loads((tiny_encoder_dir / "config.json").read_text())
    probe = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert probe["num_hidden_layers"] == original["num_hidden_layers"]
    assert (probe["num_attention_heads"], probe["hidden_size"]) == (1, 8) and original["hidden_size"] > 8
    assert probe["intermediate_size"] == 4 * probe["hidden_size"]
    assert (Path(folder) / "model.safetensors").exists() and (Path(folder) / "tokenizer_config.json").exists()


def test_train_throughput_graphs_run_records_and_trains_like_ours(
    tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch
):
    """`graphs` (--cuda_graphs) on a CPU is emulated: the same losses as `ours`, with recordings and replays."""
    import train
    import train_throughput

    monkeypatch.setattr(train.MultiTaskTrainer, "emulate_cuda_graphs", False)  # restored after the bench sets it
    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(tiny_data_dir), "--device", "cpu"]
    argv += ["--out", str(tmp_path / "R.md"), "--steps", "4", "--warmup_steps", "4", "--max_train_samples", "128"]
    result = train_throughput.main([*argv, "--pad_buckets", "64", "--runs", "ours+buckets", "ours+buckets+graphs"])
    plain, graphs = result["results"]
    assert graphs["settings"]["cuda_graphs"] and "cuda_graphs" not in plain
    assert graphs["cuda_graphs"]["graphs"] >= 1 and graphs["cuda_graphs"]["replays"] >= 1
    assert sum(graphs["cuda_graphs"].values()) - graphs["cuda_graphs"]["graphs"] == 8  # every step ran once
    assert graphs["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)


def test_train_throughput_rejects_an_unknown_run(tiny_encoder_dir):
    import train_throughput

    with pytest.raises(ValueError, match="unknown modifier 'fp8'"):
        train_throughput.main(["--encoder", str(tiny_encoder_dir), "--runs", "ours+fp8"])
    with pytest.raises(ValueError, match="DataCollatorWithPadding has no length buckets; use pad<N>"):
        train_throughput.main(["--encoder", str(tiny_encoder_dir), "--runs", "stock+buckets"])
    with pytest.raises(ValueError, match=r"graphs \(--cuda_graphs\) is an option of our Trainer"):
        train_throughput.main(["--encoder", str(tiny_encoder_dir), "--runs", "stock+graphs"])


def test_counting_collator_reports_shapes_first_met_in_the_timed_steps():
    import train_throughput

    import data as mtdata

    collator = train_throughput.CountingCollator(mtdata.MultiTaskCollator(pad_token_id=0))
    for length in (3, 3, 5, 3, 7, 5, 9):  # batches 0..6: steps 1..7
        collator([{"input_ids": [1] * length}])
    # Warm-up steps 1-2 met length 3; timed steps 3-6 met 5 and 7 first; 9 (step 7) is after the timed window.
    assert collator.shapes(warmup=2, steps=4) == (3, 2)
    assert collator.shapes(warmup=5, steps=1) == (3, 0)  # 5 and 7 were met during warm-up
    assert collator.shapes(warmup=5, steps=2) == (4, 1)


@pytest.mark.parametrize("script", ["train_throughput", "time_to_accuracy"])
def test_training_benchmarks_refuse_tf32_on_a_cpu_before_loading_anything(script, tmp_path):
    import importlib

    bench = importlib.import_module(script)
    argv = ["--encoder", str(tmp_path / "no-encoder-here"), "--device", "cpu", "--runs", "ours+tf32"]
    with pytest.raises(ValueError, match=r"tf32 is a GPU setting; drop it \(and --tf32\) on CPU"):
        bench.main(argv)


def test_time_to_accuracy_stops_at_the_target(tiny_encoder_dir, tiny_data_dir, capsys):
    import time_to_accuracy

    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(tiny_data_dir), "--device", "cpu"]
    argv += ["--max_train_samples", "128", "--max_eval_samples", "32", "--max_steps", "4", "--eval_steps", "2"]
    reached = time_to_accuracy.main(argv + ["--target", "0.0"])["results"]
    for r in reached:
        assert "error" not in r, r
        assert r["eval_rows"] == 32  # both evaluate on the same --max_eval_samples validation rows
        assert r["reached"]["step"] == 2 and r["steps_done"] == 2  # stopped at the first evaluation
        assert r["reached"]["train_seconds"] > 0
    (never,) = time_to_accuracy.main(argv + ["--runs", "ours", "--target", "1.01", "--until", "end"])["results"]
    assert never["reached"] is None and never["steps_done"] == 4
    assert [p["step"] for p in never["history"]] == [2, 4]
    assert never["final_accuracy"] == never["history"][-1]["accuracy"]
    assert "| `ours` | not reached in 4 steps |" in capsys.readouterr().out


def test_time_to_accuracy_honours_the_time_limit(tiny_encoder_dir, tiny_data_dir, capsys):
    import time_to_accuracy

    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(tiny_data_dir), "--device", "cpu", "--runs", "ours"]
    argv += ["--max_train_samples", "128", "--max_eval_samples", "32", "--max_steps", "4", "--max_minutes", "0"]
    (r,) = time_to_accuracy.main(argv)["results"]
    assert r["timed_out"] and r["steps_done"] == 1 and r["reached"] is None
    assert "not reached in 0 min" in capsys.readouterr().out


def test_inference_compares_like_with_like(tiny_encoder_dir, shared_data_dir):
    import inference

    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(shared_data_dir), "--device", "cpu"]
    result = inference.main(argv + ["--max_texts", "40", "--batch_size", "16", "--repeats", "1"])
    assert [r["run"] for r in result["results"]] == list(inference.RUNS)
    assert all(r["texts"] == 40 and r["texts_per_second"] > 0 for r in result["results"])
    assert set(result["ratios"]) == {
        "embeddings_per_second_ours_vs_st",
        "embeddings_per_second_ours_onnx_vs_st",
        "embeddings_per_second_ours_onnx_vs_st_onnx",
        "embeddings_per_second_ours_onnx_vs_ours_torch",
        "embeddings_per_second_int8_vs_ours_onnx",
        "embeddings_per_second_ours_onnx_int8_vs_st",
        "time_both_tasks_vs_single_task",
    }
    # Same encoder, same pooling: our embeddings (torch and ONNX) and the ONNX stand-in's are sentence-transformers'.
    assert set(result["embedding_max_abs_diff_vs_st"]) == {"st_onnx", "ours_embed", "ours_onnx"}
    assert max(result["embedding_max_abs_diff_vs_st"].values()) < 1e-4
    assert max(result["onnx_max_abs_diff_vs_torch"].values()) <= 1e-4
    assert set(result["int8_agreement"]) >= {"label_agreement.sentiment", "embedding_cosine_mean"}
    # The float32 bound: linear-layer FLOPs over the padded batches, over a measured matmul speed.
    bound = result["fp32_bound"]
    assert bound["padded_tokens"] >= sum(len(t.split()) for t in inference.load_texts(str(shared_data_dir), 40))
    assert bound["matmul_gflops"] > 0 and bound["texts_per_second_bound"] > 0
    for r in result["results"]:
        assert r["linear_gflops_per_second"] == pytest.approx(bound["linear_gflop_per_pass"] / r["seconds_median"])


# What bench/st_onnx_worker.py imports, for a test environment without optimum-onnx: sentence-transformers' API with
# mean pooling done by transformers, so its embeddings are sentence-transformers' own.
FAKE_ST_ONNX = """
import os

import torch
from transformers import AutoModel, AutoTokenizer

__version__ = "fake"


class SentenceTransformer:
    def __init__(self, path, backend="torch", device="cpu", model_kwargs=None):
        assert backend == "onnx"
        if model_kwargs:  # the int8 file export_dynamic_quantized_onnx_model wrote
            assert os.path.isfile(os.path.join(path, model_kwargs["file_name"]))
        self.tokenizer, self.auto_model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def save_pretrained(self, path):
        self.tokenizer.save_pretrained(path)
        self.auto_model.save_pretrained(path)

    def __getitem__(self, i):
        return self

    @torch.no_grad()
    def encode(self, texts, batch_size=32, show_progress_bar=False):
        batch = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        hidden = self.auto_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def export_dynamic_quantized_onnx_model(model, quantization_config, model_name_or_path):
    assert quantization_config == "avx512_vnni"
    os.makedirs(os.path.join(model_name_or_path, "onnx"), exist_ok=True)
    open(os.path.join(model_name_or_path, "onnx", "model_qint8_avx512_vnni.onnx"), "w").close()
"""


def test_inference_runs_sentence_transformers_onnx_backend_in_a_second_interpreter(
    tiny_encoder_dir, shared_data_dir, tmp_path, monkeypatch
):
    import sys

    import inference

    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(shared_data_dir), "--device", "cpu"]
    argv += ["--max_texts", "24", "--batch_size", "8", "--repeats", "2", "--runs", "st_encode", "st_onnx_backend"]
    with pytest.raises(ValueError, match="needs --st_onnx_python.*make st-onnx-venv"):
        inference.main(argv)

    stub = tmp_path / "stub"
    (stub / "sentence_transformers").mkdir(parents=True)
    (stub / "sentence_transformers" / "__init__.py").write_text(FAKE_ST_ONNX)
    (stub / "optimum").mkdir()
    (stub / "optimum" / "__init__.py").write_text("")
    (stub / "optimum" / "version.py").write_text("__version__ = 'fake'\n")
    monkeypatch.setenv("PYTHONPATH", str(stub))
    result = inference.main(argv + ["--st_onnx_python", sys.executable])
    by_run = {r["run"]: r for r in result["results"]}
    assert by_run["st_onnx_backend"]["texts"] == 24 and len(by_run["st_onnx_backend"]["seconds_all"]) == 2
    assert by_run["st_onnx_backend"]["peak_memory_mb"] > 0 and by_run["st_onnx_backend"]["memory_growth_mb"] is None
    assert set(result["ratios"]) == {"embeddings_per_second_st_onnx_backend_vs_st"}
    assert result["setting"]["st_onnx_backend"]["versions"]["optimum"] == "fake"
    # The worker's embeddings come back through its .npy file: the same maths as sentence-transformers' encode().
    assert result["embedding_max_abs_diff_vs_st"]["st_onnx_backend"] < 1e-4

    # Its int8 copy, in a worker of its own, against ours.
    argv[argv.index("st_onnx_backend")] = "st_onnx_backend_int8"
    result = inference.main(argv + ["ours_onnx", "ours_onnx_int8", "--st_onnx_python", sys.executable])
    assert [r["run"] for r in result["results"]] == ["st_encode", "st_onnx_backend_int8", "ours_onnx", "ours_onnx_int8"]
    assert {
        "embeddings_per_second_st_onnx_backend_int8_vs_st",
        "embeddings_per_second_ours_onnx_int8_vs_st_onnx_backend_int8",
    } <= set(result["ratios"])
    assert set(result["setting"]) >= {"st_onnx_backend_int8"}
    # The fake "int8" copy is the float model: its embeddings are sentence-transformers' own.
    assert result["int8_agreement"]["st_embedding_cosine_min"] > 0.9999


def test_inference_says_how_to_build_the_second_environment_when_the_worker_fails(
    tiny_encoder_dir, shared_data_dir, tmp_path
):
    import inference

    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'No module named optimum' >&2\nexit 1\n")
    broken.chmod(0o755)
    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(shared_data_dir), "--device", "cpu"]
    argv += ["--max_texts", "8", "--runs", "st_onnx_backend", "--st_onnx_python", str(broken)]
    with pytest.raises(RuntimeError, match="exited \\(code 1\\).*make st-onnx-venv"):
        inference.main(argv)


def test_inference_stream_measures_predict_py_on_stdin(tiny_encoder_dir, shared_data_dir):
    import inference

    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(shared_data_dir), "--device", "cpu"]
    result = inference.main(argv + ["--stream_lines", "300", "--batch_size", "16", "--backends", "torch", "onnx"])
    for run in result["results"]:
        assert run["exit_code"] == 0 and run["lines_written"] == 300 and run["stopped_at_limit_seconds"] is None
        assert 0 < run["first_line_seconds"] < run["total_seconds"] and run["peak_rss_mb"] > 0


def test_inference_texts_are_sst2_validation_and_trec_test(shared_data_dir):
    import pandas as pd

    import inference

    texts = inference.load_texts(str(shared_data_dir), None)
    sst2 = pd.read_parquet(shared_data_dir / "sst2" / "validation.parquet")["sentence"].tolist()
    trec = pd.read_parquet(shared_data_dir / "trec" / "test.parquet")["text"].tolist()
    assert texts == sst2 + trec


def test_eval_order_reports_the_same_metrics_with_less_padding(tiny_encoder_dir, tiny_data_dir, capsys, tmp_path):
    import tempfile

    import eval_order

    (tmp_path / "temp").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
        argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(tiny_data_dir), "--max_rows", "60"]
        result = eval_order.main(argv + ["--batch_size", "8", "--max_seq_length", "32"])
    assert list((tmp_path / "temp").iterdir()) == []  # the Trainer's scratch output_dir is removed
    assert result["rows"] == 60  # the gold set, capped by max_gold_eval_samples
    assert result["max_metric_difference"] < 1e-5
    assert result["padded_tokens"]["sorted"] < result["padded_tokens"]["unsorted"]
    assert result["rows_seen"]["unsorted"] == result["rows_seen"]["sorted"] == 60
    assert result["rows_seen"]["sorted_distinct"] <= 60  # the tiny gold set may hold no repeated turn
    assert result["rows_seen"]["shared"] == result["rows_seen"]["sorted_distinct"]  # one set: nothing to share
    assert bench_json(capsys.readouterr().out)["rows"] == 60


def test_eval_order_removes_its_scratch_folder_when_an_evaluation_fails(tiny_encoder_dir, tiny_data_dir, tmp_path):
    import tempfile

    import eval_order
    from trainer import MultiTaskTrainer

    def broken_evaluate(self, *args, **kwargs):
        raise RuntimeError("evaluation broke")

    (tmp_path / "temp").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
        patch.setattr(MultiTaskTrainer, "evaluate", broken_evaluate)
        argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(tiny_data_dir), "--max_rows", "60"]
        with pytest.raises(RuntimeError, match="evaluation broke"):
            eval_order.main(argv + ["--batch_size", "8", "--max_seq_length", "32"])
    assert list((tmp_path / "temp").iterdir()) == []


def test_eval_order_shares_the_inputs_of_a_gold_set_and_its_qmark_free_view(tiny_encoder_dir, tiny_data_dir):
    import eval_order

    argv = ["--encoder", str(tiny_encoder_dir), "--data_dir", str(tiny_data_dir), "--max_rows", "60"]
    views = ["--gold_set", "question_gold", "question_gold_noqm", "--ways", "sorted_distinct", "shared"]
    result = eval_order.main(argv + ["--batch_size", "8", "--max_seq_length", "32", "--repeats", "1", *views])
    assert result["gold_sets"] == ["question_gold", "question_gold_noqm"] and result["rows"] == 120
    assert set(result["rows_seen"]) == {"sorted_distinct", "shared"}
    # the ?-free view runs only the rows that had a '?'; the metrics are the same
    assert result["rows_seen"]["shared"] < result["rows_seen"]["sorted_distinct"]
    assert result["max_metric_difference"] < 1e-5
    assert set(result["metrics"]) >= {"eval_question_gold_f1_pos", "eval_question_gold_noqm_f1_pos"}


def test_quantization_scores_every_eval_set_of_each_graph(tiny_encoder_dir, shared_data_dir, tmp_path):
    from transformers import AutoTokenizer

    import data as mtdata
    import quantization
    from modeling_multitask import MultiTaskModel

    tasks = [t.to_config() for t in mtdata.get_tasks(["sentiment", "question"])]
    folder = tmp_path / "run"
    MultiTaskModel.from_encoder(str(tiny_encoder_dir), tasks=tasks).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(folder)
    argv = [str(folder), "--data_dir", str(shared_data_dir), "--max_texts", "32", "--batch_size", "16"]
    result = quantization.main(argv + ["--repeats", "1"])
    assert not (folder / "onnx").exists()  # the graphs are made from a copy
    by_graph = {r["graph"]: r for r in result["results"]}
    assert list(by_graph) == ["float32", "int8", "int8_keep_ffn_output"]
    sets = {"sentiment", "question_gold", "question_gold_noqm", "question_swda", "question_swda_noqm"}
    for r in by_graph.values():
        assert set(r["scores"]) == sets and r["texts_per_second"] > 0
        assert r["scores"]["sentiment"]["metric"] == "accuracy" and r["scores"]["question_swda"]["metric"] == "f1_pos"
        assert all(0 <= s["value"] <= 1 for s in r["scores"].values())
    assert by_graph["float32"]["embedding_cosine_min"] == pytest.approx(1.0)
    assert by_graph["float32"]["same_labels"] == 1.0 and by_graph["float32"]["speed_vs_float32"] == 1.0
    for name in ("int8", "int8_keep_ffn_output"):
        assert 0.9 < by_graph[name]["embedding_cosine_min"] < 1.0  # quantized, and still the same embedding


def test_weight_averages_follow_their_definitions():
    from types import SimpleNamespace

    import torch
    import weight_averaging

    model = torch.nn.Linear(1, 1, bias=False)
    averages = weight_averaging.Averages(model, decays=[0.5], tails=[0.5])
    for step, weight in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            model.weight.fill_(weight)
        averages.on_step_end(None, SimpleNamespace(global_step=step, max_steps=4), None)
    ema = averages.averages["EMA, decay 0.5"].module.weight.item()
    assert ema == ((1.0 * 0.5 + 2.0 * 0.5) * 0.5 + 4.0 * 0.5) * 0.5 + 8.0 * 0.5  # starts from the first step's weights
    assert averages.averages["uniform, last 50% of steps"].module.weight.item() == (4.0 + 8.0) / 2
    averages.load_into_model("EMA, decay 0.5")
    assert model.weight.item() == ema


def test_weight_averaging_scores_each_average_beside_the_final_weights(
    tiny_encoder_dir, tiny_data_dir, tmp_path, capsys
):
    import weight_averaging
    from helpers import tiny_argv

    argv = ["--decays", "1e-9,0.9", "--tails", "1e-9", "--out", str(tmp_path / "RESULTS.md")]
    result = weight_averaging.main(argv + tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "run"))
    rows = result["rows"]
    assert list(rows) == [
        "final weights (as saved)", "EMA, decay 1e-09", "EMA, decay 0.9", "uniform, last 0% of steps"
    ]  # fmt: skip
    assert set(rows["final weights (as saved)"]) == {"sentiment", "question"}
    # an EMA that forgets at once and a tail of only the last step are the final weights, evaluated again
    assert rows["EMA, decay 1e-09"] == rows["final weights (as saved)"]
    assert rows["uniform, last 0% of steps"] == rows["final weights (as saved)"]
    assert bench_json(capsys.readouterr().out)["rows"] == rows
    assert "| EMA, decay 0.9 |" in (tmp_path / "RESULTS.md").read_text()


def test_weight_averaging_refuses_a_decay_outside_zero_one(capsys):
    import weight_averaging

    with pytest.raises(SystemExit):
        weight_averaging.main(["configs/quick.yaml", "--decays", "0.99,1.5"])
    assert "--decays 0.99,1.5: '1.5' must be a number in (0, 1)" in capsys.readouterr().err


def test_learning_rates_give_each_layer_and_the_heads_their_rate(tiny_encoder_dir, tiny_data_dir, tmp_path, capsys):
    import learning_rates
    from helpers import tiny_argv

    import freezing

    flags = ["--max_steps", "2", "--learning_rate", "1e-4", "--weight_decay", "0.01"]
    argv = ["--layerwise_lr_decay", "0.5", "--head_learning_rate", "3e-3"]
    built = learning_rates.main(argv + tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "run", *flags))
    trainer = built["trainer"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    rate = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    layers = freezing.encoder_layers(model)
    depth = len(layers)
    assert depth >= 2
    for i, layer in enumerate(layers):  # the top layer at the base rate, halved per layer down
        params = list(layer.parameters())
        assert [rate[id(p)] for p in params] == pytest.approx([1e-4 * 0.5 ** (depth - 1 - i)] * len(params))
    embeddings = [rate[id(p)] for p in model.encoder.embeddings.parameters()]
    assert embeddings == pytest.approx([1e-4 * 0.5**depth] * len(embeddings))
    heads = [rate[id(p)] for p in model.heads.parameters()]
    assert heads == pytest.approx([3e-3] * len(heads))
    # Splitting keeps the Trainer's weight decay per parameter (none on biases, norms, embeddings).
    decayed = set(trainer.get_decay_parameter_names(model))
    assert 0 < len(decayed) < len(rate) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.01 if name in decayed else 0.0), name
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-4)  # the logged rate is the base
    # The run's card and metrics.json say so.
    card = (tmp_path / "run" / "README.md").read_text(encoding="utf-8")
    assert "| Learning rate | 0.0001, layer-wise decay 0.5 per encoder layer down from the top; heads 0.003 |" in card
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    recipe = saved["recipe"]
    assert (recipe["layerwise_lr_decay"], recipe["head_learning_rate"]) == (0.5, 3e-3)
    assert built["recipe"] == recipe
    # It prints the run's own headline figures (accuracy for sentiment, question-class F1 for question sets).
    printed = bench_json(capsys.readouterr().out)
    assert printed["scores"] == pytest.approx(
        {"sentiment": saved["final"]["sentiment"]["accuracy"], "question": saved["final"]["question"]["f1_pos"]}
    )


def test_a_plain_train_run_has_one_rate_and_says_so(monkeypatch, tiny_encoder_dir, tiny_data_dir, tmp_path):
    from helpers import run_main, tiny_argv

    argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "run", "--max_steps", "1", "--learning_rate", "1e-4")
    trainer, _ = run_main(monkeypatch, argv)
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-4, 1e-4])
    assert "| Learning rate | 0.0001 |" in (tmp_path / "run" / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--layerwise_lr_decay", "0"], r"--layerwise_lr_decay 0.0 must be in \(0, 1\]"),
        (["--layerwise_lr_decay", "1.2"], r"--layerwise_lr_decay 1.2 must be in \(0, 1\]"),
        (["--head_learning_rate=-1e-3"], r"--head_learning_rate -0.001 must be a positive number"),
        ([], r"nothing to change"),
    ],
)
def test_learning_rates_refuses_bad_settings_before_training(tmp_path, capsys, flags, message):
    import learning_rates

    with pytest.raises(SystemExit):
        learning_rates.main(["configs/quick.yaml", "--output_dir", str(tmp_path / "run"), *flags])
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def two_seed_runs(tiny_encoder_dir, tiny_data_dir, tmp_path_factory):
    """Two tiny runs of one recipe, seeds 0 and 1, each scored by train.py on the whole of every eval set."""
    import train
    from helpers import tiny_argv

    folder = tmp_path_factory.mktemp("seeds")
    runs = []
    for seed in (0, 1):
        out = folder / f"seed{seed}"
        flags = ["--seed", str(seed), "--max_eval_samples", "1000", "--gold_eval", "true"]
        train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, *flags))
        runs.append(out)
    return runs


def test_seed_soup_scores_each_run_as_train_py_did_and_saves_the_average(
    two_seed_runs, tiny_data_dir, tmp_path, capsys
):
    import seed_soup
    import torch
    from predict import load_model
    from safetensors.torch import load_file

    save_dir = tmp_path / "soup"
    argv = [*map(str, two_seed_runs), "--data_dir", str(tiny_data_dir), "--save_dir", str(save_dir)]
    result = seed_soup.main([*argv, "--out", str(tmp_path / "RESULTS.md")])
    sets = ["sentiment", "question_gold", "question_gold_noqm", "question_swda", "question_swda_noqm"]
    assert result["max_length"] == 32  # from the runs' metrics.json
    assert list(result["headline"]["soup"]) == sets
    # Each run's row is what train.py measured for it (same sets, truncation and metric module).
    for folder, heads in zip(two_seed_runs, result["headline"]["runs"].values()):
        final = json.loads((folder / "metrics.json").read_text())["final"]
        expected = [final[s]["accuracy" if s == "sentiment" else "f1_pos"] for s in sets]
        assert heads == pytest.approx(expected, abs=1e-9)
    # The saved soup is the average of the runs' weights, loads as a model, and carries the figures measured here.
    runs = [load_file(str(f / "model.safetensors")) for f in two_seed_runs]
    soup = load_file(str(save_dir / "model.safetensors"))
    for name in ("heads.sentiment.weight", "encoder.encoder.layer.0.attention.self.query.weight"):
        assert not torch.equal(runs[0][name], runs[1][name])
        assert torch.allclose(soup[name], (runs[0][name] + runs[1][name]) / 2, atol=1e-6)
    metrics = json.loads((save_dir / "metrics.json").read_text())
    assert metrics["final"] == result["soup"] and metrics["recipe"]["seed"] == [0, 1]
    assert [r["folder"] for r in metrics["soup"]["runs"]] == [str(f) for f in two_seed_runs]
    for folder, run in zip(two_seed_runs, metrics["soup"]["runs"]):
        assert list(run["headline"].values()) == result["headline"]["runs"][f"{folder.name} (seed {run['seed']})"]
    assert metrics["before"] == {} and metrics["epochs"] == []  # each run's own, not the soup's
    # The rules are scored on the sets the soup was scored on, as train.py scores them beside a run.
    run_rules = json.loads((two_seed_runs[0] / "metrics.json").read_text())["heuristics"]
    assert set(metrics["heuristics"]) == {s for s in sets if s.startswith("question")}
    assert metrics["heuristics"]["question_swda"] == run_rules["question_swda"]
    manifest = json.loads((save_dir / "manifest.json").read_text())["files"]
    assert {"README.md", "metrics.json", "model.safetensors", "config.json"} <= set(manifest)
    model = load_model(save_dir, device="cpu")
    assert sorted(model.config.task_names) == ["question", "sentiment"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".soup")] == []  # no temporary folder left
    assert bench_json(capsys.readouterr().out)["headline"] == result["headline"]
    assert "| soup of 2 |" in (tmp_path / "RESULTS.md").read_text()


def test_seed_soup_card_shows_the_runs_and_the_soup_not_a_training_run(two_seed_runs, tiny_data_dir, tmp_path):
    import hub
    import seed_soup
    import yaml

    save_dir = tmp_path / "soup"
    seed_soup.main([*map(str, two_seed_runs), "--data_dir", str(tiny_data_dir), "--save_dir", str(save_dir)])
    metrics = json.loads((save_dir / "metrics.json").read_text())
    card = (save_dir / "README.md").read_text(encoding="utf-8")
    assert "uniform average of 2 fine-tuning runs" in card
    assert "| Seed | 0, 1: 2 runs, their weights averaged (a seed soup) |" in card
    assert f'model = AutoModel.from_pretrained("{save_dir.resolve()}"' in card  # the final folder, not the temporary
    # The runs' table: each run's figure, their mean, the soup's; then the soup on every set, without "before".
    sst2 = [run["headline"]["sentiment"] for run in metrics["soup"]["runs"]]
    row = next(line for line in card.splitlines() if line.startswith("| **soup of 2** |"))
    assert row.split(" | ")[1] == f"**{metrics['final']['sentiment']['accuracy']:.4f}**"
    assert f"| mean of the runs | {sum(sst2) / 2:.4f} |" in card
    assert "max_eval_samples" not in card  # the runs' evaluation cap (1,000 rows); the soup is scored on whole sets
    assert "Accuracy before" not in card and "### Training curves" not in card and "training_args.json" not in card
    assert "After fine-tuning and averaging, each task's headline figure" in card
    assert "one soup of 2 seeds" in card and "one run with one seed" not in card
    # The Hub metadata's results are the soup's own.
    header = yaml.safe_load(card.split("---\n")[1])
    values = [m["value"] for r in header["model-index"][0]["results"] for m in r["metrics"]]
    assert metrics["final"]["sentiment"]["accuracy"] in values
    # hub.py card (and push, which re-renders for the repo id) renders the same page from the folder.
    hub.render_card(save_dir, model_id="me/soup", output=tmp_path / "again.md")
    again = (tmp_path / "again.md").read_text(encoding="utf-8")
    assert again == card.replace(str(save_dir.resolve()), "me/soup").replace(f"# {save_dir.name}\n", "# soup\n")
    # A soup is not a run: averaging it again with its own runs would weight them twice.
    with pytest.raises(ValueError, match=f"{save_dir} is a seed soup, not a training run; average the runs"):
        seed_soup.main([str(save_dir), *map(str, two_seed_runs), "--data_dir", str(tiny_data_dir)])


def test_seed_soup_refuses_runs_it_cannot_average(two_seed_runs, tiny_encoder_dir, tiny_data_dir, tmp_path, capsys):
    import shutil

    import seed_soup
    import train
    from helpers import tiny_argv

    data = ["--data_dir", str(tiny_data_dir)]
    with pytest.raises(SystemExit):
        seed_soup.main([str(two_seed_runs[0]), *data])
    assert "give two or more run folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        seed_soup.main([*map(str, two_seed_runs), *data, "--save_dir", str(two_seed_runs[0])])
    assert "exists; name a new folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        seed_soup.main([str(two_seed_runs[0]), str(two_seed_runs[0]) + "/", *data])
    assert "a run folder is named twice" in capsys.readouterr().err
    # Another recipe: a sentiment-only run cannot be averaged with two-task runs.
    alone = tmp_path / "alone"
    train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, alone, "--tasks", "sentiment"))
    with pytest.raises(ValueError, match=f"{alone}: tasks .* differ from"):
        seed_soup.main([str(two_seed_runs[0]), str(alone), *data])
    # A run folder without its max_seq_length: the flag is asked for, and nothing is saved.
    old = tmp_path / "old"
    shutil.copytree(two_seed_runs[1], old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["recipe"]["max_seq_length"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=f"{old}: metrics.json does not record max_seq_length; pass --max_length"):
        seed_soup.main([str(two_seed_runs[0]), str(old), *data, "--save_dir", str(tmp_path / "soup")])
    assert not (tmp_path / "soup").exists()
    metrics["recipe"]["max_seq_length"] = 64
    (old / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=r"different max_seq_length \[32, 64\]; pass --max_length"):
        seed_soup.main([str(two_seed_runs[0]), str(old), *data])
    (old / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=f"{old}: not a finished train.py run"):
        seed_soup.main([str(two_seed_runs[0]), str(old), *data, "--max_length", "32"])
    # On the command line (`make soup`), the same refusal is one `error:` line, exit 1, no traceback.
    done = _bench_cli("seed_soup.py", str(two_seed_runs[0]), str(old), *data, "--max_length", "32")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {old}: not a finished train.py run")


def test_seed_soup_scores_a_custom_task_from_the_definition_its_runs_recorded(
    tiny_encoder_dir, tiny_data_dir, shared_data_dir, tmp_path
):
    import datasets
    import pandas as pd
    import seed_soup
    import train
    from helpers import tiny_argv

    trec = datasets.Dataset.from_parquet(str(shared_data_dir / "trec" / "train.parquet"))
    names = trec.features["coarse_label"].names
    for split, rows in (("train", range(0, 120)), ("dev", range(120, 180))):
        part = trec.select(rows)
        frame = pd.DataFrame({"question": part["text"], "coarse": [names[i] for i in part["coarse_label"]]})
        frame.to_csv(tmp_path / f"{split}.csv", index=False)
    # No label_names: the runs took them from the data; the soup scores with the class ids of the runs' id2label.
    definition = {"name": "topic", "text_column": "question", "label_column": "coarse",
                  "data_files": {"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "dev.csv")}}
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        flags = ["--tasks", "sentiment", "topic", "--task_definitions", json.dumps([definition]), "--seed", str(seed)]
        train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, *flags, "--max_eval_samples", "1000"))
        runs.append(out)
    recorded = json.loads((runs[0] / "metrics.json").read_text())["recipe"]["task_definitions"]
    assert recorded == [definition]

    result = seed_soup.main([*map(str, runs), "--data_dir", str(tiny_data_dir)])
    assert list(result["headline"]["soup"]) == ["sentiment", "topic"]
    for folder, heads in zip(runs, result["headline"]["runs"].values()):
        final = json.loads((folder / "metrics.json").read_text())["final"]
        assert heads == pytest.approx([final["sentiment"]["accuracy"], final["topic"]["accuracy"]], abs=1e-9)


def test_a_damaged_metrics_json_is_refused_naming_the_file(two_seed_runs, tiny_data_dir, tmp_path):
    import shutil

    import hub
    import question_errors
    import seed_soup

    cut = tmp_path / "cut"
    shutil.copytree(two_seed_runs[0], cut)
    text = (cut / "metrics.json").read_text()
    (cut / "metrics.json").write_text(text[: len(text) // 2])
    message = f"{cut / 'metrics.json'} is not valid JSON .*: it was cut short or edited after the run"
    with pytest.raises(ValueError, match=message):
        hub.render_card(cut)
    with pytest.raises(ValueError, match=message):
        seed_soup.main([str(two_seed_runs[1]), str(cut), "--data_dir", str(tiny_data_dir)])
    with pytest.raises(ValueError, match=message):
        question_errors.trained_length(cut)
    (cut / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"metrics.json holds a list, not the mapping train.py writes"):
        hub.render_card(cut)
    (cut / "metrics.json").unlink()
    assert question_errors.trained_length(cut, default=77) == 77  # a folder without one: the default length
    # A folder that is not a run, on the command line: one `error:` line, exit 1, no traceback.
    done = _bench_cli("question_errors.py", str(tmp_path), "--data_dir", str(tiny_data_dir))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path} holds no config.json: pass the output folder of a finished train.py run."
    )


def _bench_cli(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python bench/<script> args...` as a user runs it (MULTITASK_DEBUG off: no traceback)."""
    command = [sys.executable, str(BENCH / script), *args]
    env = {**os.environ, "MULTITASK_DEBUG": "0"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_question_rules_scores_every_rule_on_every_gold_set_and_half(tiny_data_dir, capsys):
    import common
    import pandas as pd
    import question_rules
    from question import RULES, strip_question_marks

    text = question_rules.main(["--data_dir", str(tiny_data_dir)])
    assert capsys.readouterr().out.strip() == text.strip()
    rows = [line for line in text.splitlines()[2:] if line.startswith("| `")]
    sets = ("DailyDialog", "DailyDialog, even dialogs", "DailyDialog, odd dialogs", "Switchboard")
    assert [(r.split(" | ")[0], r.split(" | ")[1]) for r in rows] == [(f"| `{n}`", s) for n in RULES for s in sets]
    dialogs = pd.read_parquet(tiny_data_dir / "dailydialog" / "validation.parquet")
    odd = dialogs[dialogs["dialog_id"] % 2 == 1]
    gold = odd["is_question"].astype(int).tolist()
    f1 = common.question_class_scores(gold, [RULES["dialog"](strip_question_marks(t)) for t in odd["text"]])[0]
    row = next(r for r in rows if r.startswith("| `dialog` | DailyDialog, odd dialogs |"))
    assert row.split(" | ")[2] == f"{len(odd)} ({sum(gold)})"
    assert row.split(" | ")[4].startswith(f"{f1:.4f} (")
    assert 0 < len(odd) < len(dialogs)


def test_question_class_scores_are_f1_precision_and_recall_of_the_question_class():
    import common
    import question_errors

    gold, pred = [1, 0, 1, 1, 0, 1], [1, 1, 0, 1, 0, 1]  # tp 3, fp 1, fn 1
    assert common.question_class_scores(gold, pred) == pytest.approx((3 / 4, 3 / 4, 3 / 4))
    assert common.question_class_scores([1, 1], [1, 0]) == pytest.approx((2 / 3, 1.0, 0.5))
    assert common.question_class_scores([0], [0]) == (0.0, 0.0, 0.0)
    assert question_errors.question_scores([1, 1], [1, 0]) == "F1 0.667 (P 1.000, R 0.500)"


def test_question_rules_names_the_missing_column(tmp_path, tiny_data_dir):
    import shutil

    import pandas as pd
    import question_rules

    shutil.copytree(tiny_data_dir, tmp_path / "data")
    path = tmp_path / "data" / "dailydialog" / "validation.parquet"
    pd.read_parquet(path).drop(columns=["dialog_id"]).to_parquet(path)
    with pytest.raises(ValueError, match=r"validation\.parquet: no column 'dialog_id'"):
        question_rules.main(["--data_dir", str(tmp_path / "data")])
    # On the command line: one `error:` line, exit 1, no traceback.
    done = _bench_cli("question_rules.py", "--data_dir", str(tmp_path / "data"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert re.match(r"error: .*validation\.parquet: no column 'dialog_id'", done.stderr.strip().splitlines()[-1])


def test_question_rules_lists_the_utterances_two_rules_disagree_on(tmp_path, tiny_data_dir):
    import shutil

    import pandas as pd
    import question_rules

    shutil.copytree(tiny_data_dir, tmp_path / "data")
    for rel, text, label in (("dailydialog", "Really ?", 1), ("swda", "Oh, really?", 0)):
        path = tmp_path / "data" / rel / "validation.parquet"
        frame = pd.read_parquet(path)
        extra = frame.head(2).assign(text=text, is_question=frame["is_question"].dtype.type(label))
        pd.concat([frame, extra], ignore_index=True).to_parquet(path)
    text = question_rules.main(["--data_dir", str(tmp_path / "data"), "--disagree", "dialog", "switchboard"])
    table = text.split("\n\n")[-1].splitlines()
    assert table[0] == "| set | view | text | rows | gold questions | `dialog` | `switchboard` |"
    assert "| DailyDialog | as written | `Really ?` | 2 | 2 | question | not |" in table
    assert "| Switchboard | as written | `Oh, really?` | 2 | 0 | question | not |" in table
    assert "| DailyDialog | `?` removed | (none) | 0 | 0 |  |  |" in table
    with pytest.raises(SystemExit):
        question_rules.main(["--data_dir", str(tmp_path / "data"), "--disagree", "dialog", "dialgo"])
