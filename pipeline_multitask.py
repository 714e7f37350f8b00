"""The `transformers.pipeline` of a multi-task model: every task's label and score for each text, or one task's.

This file is self-contained (torch, transformers and the standard library only) and ships next to the weights,
like modeling_multitask.py: the saved config.json names it under `custom_pipelines`, so

    pipe = pipeline(model=folder_or_repo, trust_remote_code=True)
    pipe(["is this any good", "a fine film"], batch_size=32)
    # [{"sentiment": {"label": "positive", "score": 0.93}, "question": {"label": "question", "score": 0.98}}, ...]

    pipe = pipeline("text-classification", model=folder_or_repo, trust_remote_code=True, task_name="sentiment")
    pipe("a fine film")  # {"label": "positive", "score": 0.93}, as text-classification pipelines answer

Call arguments: `top_k` (1: the best label; k: the k best, as a list; None: every label), `task_name` (one task,
answered like the stock text-classification pipeline), `return_embedding` (the pooled sentence embedding as a list
of floats, all-task answers only), `truncation` (default True) and `max_length` (default: the tokenizer's limit,
capped by the encoder's position table), and the pipeline's own `batch_size`.
"""

from __future__ import annotations

import torch
from transformers import Pipeline

# The entry the saved config.json carries under `custom_pipelines` (written by outputs.save_outputs). Registered
# under the task name the model card declares (`pipeline_tag: text-classification`), so `pipeline(model=...)`
# infers it and `pipeline("text-classification", model=...)` picks this class for this model only. It is not put in
# PIPELINE_REGISTRY at import: that would replace the stock text-classification pipeline in the whole process.
PIPELINE_TASK = "text-classification"
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {"impl": "pipeline_multitask.MultiTaskClassificationPipeline", "pt": ["AutoModel"], "type": "text"}
}


class MultiTaskClassificationPipeline(Pipeline):
    """Text classification with every head of a `MultiTaskModel` in one encoder pass per batch."""

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(
        self, top_k="", task_name=None, return_embedding=None, truncation=None, max_length=None, **kwargs
    ):
        if kwargs:
            raise ValueError(
                f"MultiTaskClassificationPipeline got unknown arguments {sorted(kwargs)}; it takes top_k, task_name, "
                f"return_embedding, truncation, max_length (and the pipeline's batch_size, device)."
            )
        preprocess_params, postprocess_params = {}, {}
        if truncation is not None:
            preprocess_params["truncation"] = truncation
        if max_length is not None:
            preprocess_params["max_length"] = max_length
        if top_k != "":
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"top_k must be a positive integer or None (every label), got {top_k!r}.")
            postprocess_params["top_k"] = top_k
        if task_name is not None:
            names = [t["name"] for t in self.model.config.tasks]
            if task_name not in names:
                raise ValueError(f"Unknown task_name {task_name!r}; this model's tasks are {names}.")
            postprocess_params["task_name"] = task_name
        if return_embedding is not None:
            postprocess_params["return_embedding"] = bool(return_embedding)
        if postprocess_params.get("task_name") is not None and postprocess_params.get("return_embedding"):
            raise ValueError("return_embedding=True answers every task; drop task_name to get the embedding.")
        return preprocess_params, {}, postprocess_params

    def _max_length(self) -> int:
        positions = getattr(getattr(self.model, "encoder", self.model).config, "max_position_embeddings", None) or 512
        return int(min(self.tokenizer.model_max_length, positions))

    def preprocess(self, inputs, truncation=True, max_length=None):
        if not isinstance(inputs, str):
            raise ValueError(f"MultiTaskClassificationPipeline takes a string or a list of strings, got {inputs!r}.")
        return self.tokenizer(
            inputs, return_tensors="pt", truncation=truncation, max_length=max_length or self._max_length()
        )

    def _forward(self, model_inputs):
        keys = ("input_ids", "attention_mask", "token_type_ids")
        output = self.model(**{k: v for k, v in model_inputs.items() if k in keys})
        # One tensor per key so the pipeline's batching can split rows: the heads' logits side by side.
        logits = torch.cat([output.logits[t["name"]] for t in self.model.config.tasks], dim=-1)
        return {"logits": logits, "embeddings": output.embeddings}

    def postprocess(self, model_outputs, top_k=1, task_name=None, return_embedding=False):
        logits = model_outputs["logits"][0].float()
        answer, start = {}, 0
        for task in self.model.config.tasks:
            probabilities = logits[start : start + task["num_labels"]].softmax(-1)
            start += task["num_labels"]
            if task_name is not None and task["name"] != task_name:
                continue
            k = len(probabilities) if top_k is None else min(top_k, len(probabilities))
            scores, labels = probabilities.topk(k)
            ranked = [
                {"label": task["id2label"][int(label)], "score": float(score)}
                for score, label in zip(scores.tolist(), labels.tolist())
            ]
            answer[task["name"]] = ranked[0] if top_k == 1 else ranked
        if task_name is not None:
            return answer[task_name]
        if return_embedding:
            answer["embedding"] = model_outputs["embeddings"][0].float().tolist()
        return answer
