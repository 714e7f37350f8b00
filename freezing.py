"""Freezing: which parameters train, from specs like `encoder`, `head:<task>` or `layers:0-6/12`.

`apply_freezing(model, freeze, unfreeze)` sets `requires_grad` (train.py calls it on the real model, checks.py on
a weightless skeleton before any data is read).
"""

from __future__ import annotations

import math
import re

import torch

from modeling_multitask import MultiTaskModel


def encoder_layers(model: MultiTaskModel) -> torch.nn.ModuleList:
    for name, module in model.encoder.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layer", "layers"):
            return module
    raise ValueError(f"Cannot find the transformer layers of encoder {type(model.encoder).__name__}.")


def _spec_parameters(model: MultiTaskModel, spec: str) -> list[torch.nn.Parameter]:
    spec = spec.strip()
    if spec in ("all",):
        return list(model.parameters())
    if spec == "encoder":
        return list(model.encoder.parameters())
    if spec == "embeddings":
        embeddings = getattr(model.encoder, "embeddings", None)
        if embeddings is None:
            raise ValueError(f"freeze 'embeddings': encoder {type(model.encoder).__name__} has no .embeddings.")
        return list(embeddings.parameters())
    if spec == "heads":
        return list(model.heads.parameters())
    if spec.startswith("head:"):
        task = spec.split(":", 1)[1]
        if task not in model.heads:
            raise ValueError(f"freeze {spec!r}: no task {task!r}; this model's tasks are {list(model.heads)}.")
        return list(model.heads[task].parameters())
    match = re.fullmatch(r"layers:(\d+)(?:-(\d+))?(?:/(\d+))?", spec)
    if match:
        layers = encoder_layers(model)
        depth = len(layers)
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        reference = int(match[3]) if match[3] else depth
        if first > last or last >= reference:
            raise ValueError(
                f"freeze {spec!r}: layer range {first}-{last} does not fit a {reference}-layer encoder "
                f"(valid 0..{reference - 1}). This encoder has {depth} layers; write e.g. 'layers:0-6/12' to "
                f"scale a 12-layer recipe onto it."
            )
        # Map indices of a `reference`-layer recipe onto this depth by fraction: 0-6/12 -> 0-2 of 6.
        lo = math.floor(first * depth / reference)
        hi = max(lo, math.floor((last + 1) * depth / reference) - 1)
        return [p for i in range(lo, hi + 1) for p in layers[i].parameters()]
    raise ValueError(
        f"Unknown freeze spec {spec!r}; use none, all, encoder, embeddings, heads, head:<task>, layers:A-B "
        f"or layers:A-B/N."
    )


def apply_freezing(model: MultiTaskModel, freeze: list[str], unfreeze: list[str] = ()) -> tuple[int, int]:
    """Set requires_grad from the specs; returns (trainable, total) parameter counts.

    With LoRA adapters in the encoder (lora.apply_lora runs first) the encoder's own weights stay frozen: the specs
    act on the adapters and the heads, `unfreeze` never turns the base weights back on, a spec that would only
    touch base weights is refused as having no effect, and at least one adapter must still train."""
    base = _lora_base_parameters(model)
    for spec in freeze:
        if spec.strip() == "none":
            continue
        params = _spec_parameters(model, spec)
        _check_lora_spec(base, params, "freeze", spec)
        for p in params:
            p.requires_grad_(False)
    for spec in unfreeze:
        if spec.strip() == "none":
            continue
        params = _spec_parameters(model, spec)
        _check_lora_spec(base, params, "unfreeze", spec)
        for p in params:
            if id(p) not in base:
                p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise ValueError(f"freeze={freeze} unfreeze={unfreeze} leaves nothing to train; unfreeze e.g. 'heads'.")
    if base and not any(p.requires_grad for n, p in model.encoder.named_parameters() if ".lora_" in n):
        raise ValueError(
            f"freeze={freeze} unfreeze={unfreeze} leaves no LoRA adapter to train: with --lora_r the encoder learns "
            f"only through its adapters. Drop --lora_r for a frozen encoder (e.g. --freeze all --unfreeze heads), "
            f"or keep some encoder layers out of --freeze."
        )
    return trainable, total


def _lora_base_parameters(model: MultiTaskModel) -> set[int]:
    """ids of the encoder's own weights when it holds LoRA adapters (they never train then), else empty."""
    named = list(model.encoder.named_parameters())
    if not any(".lora_A." in n for n, _ in named):
        return set()
    return {id(p) for n, p in named if ".lora_" not in n}


def _check_lora_spec(base: set[int], params: list[torch.nn.Parameter], which: str, spec: str) -> None:
    if base and params and all(id(p) in base for p in params):
        raise ValueError(
            f"{which} {spec!r} has no effect with LoRA (--lora_r): it holds only encoder weights, which LoRA keeps "
            f"frozen, and no adapter (the adapters sit in the layers named by --lora_target_modules). Drop it."
        )
