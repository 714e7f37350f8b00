"""Freezing: which parameters each spec selects, and that the real Trainer leaves frozen ones untouched."""

from __future__ import annotations

import pytest
import torch
from helpers import changed_and_unchanged, optimizer_parameter_ids, run_main, tiny_argv

import freezing
import train
from modeling_multitask import MultiTaskConfig, MultiTaskModel

TASKS = [
    {"name": "sentiment", "num_labels": 2},
    {"name": "question", "num_labels": 2},
]


def frozen_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def all_names(model, prefix: str = "") -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def model_with_layers(num_layers: int, **config) -> MultiTaskModel:
    from transformers import BertConfig

    encoder = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=37
    ).to_dict()
    return MultiTaskModel(MultiTaskConfig(encoder=encoder, tasks=TASKS, **config))


def frozen_layers(model) -> list[int]:
    layers = freezing.encoder_layers(model)
    return [i for i, layer in enumerate(layers) if not any(p.requires_grad for p in layer.parameters())]


# ---------------------------------------------------------------------------------------------------------
# What each spec selects
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "freeze, unfreeze, expected_frozen_prefixes",
    [
        (["none"], [], []),
        (["encoder"], [], ["encoder."]),
        (["embeddings"], [], ["encoder.embeddings."]),
        (["heads"], [], ["heads."]),
        (["head:question"], [], ["heads.question."]),
        (["all"], ["heads"], ["encoder."]),
        (["encoder", "head:sentiment"], [], ["encoder.", "heads.sentiment."]),
        (["encoder"], ["layers:1"], ["encoder.embeddings.", "encoder.encoder.layer.0."]),
    ],
)
def test_spec_selects_parameters(make_model, freeze, unfreeze, expected_frozen_prefixes):
    model = make_model()
    trainable, total = freezing.apply_freezing(model, freeze, unfreeze)
    expected = {n for n in all_names(model) if n.startswith(tuple(expected_frozen_prefixes))}
    assert frozen_names(model) == expected
    assert total == sum(p.numel() for p in model.parameters())
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n not in expected)


def test_all_differs_from_encoder_only_by_what_lies_outside_encoder_and_heads(make_model):
    # With learned loss weights the model has a third kind of parameter: `all` + heads freezes it (a pure
    # linear probe, weights stay 1), `encoder` leaves it training.
    probe, encoder_frozen = make_model(loss_weighting="uncertainty"), make_model(loss_weighting="uncertainty")
    freezing.apply_freezing(probe, ["all"], ["heads"])
    freezing.apply_freezing(encoder_frozen, ["encoder"])
    assert frozen_names(probe) - frozen_names(encoder_frozen) == {"loss_log_vars"}
    assert not probe.loss_log_vars.requires_grad and encoder_frozen.loss_log_vars.requires_grad


@pytest.mark.parametrize(
    "num_layers, spec, expected",
    [
        (6, "layers:0-6/12", [0, 1, 2]),  # the 12-layer recipe "freeze 0-6, tune 7-11": the lower half
        (6, "layers:7-11/12", [3, 4, 5]),  # its complement maps onto the complement
        (2, "layers:0-6/12", [0]),
        (2, "layers:7-11/12", [1]),
        (12, "layers:0-6/12", [0, 1, 2, 3, 4, 5, 6]),  # on a 12-layer encoder the indices are taken as written
        (6, "layers:0-2", [0, 1, 2]),
        (6, "layers:4", [4]),
        (2, "layers:0-0/12", [0]),  # a range never maps to nothing
    ],
)
def test_layer_ranges_scale_by_fraction(num_layers, spec, expected):
    model = model_with_layers(num_layers)
    freezing.apply_freezing(model, [spec])
    assert frozen_layers(model) == expected
    assert all(p.requires_grad for p in model.encoder.embeddings.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())


def test_layer_range_beyond_depth_names_the_fix():
    model = model_with_layers(6)
    with pytest.raises(ValueError, match=r"does not fit a 6-layer encoder.*'layers:0-6/12'"):
        freezing.apply_freezing(model, ["layers:0-6"])
    with pytest.raises(ValueError, match=r"layer range 5-2"):
        freezing.apply_freezing(model, ["layers:5-2"])


@pytest.mark.parametrize(
    "freeze, unfreeze, message",
    [
        (["decoder"], [], r"Unknown freeze spec 'decoder'"),
        (["head:topic"], [], r"no task 'topic'; this model's tasks are \['sentiment', 'question'\]"),
        (["all"], [], r"leaves nothing to train; unfreeze e\.g\. 'heads'"),
        (["encoder", "heads"], [], r"leaves nothing to train"),
    ],
)
def test_bad_specs_raise(make_model, freeze, unfreeze, message):
    with pytest.raises(ValueError, match=message):
        freezing.apply_freezing(make_model(), freeze, unfreeze)


def test_yaml_scalar_is_one_spec(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("freeze: encoder\nunfreeze: head:question\ntasks: sentiment\n", encoding="utf-8")
    _, data_args, _, mt_args, _ = train.parse_args([str(config), "--output_dir", str(tmp_path / "out")])
    assert mt_args.freeze == ["encoder"] and mt_args.unfreeze == ["head:question"]
    assert data_args.tasks == ["sentiment"]
    _, _, _, mt_args, _ = train.parse_args([str(config), "--output_dir", "x", "--freeze", "all", "--unfreeze", "heads"])
    assert mt_args.freeze == ["all"] and mt_args.unfreeze == ["heads"]


# ---------------------------------------------------------------------------------------------------------
# Through the real Trainer
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, frozen_prefixes",
    [
        (["--freeze", "encoder"], ["encoder."]),
        (["--freeze", "layers:0-6/12"], ["encoder.encoder.layer.0."]),
        (["--freeze", "embeddings", "head:sentiment"], ["encoder.embeddings.", "heads.sentiment."]),
        (["--freeze", "all", "--unfreeze", "heads", "--loss_weighting", "uncertainty"], ["encoder.", "loss_log_vars"]),
        ([], []),
    ],
)
def test_training_moves_exactly_the_trainable_parameters(
    monkeypatch, tmp_path, tiny_encoder_dir, tiny_data_dir, flags, frozen_prefixes
):
    argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "run", "--max_steps", "4", *flags)
    trainer, metrics = run_main(monkeypatch, argv)
    model = trainer.accelerator.unwrap_model(trainer.model)
    expected_frozen = {n for n in all_names(model) if frozen_prefixes and n.startswith(tuple(frozen_prefixes))}

    changed, unchanged = changed_and_unchanged(trainer)
    assert trainer.state.global_step == 4
    assert unchanged == expected_frozen  # frozen: bit-identical; everything else moved
    assert changed == all_names(model) - expected_frozen
    # The optimizer holds exactly the trainable parameters: no state, no weight decay for frozen ones.
    assert optimizer_parameter_ids(trainer) == {id(p) for p in model.parameters() if p.requires_grad}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert metrics["train"]["trainable_parameters"] == trainable
    assert metrics["train"]["total_parameters"] == sum(p.numel() for p in model.parameters())


def test_frozen_parameters_stay_frozen_after_resume(monkeypatch, tmp_path, tiny_encoder_dir, tiny_data_dir):
    freeze = ["--freeze", "encoder", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    first, _ = run_main(monkeypatch, tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "a", *freeze))
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert checkpoint.is_dir()

    resume = ["--resume_from_checkpoint", str(checkpoint)]
    resumed, _ = run_main(monkeypatch, tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "b", *freeze, *resume))
    model = resumed.accelerator.unwrap_model(resumed.model)
    encoder = {n: p for n, p in model.named_parameters() if n.startswith("encoder.")}
    assert not any(p.requires_grad for p in encoder.values())
    assert all(torch.equal(p, first.initial_state[n]) for n, p in encoder.items())  # the pretrained weights
    assert optimizer_parameter_ids(resumed) == {id(p) for p in model.heads.parameters()}
    # Resuming at step 2 replays steps 3-4 exactly (same batches, same dropout RNG): same weights as run a.
    final_first = dict(first.accelerator.unwrap_model(first.model).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, final_first[name]), name


def test_resume_with_other_freezing_is_refused(monkeypatch, tmp_path, tiny_encoder_dir, tiny_data_dir):
    save = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    run_main(monkeypatch, tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "a", "--freeze", "encoder", *save))
    resume = ["--max_steps", "4", "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-2")]
    with pytest.raises(ValueError, match=r"different set of trainable parameters.*resume with the same settings"):
        run_main(monkeypatch, tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "b", *resume))


def test_freeze_lower_layers_by_fraction(make_model):
    model = make_model()  # 2 layers
    trainable, total = freezing.apply_freezing(model, ["embeddings", "layers:0-5/12"])
    layers = freezing.encoder_layers(model)
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not any(p.requires_grad for p in model.encoder.embeddings.parameters())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < total


def test_freeze_all_then_unfreeze_heads_is_a_linear_probe(make_model):
    model = make_model()
    trainable, _ = freezing.apply_freezing(model, ["all"], ["heads"])
    assert trainable == sum(p.numel() for p in model.heads.parameters())


def test_freeze_errors_name_the_fix(make_model):
    with pytest.raises(ValueError, match=r"layer range 7-11 does not fit a 2-layer encoder.*'layers:0-6/12'"):
        freezing.apply_freezing(make_model(), ["layers:7-11"])
    with pytest.raises(ValueError, match=r"no task 'topic'; this model's tasks are \['sentiment', 'question'\]"):
        freezing.apply_freezing(make_model(), ["head:topic"])
    with pytest.raises(ValueError, match="leaves nothing to train"):
        freezing.apply_freezing(make_model(), ["all"])
