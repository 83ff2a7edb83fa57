"""The batches `hf-unitscale report` measures on.

With a tokenizer, real text — `--text-file` lines, else the embedded data (movie-review
snippets for encoders, Jane Austen for causal LMs), cycled when more rows are needed; without one
(e.g. a bare test model), seeded random token ids, which the output says (`--text-file` is then an
error: there is nothing to read it with). Labels make the loss the model's real training
loss: the real sentiment labels (or random ones) for a classifier, shaped for its problem type (class ids,
a 0/1 matrix for a multi-label head, float targets for regression), the inputs themselves for a
(causal, masked or sequence-to-sequence) LM; a bare encoder-decoder's decoder reads the input text too. The first
`--num-batches` batches are measured; the next `--num-batches` calibrate a, c, so x/a and g/c are measured on data
the scales were not fitted to. A checkpoint with calibrated a, c (trained in FP8) is measured with its own. Texts
too short for attention gradients (one token; two for a causal LM) get a warning that names them
(`warn_about_short_texts`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers.utils import logging

from .utils import CommandError

logger = logging.get_logger(__name__)


def label_kind(model) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "class"
    if name.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration")):
        return "tokens"  # a seq2seq LM's labels: the input text again (its decoder inputs are derived from them)
    if name.endswith("ForTokenClassification"):
        return "token_class"
    return None


def _labels_are_its_text(model) -> bool:
    """An LM trained on its own text shifted by one (causal, or a seq2seq decoder), not a masked LM."""
    return label_kind(model) == "tokens" and not type(model).__name__.endswith("ForMaskedLM")


def _texts(args: argparse.Namespace, causal: bool, count: int) -> tuple[list[str], list[int] | None]:
    if args.text_file:
        lines = [line.strip() for line in Path(args.text_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise CommandError(f"--text-file {args.text_file} has no non-empty line.")
        return [lines[i % len(lines)] for i in range(count)], None
    from .. import embedded

    try:
        data = embedded.load_austen("test") if causal else embedded.load_sentiment("test")
    except embedded.FetchError as err:  # e.g. no apt-get or rdata for the Austen text: the user's own text does
        first_line, newline, rest = str(err).partition("\n")
        hint = "; or pass --text-file FILE (one text a line) to measure on your own text"
        raise CommandError(first_line + hint + newline + rest) from err
    if causal:
        texts = list(data["text"])
        return [texts[i % len(texts)] for i in range(count)], None
    texts, labels = list(data["text"]), list(data["label"])
    rows = [i % len(texts) for i in range(count)]  # cycled, as the Austen text is
    return [texts[i] for i in rows], [labels[i] for i in rows]


def _class_labels(config, real: list[int] | None, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Labels for a sequence classifier's loss, as transformers picks it: class ids (single-label), a float 0/1
    matrix (multi-label), float targets (regression, the default for one label); from the real labels if given."""
    num_labels = config.num_labels
    problem = config.problem_type or ("regression" if num_labels == 1 else "single_label_classification")
    if problem == "regression":  # the real labels as targets of every output, else standard normal ones
        if real is None:
            return torch.randn((rows,) if num_labels == 1 else (rows, num_labels), generator=generator)
        targets = torch.tensor(real, dtype=torch.float)
        return targets if num_labels == 1 else targets[:, None].repeat(1, num_labels)
    if real is not None:
        classes = torch.tensor(real) % num_labels
    else:
        classes = torch.randint(0, num_labels, (rows,), generator=generator)
    if problem == "multi_label_classification":  # each row's class as its one positive label
        return torch.nn.functional.one_hot(classes, num_labels).float()
    return classes


def report_batches(model, tokenizer, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """2 × `num_batches` batches with labels for `model`, random token ids if `tokenizer` is None (see module
    docstring)."""
    count = 2 * args.num_batches * args.batch_size
    kind = label_kind(model)
    generator = torch.Generator().manual_seed(args.seed)
    real_labels = None
    if tokenizer is not None:
        texts, real_labels = _texts(args, _labels_are_its_text(model), count)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    else:
        vocab = model.config.vocab_size
        input_ids = torch.randint(3, vocab, (count, args.max_length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[::2, args.max_length - args.max_length // 4 :] = 0  # the last quarter padded, as real batches
    batches = []
    for start in range(0, count, args.batch_size):
        rows = slice(start, start + args.batch_size)
        batch = {"input_ids": input_ids[rows], "attention_mask": attention_mask[rows]}
        if kind == "class":
            real = real_labels[rows] if real_labels is not None else None
            batch["labels"] = _class_labels(model.config, real, len(batch["input_ids"]), generator)
        elif kind == "tokens":
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        elif kind == "token_class":  # one class per token (a stand-in: no tagged text is shipped), padding ignored
            classes = torch.randint(0, model.config.num_labels, batch["input_ids"].shape, generator=generator)
            batch["labels"] = classes.masked_fill(batch["attention_mask"] == 0, -100)
        if getattr(model.config, "is_encoder_decoder", False) and "labels" not in batch:
            batch["decoder_input_ids"] = batch["input_ids"]  # a bare encoder-decoder: the decoder reads the text too
        batches.append(batch)
    return batches


def _min_text_tokens(model) -> int:
    """The tokens a text needs for its attention queries and keys to get a gradient that is not zero in exact
    arithmetic: a token attending to itself alone (a one-token text's, a causal model's first) has softmax ≡ 1, so
    ∂L/∂q = 0 there and no key gradient comes from it, and a causal LM's last token has no label (labels shift by
    one). 3 for a causal LM trained on its own text, 2 for any other model."""
    causal = _labels_are_its_text(model) and not getattr(model.config, "is_encoder_decoder", False)
    return 3 if causal else 2


def warn_about_short_texts(model, tokenizer, batches: list[dict[str, torch.Tensor]], args) -> None:
    """Warn, naming the texts, when most tokens of `batches` are in texts shorter than `_min_text_tokens`: the
    attention query and key gradients measured on them are fp32 rounding residue of zero (SmolLM2 on a 2-token text:
    rms 1e-12 to 3e-9; its query layers' 6e-5 to 6e-4 on a 13-token one), and calibration would fit c to it,
    silently. With at least half of the tokens in long enough texts, the residue (elements without energy) lowers c
    by less than a factor 2, the band FP8 tolerates."""
    need = _min_text_tokens(model)
    texts = [
        (ids[mask.bool()], int(mask.sum()))
        for batch in batches
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    short = [(ids, length) for ids, length in texts if length < need]
    if 2 * sum(length for _, length in short) <= sum(length for _, length in texts):
        return
    if tokenizer is None:
        named = f"random token ids, --max-length {args.max_length}"
    else:
        decoded = dict.fromkeys((tokenizer.decode(ids, skip_special_tokens=True), length) for ids, length in short)
        named = ", ".join(f"{text!r}: {length} token{'s' * (length != 1)}" for text, length in list(decoded)[:3])
    source = f"--text-file {args.text_file}" if args.text_file else "the embedded text"
    cut = f" (--max-length {args.max_length} cuts every text shorter)" if args.max_length < need else ""
    if need == 3:
        why = "a causal LM's first token attends to itself alone and its last has no label"
    else:
        why = "a one-token text attends to itself alone"
    logger.warning(
        f"{source}: most tokens measured are in texts of fewer than {need} tokens ({named}). There {why}, so the "
        "attention query and key gradients are zero in exact arithmetic: their rms(g) is fp32 rounding residue, and "
        f"c calibrated on it orders of magnitude too small (or not measured). Measure on texts of at least {need} "
        f"tokens{cut}."
    )
