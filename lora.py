"""LoRA on the shared encoder (peft): low-rank adapters train, the encoder's own weights stay frozen.

    --lora_r 8 [--lora_alpha 16] [--lora_dropout 0.1] [--lora_target_modules query key value dense]

`apply_lora(model, model_args)` injects peft's LoRA layers into `model.encoder` in place (no wrapper class, so
`model` stays a `MultiTaskModel` for the Trainer, freezing.py and checkpoints). The heads, and the uncertainty
loss weights, are outside the encoder and train fully. The target modules default to every linear layer of a
BERT-family encoder's blocks (`TARGET_MODULES`, by model type).

Saving (`--lora_save`):
- `merged` (default): `merged_copy` folds each adapter into its weight (W + alpha/r * B A) and drops the LoRA
  layers: the folder is an ordinary `MultiTaskModel` (model.safetensors), loaded by plain transformers with
  `trust_remote_code=True`; peft is not needed to use it.
- `adapter`: `save_adapter` writes the adapter alone, in peft's format (adapter_config.json,
  adapter_model.safetensors: the encoder's LoRA weights), and the heads in heads.safetensors, next to the
  config and tokenizer; `load_adapter_folder` rebuilds the merged model from it and the base encoder.

Checkpoints during training hold the unmerged model (base weights and adapters) and resume only into a run with
the same LoRA settings; `check_checkpoint` refuses any other before the output folder is touched.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_multitask import MultiTaskConfig, MultiTaskModel

if TYPE_CHECKING:  # train.py imports this module
    from train import ModelArguments

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
HEADS_FILE = "heads.safetensors"
DEFAULT_ALPHA_PER_RANK = 2.0  # lora_alpha defaults to 2 * lora_r (scale alpha / r = 2)
DEFAULT_DROPOUT = 0.1
# Last names of the linear layers inside the transformer blocks, by encoder model type: attention projections
# and the feed-forward layers (LoRA on every block linear adapts a small encoder best for a given rank).
_BERT_LINEARS = ("query", "key", "value", "dense")
TARGET_MODULES = {
    **dict.fromkeys(
        ("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie", "roberta-prelayernorm",
         "xmod", "megatron-bert", "nomic_bert"),
        _BERT_LINEARS,
    ),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "deberta": ("in_proj", "dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "mpnet": ("q", "k", "v", "o", "dense"),
    "albert": ("query", "key", "value", "dense", "ffn", "ffn_output"),
    "modernbert": ("Wqkv", "Wo", "Wi"),
}  # fmt: skip


def enabled(model_args: ModelArguments) -> bool:
    return model_args.lora_r > 0


def check_lora_arguments(model_args: ModelArguments) -> None:
    """`ModelArguments.__post_init__`: the LoRA flags on their own (the encoder is checked in `resolve_targets`)."""
    if model_args.lora_r < 0:
        raise ValueError(f"lora_r must be 0 (no LoRA) or a positive rank such as 8, got {model_args.lora_r}.")
    if model_args.lora_r == 0:
        given = [
            name
            for name, value in (
                ("lora_alpha", model_args.lora_alpha),
                ("lora_dropout", model_args.lora_dropout),
                ("lora_target_modules", model_args.lora_target_modules or None),
            )
            if value is not None
        ]
        if model_args.lora_save != "merged":
            given.append("lora_save")
        if given:
            raise ValueError(f"{', '.join(given)} set without LoRA: pass --lora_r (e.g. 8) to train with LoRA.")
        return
    if model_args.lora_alpha is not None and model_args.lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {model_args.lora_alpha}.")
    if model_args.lora_dropout is not None and not 0.0 <= model_args.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {model_args.lora_dropout}.")


def resolve_targets(encoder: torch.nn.Module, requested: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The module names LoRA adapts: `requested`, each matching at least one linear layer of `encoder` (by its
    last name, or a dotted suffix such as `attention.self.query`), or the default for the encoder's model type."""
    linears = [name for name, module in encoder.named_modules() if isinstance(module, torch.nn.Linear)]
    last_names = sorted({name.rsplit(".", 1)[-1] for name in linears})
    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    if not requested:
        if model_type not in TARGET_MODULES:
            raise ValueError(
                f"LoRA: no default target modules for encoder model type {model_type!r}; pass "
                f"--lora_target_modules with names of its linear layers, from {last_names}."
            )
        requested = [t for t in TARGET_MODULES[model_type] if t in last_names]
    unmatched = [t for t in requested if not any(n == t or n.endswith("." + t) for n in linears)]
    if unmatched or not requested:
        raise ValueError(
            f"LoRA: --lora_target_modules {list(unmatched or requested)} match no linear layer of the encoder "
            f"({type(encoder).__name__}, model type {model_type!r}); its linear layers are named {last_names}."
        )
    return list(requested)


def lora_settings(model_args: ModelArguments, encoder: torch.nn.Module) -> dict:
    """r, alpha, dropout and target modules of this run, defaults resolved (what metrics.json records)."""
    return {
        "r": model_args.lora_r,
        "alpha": float(model_args.lora_alpha or DEFAULT_ALPHA_PER_RANK * model_args.lora_r),
        "dropout": float(DEFAULT_DROPOUT if model_args.lora_dropout is None else model_args.lora_dropout),
        "target_modules": resolve_targets(encoder, model_args.lora_target_modules),
        "save": model_args.lora_save,
    }


def apply_lora(model: MultiTaskModel, model_args: ModelArguments) -> dict | None:
    """Inject LoRA layers into `model.encoder` (in place; works on a meta-device skeleton too). The encoder's own
    weights stop training, the adapters and everything outside the encoder (heads) train. Returns the settings,
    or None when LoRA is off."""
    if not enabled(model_args):
        return None
    import peft

    settings = lora_settings(model_args, model.encoder)
    config = peft.LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=settings["target_modules"],
        bias="none",
    )
    peft.inject_adapter_in_model(config, model.encoder)
    return settings


def has_adapters(model: torch.nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merged_copy(model: MultiTaskModel) -> MultiTaskModel:
    """A copy of `model` with every adapter folded into its base weight and the LoRA layers removed: the same
    modules and state-dict keys as a model trained without LoRA. `model` itself is left as it is."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.encoder.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)  # safe_merge: raises on non-finite merged weights
            parent_name, _, child = name.rpartition(".")
            parent = merged.encoder.get_submodule(parent_name) if parent_name else merged.encoder
            setattr(parent, child, module.get_base_layer())
    if hasattr(merged.encoder, "peft_config"):
        del merged.encoder.peft_config
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def save_adapter(model: MultiTaskModel, folder: str | Path) -> list[str]:
    """Replace the full weights in `folder` (a `save_pretrained` folder of the merged model) by the adapter alone,
    in peft's format (loads with `PeftModel.from_pretrained(encoder, folder)`), and the heads (heads.safetensors).
    config.json, modeling_multitask.py and the tokenizer stay. Returns the names written."""
    import peft

    folder = Path(folder)
    for path in [folder / "model.safetensors.index.json", *folder.glob("model*.safetensors")]:
        path.unlink(missing_ok=True)
    adapter = peft.get_peft_model_state_dict(model.encoder)
    # The keys PeftModel.save_pretrained writes for a model it wraps (its base_model.model).
    save_file(
        {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in adapter.items()},
        str(folder / ADAPTER_WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    config = copy.deepcopy(model.encoder.peft_config["default"])
    config.base_model_name_or_path = model.config.encoder_name_or_path
    config.inference_mode = True
    config.save_pretrained(str(folder))
    rest = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    save_file(rest, str(folder / HEADS_FILE), metadata={"format": "pt"})
    return [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, HEADS_FILE]


def load_adapter_folder(folder: str | Path, encoder: str | None = None) -> MultiTaskModel:
    """Rebuild the merged model from a `--lora_save adapter` folder: the base encoder (`encoder`, default the one
    named in adapter_config.json), its adapter and the heads. Reads safetensors and JSON only."""
    import peft

    folder = Path(folder)
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, HEADS_FILE, "config.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} has no {name}: not a folder written with --lora_save adapter.")
    adapter_config = peft.LoraConfig.from_pretrained(str(folder))
    config = MultiTaskConfig.from_pretrained(folder)
    encoder = encoder or adapter_config.base_model_name_or_path
    from train import resolve_encoder  # the packaged MiniLM for its Hub id

    model = MultiTaskModel.from_encoder(resolve_encoder(encoder), config=config)
    adapter_config.inference_mode = False
    peft.inject_adapter_in_model(adapter_config, model.encoder)
    weights = {k.removeprefix("base_model.model."): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS_FILE)).items()}
    result = peft.set_peft_model_state_dict(model.encoder, weights)
    missing = [k for k in result.missing_keys if is_adapter_parameter(k)]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{folder / ADAPTER_WEIGHTS_FILE} does not fit encoder {encoder!r}: unexpected keys "
            f"{result.unexpected_keys[:5]}, missing adapter keys {missing[:5]}."
        )
    heads = load_file(str(folder / HEADS_FILE))
    outcome = model.load_state_dict(heads, strict=False)
    missing = [k for k in outcome.missing_keys if not k.startswith("encoder.")]
    if missing or outcome.unexpected_keys:
        raise ValueError(f"{folder / HEADS_FILE}: missing {missing}, unexpected {outcome.unexpected_keys}.")
    return merged_copy(model).eval()


# ---------------------------------------------------------------------------------------------------------
# Checks before the run
# ---------------------------------------------------------------------------------------------------------


def check_checkpoint(checkpoint: str, settings: dict | None) -> None:
    """Refuse to resume a checkpoint whose model holds other LoRA adapters than this run builds (or none where
    this run has them, or the reverse): the Trainer would load the matching keys and quietly skip the rest."""
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        return  # checkpoints.check_checkpoint names what is missing
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if ".lora_A." in k}
    ranks = sorted({shape[0] for shape in shapes.values()})
    targets = sorted({re.sub(r"\.lora_A\..*$", "", k).rsplit(".", 1)[-1] for k in shapes})
    if settings is None and not shapes:
        return
    wanted = (
        "no LoRA"
        if settings is None
        else f"--lora_r {settings['r']} on {sorted(settings['target_modules'])}"
    )
    found = "no LoRA adapters" if not shapes else f"LoRA adapters of rank {ranks} on {targets}"
    if settings is None or ranks != [settings["r"]] or targets != sorted(settings["target_modules"]):
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: the checkpoint holds {found}, this run asks for {wanted}; "
            f"resume with the LoRA settings of the run that wrote it."
        )


def check_training_setup(model_args: ModelArguments, training_args, export_sentence_transformers: str) -> None:
    """Refuse what LoRA does not combine with, before anything is written."""
    if not enabled(model_args):
        return
    if getattr(training_args, "fsdp", None) or getattr(training_args, "deepspeed", None):
        raise ValueError(
            "LoRA (--lora_r) is not supported with FSDP or DeepSpeed here: the final merge needs the whole model "
            "in one process. Use DDP (accelerate launch --multi_gpu) or one process."
        )
    if model_args.lora_save == "adapter" and export_sentence_transformers == "inline":
        raise ValueError(
            "--lora_save adapter writes the adapter alone, but --export_sentence_transformers inline would add a "
            "full copy of the merged encoder to the folder: pass --export_sentence_transformers none (or a DIR)."
        )
