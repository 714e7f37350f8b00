"""--distill_from: a trained model's logits as soft targets (distill.py), from the loss to a run's metrics.json."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_main, tiny_argv

import distill
import hub
import predict
import train


def total(*args, **kwargs):
    return sum(distill.distillation_terms(*args, **kwargs).values())


def test_distillation_term_is_t_squared_kl_over_each_tasks_distilled_rows():
    torch.manual_seed(0)
    student = {"a": torch.randn(6, 2), "b": torch.randn(6, 3)}
    teacher = torch.randn(6, 3)
    teacher[0] = float("nan")  # an "a" row without teacher logits: skipped
    teacher[4:, 2] = float("nan")  # "b" rows hold 3 logits, so these are skipped too
    task_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    got = distill.distillation_terms(student, teacher, task_ids, ["a", "b"], temperature=2.0)

    def kl(s, t):
        p = F.softmax(t / 2.0, -1)
        return float((p * (p.log() - F.log_softmax(s / 2.0, -1))).sum())

    a = np.mean([kl(student["a"][i], teacher[i, :2]) for i in (1, 2)])
    b = kl(student["b"][3], teacher[3])
    assert got["a"].item() == pytest.approx(4.0 * a, rel=1e-5)
    assert got["b"].item() == pytest.approx(4.0 * b, rel=1e-5)
    # The student matching the teacher adds nothing; rows of other tasks get no gradient.
    same = {"a": teacher[:, :2].nan_to_num(), "b": teacher.nan_to_num()}
    assert total(same, teacher, task_ids, ["a", "b"], 2.0).item() == pytest.approx(0.0, abs=1e-6)
    leaf = {k: v.clone().requires_grad_() for k, v in student.items()}
    total(leaf, teacher, task_ids, ["a", "b"], 2.0).backward()
    assert leaf["a"].grad[[0, 3, 4, 5]].abs().sum() == 0 and leaf["a"].grad[1:3].abs().sum() > 0
    assert leaf["b"].grad[[0, 1, 2, 4, 5]].abs().sum() == 0 and leaf["b"].grad[3].abs().sum() > 0
    # A batch without distilled rows adds exactly 0.
    none = torch.full((6, 3), float("nan"))
    assert total(student, none, task_ids, ["a", "b"], 2.0).item() == 0.0


@pytest.fixture(scope="module")
def sentiment_teacher(tiny_encoder_dir, tiny_data_dir, tmp_path_factory):
    """A tiny single-task sentiment model saved by train.py."""
    out = tmp_path_factory.mktemp("teacher")
    train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--tasks", "sentiment", "--max_steps", "4"))
    return out


@pytest.fixture
def student_argv(sentiment_teacher, tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch):
    """A one-step student run of `sentiment_teacher` writing to tmp_path/"a", its teacher cache in tmp_path/"cache"."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(distill, "default_cache_dir", lambda: cache)
    argv = tiny_argv(
        tiny_encoder_dir, tiny_data_dir, tmp_path / "a", "--max_steps", "1", "--distill_from", str(sentiment_teacher)
    )
    return cache, argv


@pytest.fixture
def labeller(sentiment_teacher):
    """`sentiment_teacher` as distill.Teacher, set to label its sentiment head."""
    teacher = distill.Teacher(str(sentiment_teacher), 32)
    head = teacher.heads["sentiment"]
    teacher.check_tasks([{"name": "sentiment", "num_labels": head["num_labels"], "id2label": head["id2label"]}], [])
    return teacher


def test_student_trains_on_the_teachers_logits_and_records_it(
    sentiment_teacher, tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setattr(distill, "default_cache_dir", lambda: cache)
    flags = ("--distill_from", str(sentiment_teacher), "--distill_weight", "0.5", "--distill_temperature", "3")
    out = tmp_path / "student"
    argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--max_steps", "3", *flags)
    trainer, metrics = run_main(monkeypatch, argv)

    # Sentiment rows carry the teacher's own logits (recomputed here through predict.py's loader), question rows NaN.
    rows = trainer.train_dataset
    sizes = dict(zip(["sentiment", "question"], trainer.task_sizes))
    soft = np.asarray(rows["teacher_logits"][:], dtype=np.float32)
    assert np.isnan(soft[sizes["sentiment"] :]).all()
    model, tokenizer = predict.load(sentiment_teacher)
    student_tokenizer = trainer.processing_class
    texts = student_tokenizer.batch_decode(rows["input_ids"][:3], skip_special_tokens=True)
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt"), task="sentiment").logits
    np.testing.assert_allclose(soft[:3], expected.numpy(), atol=1e-4)
    assert len(list(cache.glob("*-sentiment.npz"))) == 1

    # The training loss is the joint cross-entropy plus weight x the distillation term.
    model_s = trainer.model
    model_s.train()
    batch = trainer.data_collator([rows[i] for i in range(4)])
    torch.manual_seed(1)
    got = trainer.compute_loss(model_s, dict(batch))
    torch.manual_seed(1)
    teacher_logits = batch.pop("teacher_logits")
    outputs = model_s(**batch)
    extra = total(outputs.logits, teacher_logits, batch["task_ids"], ["sentiment", "question"], 3.0)
    assert extra.item() > 0
    assert got.item() == pytest.approx((outputs.loss + 0.5 * extra).item(), rel=1e-5)
    # The logs give the sentiment head's distillation term beside its cross-entropy; the question head has none.
    logged = [row for row in trainer.state.log_history if "train_sentiment_loss" in row]
    assert logged and all(row["train_sentiment_distill_loss"] > 0 for row in logged)
    assert not any("train_question_distill_loss" in row for row in trainer.state.log_history)

    recorded = json.loads((out / "metrics.json").read_text())["recipe"]["distillation"]
    assert recorded == {"teachers": [str(sentiment_teacher)], "tasks": ["sentiment"], "weight": 0.5, "temperature": 3.0}
    assert metrics["recipe"]["distillation"] == recorded
    assert f"soft targets of `{sentiment_teacher}` on the sentiment training rows" in (out / "README.md").read_text()


@pytest.fixture(scope="module")
def second_teacher(tiny_encoder_dir, tiny_data_dir, tmp_path_factory):
    """Another tiny sentiment model (another seed and more steps): other weights, other logits."""
    out = tmp_path_factory.mktemp("teacher2")
    train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--tasks", "sentiment", "--max_steps", "6",
                         "--seed", "7"))  # fmt: skip
    return out


def test_an_ensemble_of_teachers_gives_the_mean_of_their_logits(
    sentiment_teacher, second_teacher, tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setattr(distill, "default_cache_dir", lambda: cache)
    out = tmp_path / "student"
    teachers = [str(sentiment_teacher), str(second_teacher)]
    argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--max_steps", "2", "--distill_from", *teachers)
    trainer, metrics = run_main(monkeypatch, argv)

    # Each sentiment row carries the mean of the two teachers' own logits (each recomputed through predict.py).
    n = trainer.task_sizes[0]
    rows = trainer.train_dataset
    soft = np.asarray(rows["teacher_logits"][:n], dtype=np.float32)
    texts = trainer.processing_class.batch_decode(rows["input_ids"][:n], skip_special_tokens=True)
    each = []
    for folder in teachers:
        model, tokenizer = predict.load(folder)
        with torch.no_grad():
            each.append(model(**tokenizer(texts, padding=True, return_tensors="pt"), task="sentiment").logits.numpy())
    assert np.abs(each[0] - each[1]).max() > 1e-3  # two different teachers, so the mean is neither of them
    np.testing.assert_allclose(soft, (each[0] + each[1]) / 2, atol=1e-4)
    assert np.isnan(np.asarray(rows["teacher_logits"][n:], dtype=np.float32)).all()
    assert len(list(cache.glob("*-sentiment.npz"))) == 2  # one cache per teacher: each reusable on its own

    recorded = json.loads((out / "metrics.json").read_text())["recipe"]["distillation"]
    assert recorded["teachers"] == teachers and metrics["recipe"]["distillation"] == recorded
    card = (out / "README.md").read_text()
    assert f"soft targets of the mean logits of `{teachers[0]}`, `{teachers[1]}` on the sentiment" in card
    # A metrics.json that names its one teacher as "teacher" still renders.
    one = {"teacher": "runs/t", "tasks": ["sentiment"], "weight": 1.0, "temperature": 2.0}
    assert hub._distillation(one).startswith("soft targets of `runs/t` on the sentiment training rows")


def test_an_ensemble_that_repeats_a_teacher_or_whose_teachers_differ_in_tasks_is_refused(
    sentiment_teacher, tiny_encoder_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "run"
    same = (str(sentiment_teacher), f"{sentiment_teacher}/", str(sentiment_teacher / ".." / sentiment_teacher.name))
    for again in same:
        with pytest.raises(ValueError, match="--distill_from names one teacher more than once"):
            train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--distill_from", str(sentiment_teacher), again))
    assert not out.exists()

    config = json.loads((sentiment_teacher / "config.json").read_text())
    sentiment = {**config["tasks"][0], "id2label": {0: "negative", 1: "positive"}}
    question = {"name": "question", "num_labels": 2, "id2label": {0: "not_question", 1: "question"}}
    members = []
    for name, heads in (("a", {"sentiment": sentiment}), ("b", {"sentiment": sentiment, "question": question})):
        member = distill.Teacher.__new__(distill.Teacher)
        member.name, member.heads = name, heads
        members.append(member)
    teachers = distill.Teachers.__new__(distill.Teachers)
    teachers.members = members
    student = [{"name": "sentiment", "num_labels": 2, "id2label": {0: "negative", 1: "positive"}}, question]
    with pytest.raises(ValueError, match="the teachers have heads for different tasks .*pass --distill_tasks"):
        teachers.check_tasks(student, [])
    assert teachers.check_tasks(student, ["sentiment"]) == ["sentiment"]


def test_a_config_file_may_name_one_teacher_as_a_string(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("distill_from: runs/teacher\n")
    assert train.load_config(str(config))["distill_from"] == ["runs/teacher"]


def test_a_second_run_reads_the_teachers_logits_from_the_cache(student_argv, tmp_path, monkeypatch):
    cache, argv = student_argv
    train.main(argv)
    (cached,) = cache.glob("*.npz")
    with np.load(cached) as stored:
        keys, logits = stored["keys"], stored["logits"]
    assert len(keys) == len(set(keys.tolist())) > 0
    # The same keys with other values: a run that reads the cache trains on these. Drop one text, which the next
    # run must label anew (and add back to the file).
    np.savez(cached, keys=keys[1:], logits=logits[1:] + 100.0)
    trainer, _ = run_main(monkeypatch, [*argv, "--output_dir", str(tmp_path / "b")])
    soft = np.asarray(trainer.train_dataset["teacher_logits"][: trainer.task_sizes[0]], dtype=np.float32)
    from_cache = soft.min(axis=1) > 50
    assert not from_cache.all()  # the dropped text's rows ran through the teacher again: its own logits
    np.testing.assert_allclose(soft[~from_cache], np.broadcast_to(logits[0], soft[~from_cache].shape), atol=1e-5)
    stored_rows = {tuple(np.round(row, 4)) for row in logits[1:] + 100.0}
    assert all(tuple(np.round(row, 4)) in stored_rows for row in soft[from_cache])
    with np.load(cached) as stored:
        assert len(stored["keys"]) == len(keys)


def test_a_teacher_loads_its_weights_only_for_inputs_not_in_its_cache(
    labeller, sentiment_teacher, tmp_path, monkeypatch
):
    texts = ["a fine film", "a dull film"]
    filled = labeller.logits("sentiment", texts, tmp_path)
    loads = []
    load_model = predict.load_model

    def counted(*args, **kwargs):
        loads.append(args)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(predict, "load_model", counted)
    again = distill.Teacher(str(sentiment_teacher), 32)
    again.tasks = ["sentiment"]
    np.testing.assert_array_equal(again.logits("sentiment", texts, tmp_path), filled)
    assert loads == [] and again._model is None  # every input from the cache: the weights stay on disk
    got = again.logits("sentiment", [*texts, "a long film"], tmp_path)
    assert len(loads) == 1  # one new input: the weights load, once
    np.testing.assert_array_equal(got[:2], filled)
    np.testing.assert_allclose(got[2:], labeller.logits("sentiment", ["a long film"], tmp_path / "b"), atol=1e-6)


def test_runs_labelling_at_once_keep_each_others_logits(labeller, tmp_path, monkeypatch):
    # Two runs started together (seeds side by side) with a slow teacher: without the cache's lock each would read
    # the empty cache, label its texts and replace the file, and the second write would drop the first's logits.
    teacher = labeller
    run = distill.Teacher._run
    calls = []

    def slow(self, task, encoded):
        calls.append(len(encoded))
        time.sleep(1.0)
        return run(self, task, encoded)

    monkeypatch.setattr(distill.Teacher, "_run", slow)
    texts = [f"a film {word} as any" for word in ("good", "bad", "dull", "bright", "long", "short")]
    halves = [texts[:4], texts[2:]]  # two texts in both: labelled once
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda part: teacher.logits("sentiment", part, tmp_path), halves))
    assert sorted(calls) == [2, 4]
    (cached,) = tmp_path.glob("*.npz")
    with np.load(cached) as stored:
        assert len(stored["keys"]) == len(texts)
    again = teacher.logits("sentiment", texts, tmp_path)
    assert len(calls) == 2  # every text from the file
    np.testing.assert_array_equal(again, np.concatenate([got[0], got[1][2:]]))


def test_a_read_only_cache_directory_is_read_without_a_lock(labeller, tmp_path, monkeypatch, caplog):
    # A shared, pre-filled cache on a read-only file system: no lock file can be made there, and no new logits kept.
    teacher = labeller
    texts = ["a fine film", "a dull film", "a long film"]
    filled = teacher.logits("sentiment", texts[:2], tmp_path)

    class ReadOnlyLock:
        def __init__(self, path):
            self.path = path

        def acquire(self):
            raise OSError(30, "Read-only file system", self.path)

    def no_write(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(distill, "FileLock", ReadOnlyLock)
    monkeypatch.setattr(distill.tempfile, "NamedTemporaryFile", no_write)
    with caplog.at_level("WARNING", logger="distill"):
        got = teacher.logits("sentiment", texts, tmp_path)  # two from the file, one labelled and not kept
    np.testing.assert_array_equal(got[:2], filled)
    np.testing.assert_allclose(got[2:], teacher.logits("sentiment", texts[2:], tmp_path / "elsewhere"), atol=1e-6)
    assert "no lock on" in caplog.text and "could not be cached" in caplog.text
    (cached,) = tmp_path.glob("*.npz")
    with np.load(cached) as stored:
        assert len(stored["keys"]) == 2


def test_a_cache_write_that_fails_leaves_the_old_file_and_no_part(labeller, tmp_path, monkeypatch, caplog):
    teacher = labeller
    filled = teacher.logits("sentiment", ["a fine film"], tmp_path)
    (cached,) = tmp_path.glob("*.npz")
    before = cached.read_bytes()

    def disk_full(handle, **arrays):
        handle.write(b"half of a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distill.np, "savez", disk_full)
    with caplog.at_level("WARNING", logger="distill"):
        got = teacher.logits("sentiment", ["a fine film", "a dull film"], tmp_path)
    np.testing.assert_array_equal(got[:1], filled)
    assert "could not be cached" in caplog.text
    assert cached.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [cached.name, f"{cached.name}.lock"]  # no .part left


def test_non_finite_teacher_logits_are_refused_before_any_output(student_argv, tmp_path, monkeypatch):
    cache, argv = student_argv
    not_finite = "not finite \\(inf or NaN\\) for 1 training row\\(s\\)"
    # A teacher whose head overflows (as one saved in fp16 can): refused, and nothing cached.
    run = distill.Teacher._run

    def overflowing(self, task, encoded):
        logits = run(self, task, encoded)
        logits[3, 1] = np.inf
        return logits

    monkeypatch.setattr(distill.Teacher, "_run", overflowing)
    with pytest.raises(ValueError, match=f"{not_finite}.*the teacher's weights are broken"):
        train.main(argv)
    assert not (tmp_path / "a").exists() and not list(cache.glob("*.npz"))
    monkeypatch.setattr(distill.Teacher, "_run", run)
    train.main(argv)
    # A cache file holding such a value (the loss would skip its row unseen): refused, naming the file.
    (cached,) = cache.glob("*.npz")
    with np.load(cached) as stored:
        keys, logits = stored["keys"], stored["logits"]
    logits[3, 1] = np.nan
    np.savez(cached, keys=keys, logits=logits)
    out = tmp_path / "b"
    with pytest.raises(ValueError, match=f"{not_finite}.*the cache file .*{cached.name} is corrupt; delete it"):
        train.main([*argv, "--output_dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--distill_weight", "0"), "--distill_weight must be a finite number > 0"),
        (("--distill_weight", "inf"), "--distill_weight must be a finite number > 0"),
        (("--distill_temperature", "-1"), "--distill_temperature must be a finite number > 0"),
        (("--distill_temperature", "nan"), "--distill_temperature must be a finite number > 0"),
        (("--distill_tasks", "sentimnt"), "--distill_tasks ['sentimnt']: not among the run's tasks"),
        (("--distill_tasks", "question"), "has heads for ['sentiment'], none for ['question']"),
        (("--cuda_graphs", "true"), "--cuda_graphs records the step without the distillation term"),
    ],
)
def test_bad_distillation_settings_are_refused_before_any_output(
    sentiment_teacher, tiny_encoder_dir, tiny_data_dir, tmp_path, flags, message
):
    out = tmp_path / "run"
    argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--distill_from", str(sentiment_teacher), *flags)
    with pytest.raises(ValueError) as err:
        train.main(argv)
    assert message in str(err.value)
    assert not out.exists()


def test_a_teacher_without_the_tasks_or_with_other_classes_is_refused(
    sentiment_teacher, tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(distill, "default_cache_dir", lambda: tmp_path / "cache")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="none for \\['question'\\]: distill from a model trained on the same task"):
        train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--tasks", "question", "--distill_from",
                             str(sentiment_teacher)))  # fmt: skip
    with pytest.raises(ValueError, match="--distill_from .*: no such folder"):
        train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--distill_from", str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="--distill_tasks \\['sentiment'\\] needs --distill_from"):
        train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--distill_tasks", "sentiment"))
    # Weights cut short: found when the teacher first labels (it loads only for inputs not in its cache).
    cut = tmp_path / "cut"
    shutil.copytree(sentiment_teacher, cut)
    (cut / "model.safetensors").write_bytes((sentiment_teacher / "model.safetensors").read_bytes()[:1000])
    unreadable = "--distill_from .*safetensors weights cannot be read.*download the model again"
    with pytest.raises(ValueError, match=unreadable):
        train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--distill_from", str(cut)))
    assert not out.exists()

    config = json.loads((sentiment_teacher / "config.json").read_text())
    teacher = distill.Teacher.__new__(distill.Teacher)
    teacher.name, teacher.heads = "t", {"sentiment": {**config["tasks"][0], "id2label": {0: "positive", 1: "negative"}}}
    student = [{"name": "sentiment", "num_labels": 2, "id2label": {0: "negative", 1: "positive"}}]
    with pytest.raises(ValueError, match="classes \\['positive', 'negative'\\], the run's task has"):
        teacher.check_tasks(student, [])
