"""Data and task wiring for recipes: model, tokenizer, datasets, collator and metrics per task.

Two tasks:

* `text-classification`: `AutoModelForSequenceClassification`, inputs truncated to
  `max_seq_length`, padded per batch; metrics from the shipped `evaluate` scripts
  (accuracy, F1 — binary for two classes, macro otherwise).
* `causal-lm`: `AutoModelForCausalLM`, texts concatenated (EOS between them) and cut into
  blocks of `max_seq_length` tokens, labels = inputs; eval loss, perplexity = exp(loss), and
  next-token accuracy if asked.

Data comes from `dataset_name` (`datasets.load_dataset`), from local `train_file`/`eval_file`,
or — with neither — from the embedded real data that works offline: VADER's movie-review
sentiment snippets (`embedded.load_sentiment`) or Jane Austen's novels (`embedded.load_austen`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .config import CONFIG_KEY
from .embedded import resolve_model_path
from .hub import from_pretrained
from .recipe import TASKS, DataArguments, ModelArguments

__all__ = ["TaskSetup", "add_perplexity", "infer_task", "position_limit", "scale_batches", "setup_task"]

logger = logging.get_logger(__name__)

COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz")  # decompressed by `datasets` on load


def infer_task(config: Any) -> str:
    """The recipe task a transformers config's architecture implies.

    A causal-LM or classifier head decides; a bare model (`Qwen2Model`) is causal LM when its type is a
    decoder-only one: it has a causal-LM class and no masked-LM class (BERT has both) and no encoder.

    Raises:
        ValueError: the head is a seq2seq LM (`T5ForConditionalGeneration`), which no recipe task trains.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    architectures = getattr(config, "architectures", None) or []
    if seq2seq := set(architectures) & set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ValueError(
            f"The model is a seq2seq LM ({', '.join(sorted(seq2seq))}); recipes train {' and '.join(TASKS)}. Set "
            "`task: text-classification` to fine-tune a new classification head on it, or fine-tune it as a seq2seq "
            "LM in Python with `UnitScaleSeq2SeqTrainer`."
        )
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    if _is_classifier(config):
        return "text-classification"
    decoder_only = (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_encoder_decoder", False)
    )
    return "causal-lm" if decoder_only or getattr(config, "is_decoder", False) else "text-classification"


@dataclass
class TaskSetup:
    """Everything a Trainer needs for one recipe."""

    task: str
    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    data_collator: Callable
    compute_metrics: Callable | None
    preprocess_logits_for_metrics: Callable | None


# --------------------------------------------------------------------------- raw data


def _load_raw(data_args: DataArguments, task: str, seed: int):
    """(train, eval) `datasets.Dataset`s with a text column (and a label column for classification)."""
    import datasets

    if data_args.train_file or data_args.eval_file:
        train, evaluation = (
            _load_file(path, key) if path else None
            for key, path in (("train_file", data_args.train_file), ("eval_file", data_args.eval_file))
        )
    elif data_args.dataset_name:
        train = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, split=data_args.train_split
        )
        evaluation = None
        if data_args.eval_split is not None:
            evaluation = datasets.load_dataset(
                data_args.dataset_name, data_args.dataset_config_name, split=data_args.eval_split
            )
    else:
        from . import embedded

        load = embedded.load_sentiment if task == "text-classification" else embedded.load_austen
        train, evaluation = load("train"), None if data_args.eval_split is None else load("test")
    if train is None:
        raise ValueError("No training data: set `dataset_name`, `train_file`, or neither (embedded data).")
    for name, ds in (("training", train), ("evaluation", evaluation)):
        if ds is None:
            continue
        needed = [data_args.text_column] + ([data_args.label_column] if task == "text-classification" else [])
        for column in needed:
            key = "text_column" if column == data_args.text_column else "label_column"
            if column not in ds.column_names:
                raise ValueError(
                    f"The {name} data has no column {column!r} (`{key}`); its columns are {ds.column_names}."
                )
            missing = next((row for row, value in enumerate(ds[column]) if value is None), None)
            if missing is not None:
                raise ValueError(
                    f"Row {missing} of the {name} data has no value in column {column!r} (`{key}`); drop or fill "
                    "the rows with missing values."
                )
    train = train.shuffle(seed=seed)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def _load_file(path: str, key: str):
    """A .csv/.tsv/.json/.jsonl/.txt file, or one compressed (`.jsonl.gz`, `.csv.bz2`, `.txt.xz`), as a
    `datasets.Dataset`, read by its own suffix."""
    import datasets

    name = path.lower()
    for compression in COMPRESSED_SUFFIXES:
        name = name.removesuffix(compression)
    suffix = name.rsplit(".", 1)[-1]
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "txt": "text", "tsv": "csv"}.get(suffix)
    if builder is None:
        raise ValueError(
            f"`{key}` should be .csv, .tsv, .json, .jsonl or .txt (optionally {', '.join(COMPRESSED_SUFFIXES)}), "
            f"got {path!r}."
        )
    kwargs = {"delimiter": "\t"} if suffix == "tsv" else {}
    return datasets.load_dataset(builder, data_files={"train": path}, split="train", **kwargs)


def _label_names(train, column: str) -> list[str] | None:
    """The class names of a `ClassLabel` label column, else None."""
    import datasets

    feature = train.features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


# --------------------------------------------------------------------------- tokenization


def _tokenize_classification(ds, tokenizer, data_args: DataArguments, label_to_id: dict | None):
    if ds is None:
        return None

    def encode(batch):
        out = tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)
        labels = batch[data_args.label_column]
        out["labels"] = [label_to_id[v] for v in labels] if label_to_id else [int(v) for v in labels]
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


def _tokenize_causal_lm(ds, tokenizer, data_args: DataArguments):
    if ds is None:
        return None
    block = data_args.max_seq_length
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch[data_args.text_column])["input_ids"]]}

    def group(batch):
        # concatenate, then cut into full blocks (the tail shorter than a block is dropped)
        ids = [t for seq in batch["input_ids"] for t in seq]
        n = (len(ids) // block) * block
        blocks = [ids[i : i + block] for i in range(0, n, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": [b[:] for b in blocks]}

    tokens = ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")
    return tokens.map(group, batched=True, batch_size=1000, desc=f"Grouping into blocks of {block}")


# --------------------------------------------------------------------------- metrics


def _classification_metrics(names: list[str], num_labels: int) -> Callable:
    from .metrics import load_metric

    metrics = {name: load_metric(name) for name in names}

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.argmax(logits, axis=-1)
        out = {}
        for name, metric in metrics.items():
            is_f1 = getattr(metric, "name", name) == "f1"  # also when given by path
            kwargs = {"average": "binary" if num_labels == 2 else "macro"} if is_f1 else {}
            out.update(metric.compute(predictions=predictions, references=labels, **kwargs))
        return out

    return compute


def _causal_lm_metrics(names: list[str]) -> tuple[Callable | None, Callable | None]:
    unknown = [n for n in names if n != "accuracy"]
    if unknown:
        logger.warning(f"Causal LM recipes compute `accuracy` (next-token) only; ignoring metrics {unknown}.")
    if "accuracy" not in names:
        return None, None
    from .metrics import load_metric

    accuracy = load_metric("accuracy")

    def preprocess(logits, labels):
        logits = logits[0] if isinstance(logits, tuple) else logits
        return logits.argmax(dim=-1)  # keep only the argmax: full logits of every eval batch do not fit

    def compute(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        # position t predicts token t+1
        predictions, labels = predictions[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)
        keep = labels != -100
        return accuracy.compute(predictions=predictions[keep], references=labels[keep])

    return compute, preprocess


def add_perplexity(metrics: dict[str, float], prefix: str = "eval") -> dict[str, float]:
    """Add `<prefix>_perplexity` = exp(`<prefix>_loss`) (inf when the loss is too large)."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(loss) if loss < 700 else math.inf
    return metrics


# --------------------------------------------------------------------------- setup


def _load_model(path: str, config: Any, auto_class: type, **kwargs: Any):
    """A checkpoint hf_unitscale saved (its config has a `unit_scaling` block: unit-scaled Ŵ, s, a, c, or merged W
    with a, c) loads through `hf_unitscale.from_pretrained`; a plain one through transformers, and the trainer
    converts it with the recipe's options."""
    if hasattr(config, CONFIG_KEY):
        return from_pretrained(path, model_class=auto_class, **kwargs)
    return auto_class.from_pretrained(path, **kwargs)


def _pretrained_label_ids(config: Any, values: list) -> dict | None:
    """{label: id} from a fine-tuned classifier's `label2id` when it names exactly the data's labels (its head's rows
    keep their classes, as run_glue keeps them); None for transformers' placeholder names (LABEL_0, …)."""
    label2id = getattr(config, "label2id", None) or {}
    if set(label2id) != {str(v) for v in values} or all(k.startswith("LABEL_") for k in label2id):
        return None
    return {v: int(label2id[str(v)]) for v in values}


def _is_classifier(config: Any) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])


def position_limit(config: Any, tokenizer: Any = None) -> int | None:
    """The most tokens per example a model takes: the smaller of its position table (`max_position_embeddings`,
    GPT-2's `n_positions`) and the tokenizer's `model_max_length`; None when neither sets one."""
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions")]
    if tokenizer is not None and tokenizer.model_max_length < 1e9:  # 1e30: no limit
        limits.append(tokenizer.model_max_length)
    return min((n for n in limits if n), default=None)


def _within_positions(data_args: DataArguments, config: Any, tokenizer: Any) -> DataArguments:
    """`data_args` with `max_seq_length` at most the model's position limit, as run_clm/run_glue clamp it."""
    limit = position_limit(config, tokenizer)
    if limit is None or data_args.max_seq_length <= limit:
        return data_args
    logger.warning(
        f"`max_seq_length` {data_args.max_seq_length} is more than the model takes ({limit} positions); using {limit}."
    )
    return dataclasses.replace(data_args, max_seq_length=limit)


def _check_vocabulary(tokenizer: Any, config: Any, model_args: ModelArguments) -> None:
    """The tokenizer's ids must index the model's embedding: a tokenizer with more tokens than `vocab_size` is an
    error (its ids past the table fail deep in torch, or train one row for many tokens); another model's tokenizer
    with fewer tokens warns (its ids name other tokens than the model learned). A model's own tokenizer may have
    fewer tokens: tables are often padded to a multiple of 64 or 128."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows, tokens = getattr(text_config, "vocab_size", None), len(tokenizer)
    if not rows or tokens == rows:
        return
    other = model_args.tokenizer_name is not None and resolve_model_path(model_args.tokenizer_name) != (
        resolve_model_path(model_args.model_name_or_path)
    )
    source = (
        f"The tokenizer `tokenizer_name` {model_args.tokenizer_name!r}"
        if other
        else f"The tokenizer of {model_args.model_name_or_path!r}"
    )
    sizes = f"{source} has {tokens} tokens and the model's embedding {rows} rows (`vocab_size`)"
    if tokens > rows:
        fix = (
            "Drop `tokenizer_name` to use the model's own tokenizer."
            if other
            else "Resize the model's embeddings to it (`model.resize_token_embeddings(len(tokenizer))`) and save the "
            "model, or give a tokenizer that fits as `tokenizer_name`."
        )
        raise ValueError(f"{sizes}: token ids from {rows} on have no row. {fix}")
    if other:
        logger.warning(
            f"{sizes}: unless it is the model's own vocabulary, its ids name other tokens than the model learned. "
            "Drop `tokenizer_name` to use the model's own tokenizer."
        )


def setup_task(model_args: ModelArguments, data_args: DataArguments, *, seed: int = 42) -> TaskSetup:
    """Load the model, tokenizer and data of a recipe and wire collator and metrics for its task."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        default_data_collator,
    )

    path = resolve_model_path(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(path)
    task = model_args.task or infer_task(config)
    if task not in TASKS:
        raise ValueError(f"`task` should be one of {TASKS}, got {task!r}.")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_args.tokenizer_name or path))
    _check_vocabulary(tokenizer, config, model_args)
    data_args = _within_positions(data_args, config, tokenizer)
    train_raw, eval_raw = _load_raw(data_args, task, seed)

    if task == "text-classification":
        names = _label_names(train_raw, data_args.label_column)
        label_to_id = None
        if names is None:
            values = sorted(set(train_raw[data_args.label_column]))
            if not all(isinstance(v, (int, np.integer)) for v in values) or values != list(range(len(values))):
                label_to_id = _pretrained_label_ids(config, values) or {v: i for i, v in enumerate(values)}
                names = [str(v) for v in sorted(label_to_id, key=label_to_id.get)]
        data_labels = len(names) if names else int(max(train_raw[data_args.label_column])) + 1
        if model_args.num_labels and names and model_args.num_labels != len(names):
            raise ValueError(
                f"`num_labels` is {model_args.num_labels}, but `label_column` {data_args.label_column!r} has "
                f"{len(names)} labels: {names[:10]}."
            )
        num_labels = model_args.num_labels or data_labels
        if _is_classifier(config) and config.num_labels != num_labels and not model_args.ignore_mismatched_sizes:
            column = f"`label_column` {data_args.label_column!r}"
            wanted = (
                f"`num_labels` is {num_labels} (the data's {column} has {data_labels})"
                if model_args.num_labels
                else f"the data's {column} has {num_labels}"
            )
            raise ValueError(
                f"The checkpoint's classifier (its config's `num_labels`) has {config.num_labels} labels, but "
                f"{wanted}: pass `ignore_mismatched_sizes: true` to draw a new head, or check "
                f"{'`num_labels` and ' if model_args.num_labels else ''}`label_column`."
            )
        known = set(label_to_id) if label_to_id else set(range(num_labels))
        unseen = sorted(set(eval_raw[data_args.label_column]) - known, key=str) if eval_raw is not None else []
        if unseen:
            raise ValueError(
                f"The evaluation data has label(s) {unseen[:5]} in `label_column` {data_args.label_column!r} that the "
                f"training data lacks (its labels: {sorted(known, key=str)[:10]}); a classifier has no class for them."
            )
        extra = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}} if names else {}
        if model_args.ignore_mismatched_sizes:
            extra["ignore_mismatched_sizes"] = True
        model = _load_model(path, config, AutoModelForSequenceClassification, num_labels=num_labels, **extra)
        # its loss is a mean over the batch that ignores `num_items_in_batch`: without this, Trainer's
        # `average_tokens_across_devices` multiplies it by the number of processes (a DDP run's losses and
        # gradients N× a single process's), and gradient accumulation would not divide it
        model.accepts_loss_kwargs = False
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        train = _tokenize_classification(train_raw, tokenizer, data_args, label_to_id)
        evaluation = _tokenize_classification(eval_raw, tokenizer, data_args, label_to_id)
        collator = DataCollatorWithPadding(tokenizer)
        compute, preprocess = _classification_metrics(data_args.metrics, num_labels), None
    else:
        model = _load_model(path, config, AutoModelForCausalLM)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        train = _tokenize_causal_lm(train_raw, tokenizer, data_args)
        evaluation = _tokenize_causal_lm(eval_raw, tokenizer, data_args)
        for name, blocks in (("training", train), ("evaluation", evaluation)):
            if blocks is not None and len(blocks) == 0:
                raise ValueError(
                    f"The {name} text is shorter than one block of `max_seq_length` = {data_args.max_seq_length} "
                    "tokens."
                )
        collator = default_data_collator
        compute, preprocess = _causal_lm_metrics(data_args.metrics)
    return TaskSetup(task, model, tokenizer, train, evaluation, collator, compute, preprocess)


def scale_batches(
    setup: TaskSetup, count: int, batch_size: int, *, from_train: bool = False
) -> list[dict[str, torch.Tensor]]:
    """`count` collated batches (with labels) from the evaluation set (or the training set)."""
    ds = setup.train_dataset if from_train or setup.eval_dataset is None else setup.eval_dataset
    batches = []
    for start in range(0, min(len(ds), count * batch_size), batch_size):
        rows = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        batches.append(setup.data_collator(rows))
    return batches
