"""A shared sentence encoder with one linear head per task.

    text -> encoder (any AutoModel encoder) -> token states -> pooling (mean) -> sentence embedding -> head[task] -> logits

This file is self-contained (torch, transformers and the standard library only): `save_pretrained`
copies it next to the weights, and `AutoModel.from_pretrained(path, trust_remote_code=True)` runs it
from the Hub or from a folder.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

POOLING_MODES = ("mean", "cls", "max")
# Sizes of the encoder config that must be positive integers for the model to be built at all.
ENCODER_SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)
LOSS_WEIGHTINGS = ("static", "uncertainty")
# Attention implementations an encoder may be built with, and the class flag that says it supports each one.
ATTN_SUPPORT_FLAGS = {
    "eager": None,
    "sdpa": "_supports_sdpa",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
    "flex_attention": "_supports_flex_attn",
}


class MultiTaskConfig(PretrainedConfig):
    r"""
    Configuration of a [`MultiTaskModel`]: the encoder's own config plus the pooling and the tasks.

    Args:
        encoder (`dict`, *optional*):
            The encoder's config as a dict (`BertConfig().to_dict()`), so the model can be rebuilt without
            the original checkpoint. Must hold a `model_type` known to `AutoConfig`.
        tasks (`list[dict]`, *optional*):
            One entry per task, in head order: `{"name": str, "num_labels": int, "id2label": {int: str}}`.
            The position of a task in this list is its task id.
        pooling (`str`, *optional*, defaults to `"mean"`):
            How token states become a sentence embedding: `"mean"` (mask-aware average), `"cls"` (first token)
            or `"max"` (mask-aware max).
        classifier_dropout (`float`, *optional*, defaults to 0.1):
            Dropout applied to the sentence embedding before each head.
        loss_weighting (`str`, *optional*, defaults to `"static"`):
            `"static"`: the joint loss is `sum_t task_weights[t] * loss_t`. `"uncertainty"`: learned
            homoscedastic-uncertainty weights (Kendall, Gal & Cipolla, 2018), `sum_t exp(-s_t) * loss_t + s_t`.
        task_weights (`dict[str, float]`, *optional*):
            Static weight per task name; tasks not listed weigh 1.0.
        encoder_name_or_path (`str`, *optional*):
            Where the encoder weights came from (a Hub id or a folder); informational only.
    """

    model_type = "multitask_sentence_encoder"

    def __init__(
        self,
        encoder: dict | None = None,
        tasks: list[dict] | None = None,
        pooling: str = "mean",
        classifier_dropout: float = 0.1,
        loss_weighting: str = "static",
        task_weights: dict[str, float] | None = None,
        encoder_name_or_path: str | None = None,
        **kwargs,
    ):
        self.encoder = dict(encoder) if encoder is not None else None
        self.tasks = [_normalise_task(t, i) for i, t in enumerate(tasks or [])]
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        self.loss_weighting = loss_weighting
        self.task_weights = dict(task_weights or {})
        self.encoder_name_or_path = encoder_name_or_path
        super().__init__(**kwargs)
        self._check()

    def _check(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"MultiTaskConfig: pooling={self.pooling!r} is not one of {list(POOLING_MODES)}.")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"MultiTaskConfig: loss_weighting={self.loss_weighting!r} is not one of {list(LOSS_WEIGHTINGS)}."
            )
        if not 0.0 <= float(self.classifier_dropout) < 1.0:
            raise ValueError(f"MultiTaskConfig: classifier_dropout={self.classifier_dropout} must be in [0, 1).")
        names = [t["name"] for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"MultiTaskConfig: duplicate task names {duplicates}; each task needs a unique name.")
        unknown = sorted(set(self.task_weights) - set(names))
        if unknown:
            raise ValueError(f"MultiTaskConfig: task_weights names unknown tasks {unknown}; known tasks: {names}.")
        for name, weight in self.task_weights.items():
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ValueError(f"MultiTaskConfig: task_weights[{name!r}]={weight!r} must be a finite number >= 0.")
        if self.encoder is not None:
            if "model_type" not in self.encoder:
                raise ValueError("MultiTaskConfig: the encoder config has no 'model_type'; save it with to_dict().")
            for key in ENCODER_SIZES:
                value = self.encoder.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    raise ValueError(
                        f"MultiTaskConfig: encoder {key}={value!r} must be a positive integer; the saved "
                        f"config.json is damaged or was edited by hand."
                    )

    def max_input_length(self, tokenizer) -> int:
        """Longest input a model of this config takes (`MultiTaskModel.max_input_length`), without building it."""
        positions = getattr(self.encoder_config(), "max_position_embeddings", None) or 512
        return int(min(tokenizer.model_max_length, positions))

    def to_dict(self) -> dict:
        # config.json names the encoder's built-in model type (e.g. "bert"), not this class's: AutoTokenizer reads
        # config.json through AutoConfig before tokenizer_config.json, and a model type unknown to transformers
        # there means remote code (an interactive "run the custom code?" prompt) just to load a tokenizer. auto_map
        # still sends AutoConfig/AutoModel with trust_remote_code=True to this file; get_config_dict maps it back.
        output = super().to_dict()
        if self.encoder is not None:
            output["model_type"] = self.encoder["model_type"]
        return output

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        encoder = config_dict.get("encoder")
        if isinstance(encoder, dict) and config_dict.get("model_type") == encoder.get("model_type"):
            config_dict["model_type"] = cls.model_type
        return config_dict, kwargs

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def encoder_config(self) -> PretrainedConfig:
        if self.encoder is None:
            raise ValueError("MultiTaskConfig has no encoder config; build it with MultiTaskModel.from_encoder().")
        encoder = dict(self.encoder)
        return AutoConfig.for_model(encoder.pop("model_type"), **encoder)


def encoder_config_dict(encoder_config: PretrainedConfig) -> dict:
    """The encoder's config as `MultiTaskConfig.encoder` stores it: without the keys of one particular save."""
    encoder = encoder_config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        encoder.pop(key, None)
    return encoder


def encoder_class(encoder_config: PretrainedConfig) -> type:
    """The class `AutoModel` builds for this encoder config (e.g. `BertModel` for a `BertConfig`)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(encoder_config)]
    except KeyError:
        raise ValueError(
            f"encoder model_type {encoder_config.model_type!r} has no AutoModel class in transformers; use an encoder "
            f"whose config.json names a model type transformers knows (bert, roberta, distilbert, electra, "
            f"deberta-v2, mpnet, modernbert, ...)."
        ) from None


def encoder_attn_implementation(cls: type, requested: str | None = None) -> str:
    """The attention implementation to build encoder class `cls` with.

    `None` or `"auto"`: `"sdpa"` where the class supports it, else `"eager"` (MPNet, DeBERTa-v2). An explicit
    choice the class does not support is refused, naming the ones it does.
    """
    supported = [name for name, flag in ATTN_SUPPORT_FLAGS.items() if flag is None or getattr(cls, flag, False)]
    if requested in (None, "auto"):
        return "sdpa" if "sdpa" in supported else "eager"
    if requested not in ATTN_SUPPORT_FLAGS:
        raise ValueError(
            f"attn_implementation={requested!r} is not one of {['auto', *ATTN_SUPPORT_FLAGS]}; use auto (sdpa "
            f"where the encoder supports it, else eager)."
        )
    if requested not in supported:
        raise ValueError(
            f"{cls.__name__} does not support attn_implementation={requested!r}; it supports {supported}. Use "
            f"--attn_implementation auto (picks {'sdpa' if 'sdpa' in supported else 'eager'} here) or one of those."
        )
    return requested


def encoder_build_kwargs(cls: type, attn_implementation: str | None = None) -> dict:
    """What `AutoModel.from_config`/`from_pretrained` get for encoder class `cls`: the attention implementation it
    supports, and `add_pooling_layer=False` where its `__init__` takes it (BERT, RoBERTa, MPNet; the heads read a
    pooled embedding of their own, so the pooler would be unused weights)."""
    kwargs = {"attn_implementation": encoder_attn_implementation(cls, attn_implementation)}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    return kwargs


def _normalise_task(task: dict, index: int) -> dict:
    if not isinstance(task, dict) or "name" not in task:
        raise ValueError(f"MultiTaskConfig: task #{index} must be a dict with a 'name', got {task!r}.")
    name = task["name"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"MultiTaskConfig: task #{index} has an empty or non-string name {name!r}.")
    id2label = task.get("id2label")
    num_labels = task.get("num_labels", len(id2label) if id2label else None)
    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(
            f"MultiTaskConfig: task {name!r} has num_labels={num_labels!r}; a classification head needs at least 2."
        )
    id2label = {int(k): str(v) for k, v in (id2label or {i: f"LABEL_{i}" for i in range(num_labels)}).items()}
    if sorted(id2label) != list(range(num_labels)):
        raise ValueError(
            f"MultiTaskConfig: task {name!r} has num_labels={num_labels} but id2label keys {sorted(id2label)}; "
            f"expected keys 0..{num_labels - 1}."
        )
    return {"name": name, "num_labels": num_labels, "id2label": id2label}


class _PoolerOnlyLoadReport(logging.Filter):
    """Drops transformers' load report when all it lists is the checkpoint's pooler weights, left unused on purpose
    (the encoder is built with add_pooling_layer=False: the heads read a mean-pooled embedding). Any other key, or a
    report this cannot read, is kept."""

    ROW = re.compile(r"^(\S+)\s*\|\s*([A-Z_]+)\s*\|", re.MULTILINE)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = self.ROW.findall(message)
        return not rows or any(status != "UNEXPECTED" or not key.startswith("pooler.") for key, status in rows)


@dataclass
class MultiTaskOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`, *optional*): joint loss over the tasks with labels in the batch.
        logits (`dict[str, torch.FloatTensor]` or `torch.FloatTensor`): `(batch, num_labels)` per task, or one
            tensor when a single `task` was selected.
        embeddings (`torch.FloatTensor`): pooled sentence embeddings, `(batch, hidden)`.
        task_losses (`dict[str, torch.FloatTensor]`, *optional*): unweighted mean loss of each task over its rows
            in the batch; every task is present, with 0 for a task that has no rows in the batch.
        task_weights (`dict[str, torch.FloatTensor]`, *optional*): the weight each task loss got.
    """

    loss: torch.FloatTensor | None = None
    logits: dict[str, torch.FloatTensor] | torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    task_losses: dict[str, torch.FloatTensor] | None = None
    task_weights: dict[str, torch.FloatTensor] | None = None


def _is_compiling() -> bool:
    """Inside torch.compile's tracing or a CUDA graph recording, where reading a tensor on the host is not allowed."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def pool(token_states: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Turn `(batch, seq, hidden)` token states into `(batch, hidden)` sentence embeddings, ignoring padding."""
    if mode == "cls":
        return token_states[:, 0]
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)  # (batch, seq, 1)
    if mode == "max":
        return token_states.masked_fill(mask == 0, torch.finfo(token_states.dtype).min).max(dim=1).values
    summed = (token_states * mask).sum(dim=1)  # (batch, hidden)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # (batch, 1)
    return summed / counts


class MultiTaskPreTrainedModel(PreTrainedModel):
    config_class = MultiTaskConfig
    config: MultiTaskConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # The encoder is a PreTrainedModel of its own: transformers dispatches its modules to its own init.
        super()._init_weights(module)
        if isinstance(module, MultiTaskModel) and module.loss_log_vars is not None:
            nn.init.zeros_(module.loss_log_vars)


class MultiTaskModel(MultiTaskPreTrainedModel):
    """Shared encoder + pooling + one `nn.Linear` head per task; `forward` routes rows to heads by task id.

    Any `AutoModel` encoder: it is built with only the arguments its class accepts (`encoder_build_kwargs`), and
    gets `token_type_ids` only when its `forward` takes them (DistilBERT, MPNet and ModernBERT do not).
    `encoder_attn_implementation`: `None`/`"auto"` (sdpa where the encoder supports it, else eager), or one the
    encoder supports; e.g. `AutoModel.from_pretrained(folder, trust_remote_code=True,
    encoder_attn_implementation="eager")`.
    """

    def __init__(self, config: MultiTaskConfig, encoder_attn_implementation: str | None = None):
        super().__init__(config)
        if not config.tasks:
            raise ValueError("MultiTaskModel needs at least one task in config.tasks.")
        encoder_config = config.encoder_config()
        self.encoder = AutoModel.from_config(
            encoder_config, **encoder_build_kwargs(encoder_class(encoder_config), encoder_attn_implementation)
        )
        self.encoder_takes_token_type_ids = "token_type_ids" in inspect.signature(self.encoder.forward).parameters
        hidden = self.encoder.config.hidden_size
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.heads = nn.ModuleDict({t["name"]: nn.Linear(hidden, t["num_labels"]) for t in config.tasks})
        if config.loss_weighting == "uncertainty":
            # s_t = log(sigma_t^2), one per task (Kendall, Gal & Cipolla, 2018).
            self.loss_log_vars = nn.Parameter(torch.zeros(len(config.tasks)))
        else:
            self.loss_log_vars = None
        self.post_init()

    @classmethod
    def from_encoder(
        cls,
        encoder_name_or_path: str,
        tasks: list[dict] | None = None,
        pooling: str = "mean",
        classifier_dropout: float = 0.1,
        loss_weighting: str = "static",
        task_weights: dict[str, float] | None = None,
        config: MultiTaskConfig | None = None,
        **encoder_kwargs,
    ) -> "MultiTaskModel":
        """Start from pretrained encoder weights (a Hub id or a local folder) with freshly initialised heads.

        `config`: a `MultiTaskConfig` already built on this encoder's config (train.py builds it once, in its
        checks); the task and head arguments are then ignored.

        Weights load as float32 unless `dtype` is given: mixed precision (bf16/fp16 autocast) wants fp32 master
        weights, and a half-precision checkpoint would otherwise train in half precision.
        """
        encoder_kwargs.setdefault("dtype", torch.float32)
        attn_implementation = encoder_kwargs.pop("attn_implementation", None)
        if config is not None:
            encoder_config = config.encoder_config()
        else:
            encoder_config = AutoConfig.from_pretrained(encoder_name_or_path)
        build_kwargs = encoder_build_kwargs(encoder_class(encoder_config), attn_implementation)
        report_logger = logging.getLogger("transformers.modeling_utils")
        quiet_pooler = _PoolerOnlyLoadReport()
        report_logger.addFilter(quiet_pooler)
        try:
            encoder = AutoModel.from_pretrained(encoder_name_or_path, **build_kwargs, **encoder_kwargs)
        finally:
            report_logger.removeFilter(quiet_pooler)
        if config is None:
            config = MultiTaskConfig(
                encoder=encoder_config_dict(encoder.config),
                tasks=tasks,
                pooling=pooling,
                classifier_dropout=classifier_dropout,
                loss_weighting=loss_weighting,
                task_weights=task_weights,
                encoder_name_or_path=str(encoder_name_or_path),
            )
        model = cls(config, encoder_attn_implementation=build_kwargs["attn_implementation"])
        model.encoder.load_state_dict(encoder.state_dict())
        model.to(encoder.dtype)
        return model

    def task_id(self, task: str) -> int:
        names = self.config.task_names
        if task not in names:
            raise ValueError(f"Unknown task {task!r}; this model's tasks are {names}.")
        return names.index(task)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.encoder_takes_token_type_ids:
            # Encoders without segment embeddings (DistilBERT, MPNet, ModernBERT) take no token_type_ids; a BERT-style
            # tokenizer still returns them (all zeros for one sentence), so they are dropped here.
            inputs["token_type_ids"] = token_type_ids
        token_states = self.encoder(**inputs).last_hidden_state  # (batch, seq, hidden)
        return pool(token_states, attention_mask, self.config.pooling)  # (batch, hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task: str | None = None,
    ) -> MultiTaskOutput:
        """
        Args:
            task_ids: `(batch,)` task index of each row's label (position in `config.tasks`); needed with `labels`
                unless `task` names the single task of the whole batch.
            labels: `(batch,)` class index of each row, for the head named by its task id.
            task: a task name; then `logits` is that head's tensor instead of a dict.
        """
        if task is not None:
            selected = self.task_id(task)
            if task_ids is None:
                task_ids = torch.full_like(input_ids[:, 0], selected)
        embeddings = self.embed(input_ids, attention_mask, token_type_ids)
        features = self.dropout(embeddings)
        # One encoder pass serves every head: heads are tiny, so every row goes through each of them.
        logits = {name: head(features) for name, head in self.heads.items()}  # name -> (batch, num_labels)

        loss = task_losses = task_weights = None
        if labels is not None:
            if task_ids is None:
                raise ValueError("forward() got labels without task_ids (or task): cannot tell which head they train.")
            # The range check reads the ids on the host; skipped inside torch.compile (it would break the graph)
            # and inside CUDA graph recordings (where it is an error).
            if not _is_compiling() and bool(((task_ids < 0) | (task_ids >= len(self.heads))).any()):
                # Rows with an unknown task id would otherwise train no head and vanish from the loss.
                raise ValueError(
                    f"forward() got task_ids {sorted(set(task_ids.tolist()))}; this model's task ids are "
                    f"0..{len(self.heads) - 1} ({self.config.task_names})."
                )
            loss, task_losses, task_weights = self._joint_loss(features, logits, labels, task_ids)

        if task is not None:
            logits = logits[task]
        return MultiTaskOutput(
            loss=loss, logits=logits, embeddings=embeddings, task_losses=task_losses, task_weights=task_weights
        )

    def max_input_length(self, tokenizer) -> int:
        """Longest input this model takes: the tokenizer's limit, capped by the encoder's position table
        (tokenizers without a limit report a huge sentinel as `model_max_length`)."""
        return self.config.max_input_length(tokenizer)

    @torch.inference_mode()
    def predict(
        self,
        texts: list[str],
        tokenizer,
        batch_size: int = 64,
        max_length: int | None = None,
        return_embeddings: bool = False,
        show_progress_bar: bool = False,
    ) -> list[dict]:
        """Label every text for every task with one encoder pass per batch.

        Texts are sorted by token count so each batch pads only to its own longest row (never to the model's
        maximum length); results come back in input order. Runs in eval mode on the model's device.

        Args:
            texts: raw sentences.
            tokenizer: the tokenizer saved with the model (`AutoTokenizer.from_pretrained(same folder)`).
            batch_size: texts per encoder pass.
            max_length: truncate longer inputs to this many tokens; default `max_input_length(tokenizer)`.
            return_embeddings: also return each text's pooled sentence embedding as a list of floats.
            show_progress_bar: a tqdm bar over texts on stderr.

        Returns:
            One dict per text: `{task: {"label": str, "score": float}, ...}` (score = softmax probability of the
            label), plus `"embedding": list[float]` when `return_embeddings`.
        """
        from transformers.utils import logging as hf_logging

        if isinstance(texts, str):
            raise ValueError("predict() takes a list of texts; wrap a single text in a list: predict([text], ...).")
        if batch_size < 1:
            raise ValueError(f"predict(): batch_size must be >= 1, got {batch_size}.")
        texts = list(texts)
        if not texts:
            return []
        max_length = max_length or self.max_input_length(tokenizer)
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]), reverse=True)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        results: list[dict | None] = [None] * len(texts)
        was_training = self.training
        self.eval()
        try:
            with hf_logging.tqdm(total=len(texts), unit="text", disable=not show_progress_bar) as bar:
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    batch = tokenizer.pad(
                        [{k: encoded[k][i] for k in keys} for i in rows], padding="longest", return_tensors="pt"
                    )
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    output = self(**batch)
                    probabilities = {name: logits.float().softmax(-1).cpu() for name, logits in output.logits.items()}
                    embeddings = output.embeddings.float().cpu() if return_embeddings else None
                    for j, i in enumerate(rows):
                        result = {}
                        for task in self.config.tasks:
                            score, label = probabilities[task["name"]][j].max(-1)
                            result[task["name"]] = {"label": task["id2label"][int(label)], "score": float(score)}
                        if embeddings is not None:
                            result["embedding"] = embeddings[j].tolist()
                        results[i] = result
                    bar.update(len(rows))
        finally:
            self.train(was_training)
        return results

    def _joint_loss(
        self, features: torch.Tensor, logits: dict[str, torch.Tensor], labels: torch.Tensor, task_ids: torch.Tensor
    ):
        # Masked sums instead of `logits[name][task_ids == index]`: no shape or branch depends on the data, so
        # the loss never waits for the GPU (no device->host sync) and compiles into one graph. Every head stays
        # in the graph (DDP finds no unused parameters); a task without rows in the batch adds exactly 0.
        total = None
        task_losses, task_weights = {}, {}
        for index, name in enumerate(self.config.task_names):
            rows = task_ids == index  # (batch,)
            count = rows.sum()
            # The head sees other tasks' rows through detached features, and their logits are replaced by zeros that
            # the loss ignores: no gradient of those rows reaches the encoder or the head, so a broken (NaN) head
            # cannot turn another task's loss or the encoder's gradients into NaN (0 @ NaN is NaN).
            own_features = torch.where(rows[:, None], features, features.detach())  # (batch, hidden)
            head_logits = torch.where(rows[:, None], self.heads[name](own_features).float(), 0.0)  # (batch, labels)
            # Other tasks' labels may be out of this head's range: ignore_index (-100) hides them.
            per_row = F.cross_entropy(head_logits, labels.masked_fill(~rows, -100), reduction="none")
            task_loss = per_row.sum() / count.clamp(min=1)  # mean over this task's rows; 0 without rows
            if self.loss_log_vars is not None:
                log_var = self.loss_log_vars[index]
                weight = torch.exp(-log_var)
                # The regulariser s_t counts only for tasks present in the batch.
                term = weight * task_loss + (count > 0).to(log_var.dtype) * log_var
                task_weights[name] = weight.detach()
            else:
                # A Python float, not a tensor: inductor folds `ones * loss` into `loss` and then returned the loss
                # without its grad_fn beside `task_loss.detach()` (torch 2.13, single-task model).
                weight = float(self.config.task_weights.get(name, 1.0))
                term = task_loss * weight
                task_weights[name] = torch.full_like(task_loss, weight)
            task_losses[name] = task_loss.detach()
            total = term if total is None else total + term
        return total, task_losses, task_weights


__all__ = [
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
    "MultiTaskPreTrainedModel",
    "encoder_attn_implementation",
    "encoder_build_kwargs",
    "encoder_class",
    "pool",
]
