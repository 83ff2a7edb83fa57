"""`calibrate(model, batches)`: measure the static operand scales a, c of every converted matmul.

For a converted matmul layer with input x and output gradient g (see `ops.py`), FP8 operands
have unit RMS when

    a = rms(x)        c = rms(g)

each measured over non-zero elements only: padding zeroes whole gradient rows (about half of
all elements in a padded batch, ~87% in a BERT classifier's last layer) and ReLU zeroes inputs;
zeros are exact in every format, and a plain RMS would be diluted by them and depend on how
much padding a batch has. Padded positions' inputs are not zero (embeddings and attention
outputs run on them too) and count in a, as the casts see them: a batch padded much longer than
training's moves a, so calibrate on batches padded as training's are. Over several batches the
mean squares are averaged and then rooted
(a = sqrt(mean_b ms_b(x))), so one outlier batch does not dominate as a max would; the max is
recorded too (peaks max|x|/a, max|g|/c: the headroom left below the format's max, which
`headroom=h` enforces by raising a scale to h·max|x|/M where needed). Under
torch.distributed the per-batch mean squares are averaged over ranks, the peaks maxed and the
exponent histograms summed, so every rank holds the same scales. `calibrate` is then a collective:
every rank calls it, also one whose share of the batches is empty (it takes the other ranks' scales).

Unit RMS leaves an operand's small elements where its distribution puts them: a cast flushes
|g/c| < m/2 (m the format's smallest subnormal, E5M2 2^-16), and output gradients are heavy-tailed
below their RMS (at c = rms(g), MiniLM's layer-0 attention query flushes 1.4% of its non-zero gradient elements
on the 8 test snippets `hf-unitscale report` measures, 2.3% on tests/test_calibrate.py's held-out batch).
`grad_underflow_budget=f` lowers c from the RMS to the largest power-of-two step at which
at most a fraction f of the gradient's non-zero calibration elements flush, but never below
max(1, headroom)·max|g|/M: the budget yields to saturation, with a warning naming the layers it
cannot fit. Where unit RMS already meets the budget, c moves by less than 2x. Input scales are not
lowered: on MiniLM, lowering a as well raised the training loss by 0.06-0.25% (0.15% on average
over three seeds) against lowering c alone, and changed no eval metric (benchmarks/fp8_quality.py).
`input_rounding_search=True` moves a within a factor √2 of rms(x) instead, to the scale at which the
forward cast of the calibration inputs errs least (outlier features that repeat from token to token
then round with a small error rather than the same large one in every token).

How it is measured, and why:

* in full precision: every matmul layer runs `precision=None` during the pass. Measuring
  through the low-precision path would measure what the *current* scales let through — with
  a = c = 1 most E5M2 gradients flush to zero and every layer upstream sees a biased g.
* with the model's real training loss when the batch carries `labels` (the gradients
  training will produce, including the loss's 1/batch normalization, which sets the scale of
  every g). A causal LM without labels gets `labels = input_ids` (padding masked to -100),
  its own training loss. Any other model without labels falls back to a proxy,
  sum(logits²)/2 / rows (gradient logits/rows, the same 1/rows normalization as a mean
  loss); `c` from a proxy is only right up to an O(1) factor, so pass labels, or a `loss_fn`.
  `loss_scale` multiplies the loss the way the training loop does (1/gradient-accumulation).
* in eval mode (dropout off, deterministic): dropout scales kept activations by 1/(1-p),
  which changes a non-zero RMS by 1/sqrt(1-p) (5% at p = 0.1), well inside the factor-2 band
  FP8 tolerates. The model's train/eval mode is restored afterwards.
* with `torch.autograd.grad` with respect to the layer outputs, so no parameter `.grad` is
  created or changed (calibration can run mid-training); frozen models are handled by letting
  the first converted layer's input require grad.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .config import CONFIG_KEY
from .convert import matmul_layers
from .distributed import all_reduce_across_processes
from .formats import FORMATS, FP8_FORMAT_PAIRS, LowPrecisionFormat
from .operand_stats import (
    ExponentHistogramAccumulator,
    OperandRmsHooks,
    RmsAccumulator,
    RoundingErrorAccumulator,
)
from .precision import full_precision
from .training_loss import default_loss, model_inputs

__all__ = ["calibrate", "check_headroom"]

logger = logging.get_logger(__name__)

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]


def _count_tokens(batch: Mapping[str, Any]) -> int:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def _all_reduce_statistics(accumulators: list[RmsAccumulator]) -> None:
    """Sum per-batch mean squares, batch counts and any exponent histograms over ranks, and take the max of
    the peaks (no-op outside torch.distributed)."""
    sums = all_reduce_across_processes(
        torch.tensor([[acc.ms_total, acc.batches] for acc in accumulators], dtype=torch.float64)
    )
    peaks = all_reduce_across_processes(torch.tensor([acc.absmax for acc in accumulators], dtype=torch.float64), "max")
    for acc, (ms_total, batches), peak in zip(accumulators, sums.tolist(), peaks.tolist(), strict=True):
        acc.ms_total, acc.batches, acc.absmax = ms_total, int(batches), peak
    # the per-rank counts that add up: exponent histograms (underflow budget), cast errors (input rounding search)
    for kind, attribute in (
        (ExponentHistogramAccumulator, "exponent_counts"),
        (RoundingErrorAccumulator, "squared_errors"),
    ):
        chosen = [acc for acc in accumulators if isinstance(acc, kind)]
        if chosen:
            totals = all_reduce_across_processes(torch.stack([getattr(acc, attribute) for acc in chosen]))
            for acc, total in zip(chosen, totals, strict=True):
                setattr(acc, attribute, total)


def _listed(names: list[str], shown: int = 8) -> str:
    """The first `shown` names, comma-separated, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _operand_formats(layer: Any) -> tuple[LowPrecisionFormat | None, LowPrecisionFormat | None]:
    """The formats of a layer's input and gradient operands: its precision's, or the default pair ("HYBRID",
    E4M3/E5M2) when none is set."""
    if layer.precision is None:
        forward, backward = FP8_FORMAT_PAIRS["HYBRID"]
        return FORMATS[forward], FORMATS[backward]
    return layer.precision.forward, layer.precision.backward


def _warn_about_headroom(table: Mapping[str, Mapping[str, float]], layers: Mapping[str, Any]) -> None:
    """Warn, once per set of operands, about operands whose calibrated peak is within 2x of their format's max.

    At unit scale a tensor's largest elements sit at max|t|/rms(t); transformers' massive activations
    (a few elements hundreds of times the RMS, e.g. SmolLM2's MLP down-projection inputs at ~300
    against E4M3's 448) leave little room, and activations that grow in training then saturate.
    Only layers with low-precision formats set (`set_precision`) are checked.
    """
    tight = []
    # scales are float32 buffers: a peak put at exactly M/2 by `headroom=2` reads back up to one rounding above it
    rounding = 1 + torch.finfo(torch.float32).eps
    for name, row in table.items():
        if layers[name].precision is None:
            continue
        for operand, fmt in zip(("input", "grad"), _operand_formats(layers[name]), strict=True):
            if fmt is not None and row[f"{operand}_peak"] > fmt.max / 2 * rounding:
                tight.append(f"{name} ({operand}, {fmt.name})")
    if tight:  # names only, so recalibrating every N steps does not repeat it
        logger.warning_once(
            f"Calibration: {len(tight)} operand(s) peak within 2x of their format's largest value at unit scale "
            f"(see the `input_peak`/`grad_peak` calibrate returns): {_listed(tight)}. Growth during training "
            "will saturate them: calibrate with `headroom=2` (`calibration_headroom`), recalibrate more often "
            "(`recalibrate_every`), or keep these layers in full precision (`fp8_full_precision_modules`)."
        )


def check_headroom(
    headroom: float | None, argument: str = "headroom", formats: Iterable[LowPrecisionFormat] = ()
) -> None:
    """`headroom` h puts every calibrated peak at most M/h: a finite factor >= 1, or None. An infinite h would make
    a = h·max|x|/M infinite (every cast then reads zero or nan).

    For each of `formats` (those the scales are calibrated for, when known), h must also stay within the format's
    dynamic range M/m (m its smallest subnormal): a raised operand's RMS is M/(h·peak/RMS) ≤ M/h, so beyond M/m
    every operand's largest element is below m, so each element rounds to 0 or ±m: the cast keeps no more than a sign
    (h = 1e38 made every E4M3 operand 0). E4M3's range is 448·2^9 = 229376, E5M2's 57344·2^16 ≈ 3.8e9.
    """
    if headroom is not None and not (math.isfinite(headroom) and headroom >= 1):
        raise ValueError(
            f"`{argument}` should be a finite factor >= 1 (peaks at most max/headroom) or None, got {headroom}."
        )
    narrowest = min(formats, key=lambda fmt: fmt.dynamic_range, default=None)
    if headroom is not None and narrowest is not None and headroom > narrowest.dynamic_range:
        raise ValueError(
            f"`{argument}`={headroom:g} puts every {narrowest.name} operand's largest element at most "
            f"{narrowest.max:g}/{headroom:g} = {narrowest.max / headroom:.3g}, below {narrowest.name}'s smallest "
            f"subnormal {narrowest.smallest_subnormal:g}: each element would round to 0 or ±that subnormal. It must "
            f"be at most {narrowest.name}'s max/smallest subnormal = {narrowest.dynamic_range:g}. As the factor by "
            "which activations may grow before they saturate, it is typically 2 to 16 (e.g. 2 or 4)."
        )


def _check_batch(batch: Any, index: int) -> None:
    """Each batch is a dict of model inputs; token ids, masks and labels as lists were tokenized without tensors
    (other keys may hold anything the model takes)."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"Calibration batch {index} is a {type(batch).__name__}; each batch is a dict of model inputs, e.g. "
            "`tokenizer(texts, padding=True, return_tensors='pt')` with `labels`, or a Trainer's DataLoader batch."
        )
    tensor_keys = [key for key in batch if key in ("labels", "pixel_values") or key.endswith(("_ids", "_mask"))]
    listed = [key for key in tensor_keys if isinstance(batch[key], list)]
    if listed:
        raise ValueError(
            f"Calibration batch {index}: {listed} hold Python lists, not tensors; tokenize with "
            "`return_tensors='pt'` (and `padding=True`), or collate them with a DataCollator."
        )


def _check_types(optional: bool = False, **options: tuple[Any, type]) -> None:
    """Refuse an option that is not of its type (bool is no number here), naming it; None passes where `optional`."""
    for name, (value, kind) in options.items():
        if (value is None and optional) or (isinstance(value, kind) and not isinstance(value, bool)):
            continue
        wanted = "an int" if kind is Integral else "a number"
        raise TypeError(
            f"`{name}` must be {wanted}{' or None' if optional else ''}, got {type(value).__name__} {value!r}."
        )


def _check_loss(loss: torch.Tensor, index: int) -> None:
    """A loss that cannot give gradients would leave every c as it was (1 on a first calibration): refuse it."""
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        shown = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"The loss of calibration batch {index} is {shown}; `loss_fn` (or `compute_loss`) must return a scalar "
            "tensor of the model's outputs (e.g. a mean over examples), which calibration differentiates."
        )
    if not loss.requires_grad:
        raise ValueError(
            f"The loss of calibration batch {index} does not require grad, so no output gradient can be measured. "
            "Is `calibrate` running under `torch.inference_mode()`? Call it outside."
        )
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(
            f"The loss of calibration batch {index} is {loss.detach().float().item()}: its gradients would make every "
            "scale non-finite. Check that batch (labels, inputs), or calibrate the model in fp32 if it overflows in "
            "fp16."
        )


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    num_batches: int | None = None,
    loss_fn: LossFn | None = None,
    compute_loss: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
    loss_scale: float = 1.0,
    headroom: float | None = None,
    grad_underflow_budget: float | None = None,
    input_rounding_search: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Set every converted matmul layer's static scales a = rms(x) and c = rms(g), in place.

    With `headroom` h, a scale is raised where its operand's peak would come closer than a factor h
    to the format's largest value M (E4M3's 448 for x, E5M2's 57344 for g, or the formats the
    layer's precision names): a = max(rms(x), h·max|x|/M), likewise c. The operand's RMS is then
    min(1, M / (h·max|x|/rms(x))): with h = 2 it stays in [0.5, 1] for any operand that would not
    saturate at unit scale (max|x| ≤ M·rms(x)), and activations may double before they saturate.

    With `grad_underflow_budget` f, c is lowered where unit RMS would flush more than a fraction f of
    the output gradient's non-zero elements to zero (|g/c| < m/2, m the format's smallest subnormal):
    c = max(min(rms(g), c_f), max(1, h)·max|g|/M), c_f = 2^k·2/m for the largest k such that
    #{0 < |g| < 2^k} ≤ f·#{g ≠ 0} over the calibration batches. Saturation wins where both cannot
    hold (a warning names the layers).

    With `input_rounding_search`, a is the scale within a factor √2 of rms(x) (a grid of 32 per octave)
    that minimizes Σ (a·q(x/a) − x)² over the calibration batches, q the layer's forward format (then
    raised by `headroom` where needed). Any such a keeps the operand's RMS in [0.71, 1.41]; FP8 rounding
    is scale-free on average, but outlier features keep similar values from token to token, and the
    grid point that puts them near format values lowers their systematic error.

    Args:
        model: a model converted by `unit_scale`.
        batches: dicts of model inputs (with `labels` for real gradients), e.g. a DataLoader.
        num_batches: use only the first `num_batches` of `batches` (default: all of them); fewer: a warning.
        loss_fn: `loss_fn(outputs, batch) -> scalar`; default the model's loss, see module docstring.
        compute_loss: `compute_loss(model, batch) -> scalar`, running the forward itself (a Trainer's
            `compute_loss`: custom losses, `label_names`, label smoothing); replaces the model call and `loss_fn`.
        loss_scale: multiplies the loss before differentiating (1/gradient-accumulation steps
            to match a Trainer's backward).
        headroom: keep every calibrated peak at least this finite factor (≥ 1) below its format's max;
            None: a = rms(x), c = rms(g) exactly. At most the format's max/smallest subnormal (E4M3 229376),
            beyond which every element rounds to 0 or ±its smallest subnormal; a warning names the layers
            whose peak/RMS times it already exceeds that (their RMS lands below the smallest subnormal).
            Typically 2 to 16.
        grad_underflow_budget: the largest fraction (in [0, 1)) of a layer's non-zero output-gradient
            elements its cast may flush to zero, e.g. 1e-4; None: c is not lowered.
        input_rounding_search: choose each a near rms(x) to minimize the forward cast's squared error
            (above); costs 32 casts of every input per batch.
        progress: show a tqdm progress bar.

    Returns:
        `{layer name: {"input_rms", "grad_rms", "input_scale", "grad_scale", "input_peak", "grad_peak"}}`:
        the measured RMS (nan when not measured), the scales now in the buffers, and the peaks
        max|x|/a and max|g|/c over the calibration batches (the largest operands the FP8 casts see;
        a warning names layers whose peak is within 2x of their format's max). A layer whose output gets no
        gradient (unused by the loss) keeps its previous `c`, and likewise `a`.

    Raises:
        ValueError: an option out of its range (`headroom` beyond a cast format's max/smallest subnormal),
            `model` has no converted matmul layer, `batches` is empty (on every rank) or one batch, a batch's loss
            is not finite or does not require grad (`torch.inference_mode`), or a new scale is not finite and
            positive in its buffer's dtype (then no buffer has changed).
    """
    _check_types(loss_scale=(loss_scale, Real))
    _check_types(num_batches=(num_batches, Integral), optional=True)
    _check_types(headroom=(headroom, Real), grad_underflow_budget=(grad_underflow_budget, Real), optional=True)
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"`num_batches` should be a positive integer or None, got {num_batches}.")
    if not (math.isfinite(loss_scale) and loss_scale > 0):  # c = rms(loss_scale·g): 0 measures no gradient at all
        raise ValueError(
            f"`loss_scale` should be a finite factor > 0 (1/gradient-accumulation steps), got {loss_scale}."
        )
    if grad_underflow_budget is not None and not 0 <= grad_underflow_budget < 1:
        raise ValueError(
            f"`grad_underflow_budget` should be a fraction in [0, 1) of elements allowed to flush to zero, or None, "
            f"got {grad_underflow_budget}."
        )
    layers = matmul_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no converted matmul layer to calibrate; call `unit_scale(model)` first."
        )
    # the formats the model casts to: its layers' (the heads kept in full precision cast nothing), or the default
    # pair the scales are sized for when no layer has formats yet
    cast = [layer for layer in layers.values() if layer.precision is not None] or layers.values()
    check_headroom(headroom, formats={fmt for layer in cast for fmt in _operand_formats(layer) if fmt is not None})
    format_options = [
        name
        for name, used in (
            ("headroom", headroom is not None),
            ("grad_underflow_budget", grad_underflow_budget is not None),
            ("input_rounding_search", input_rounding_search),
        )
        if used
    ]
    if format_options and all(layer.precision is None for layer in layers.values()):
        logger.warning(
            f"Calibrating with {', '.join(format_options)} before any layer has formats: they assume E4M3 inputs and "
            "E5M2 gradients. Call `set_precision` first if the model will run other formats (E4M3 gradients "
            "saturate at 448, not 57344)."
        )
    if loss_fn is not None and compute_loss is not None:
        raise ValueError(
            "Pass `loss_fn` (a loss of the model's outputs) or `compute_loss` (forward and loss), not both."
        )
    if isinstance(batches, Mapping):
        raise ValueError("`batches` is one batch (a dict of inputs); pass an iterable of batches, e.g. `[batch]`.")
    loss_fn = loss_fn or default_loss
    was_training = {m: m.training for m in model.modules()}
    iterator = iter(batches) if num_batches is None else islice(batches, num_batches)
    bar = logging.tqdm(iterator, total=num_batches, desc="Calibrating unit scales", disable=not progress)
    n_batches = n_tokens = 0
    used_proxy = False
    try:
        model.eval()
        # the gradients' exponent histograms only when a budget will read them
        grad_accumulator = RmsAccumulator if grad_underflow_budget is None else ExponentHistogramAccumulator
        searched = {}
        if input_rounding_search:  # layers with a forward format: the one the search rounds x to
            forward_formats = {name: _operand_formats(layer)[0] for name, layer in layers.items()}
            searched = {name: RoundingErrorAccumulator(fmt) for name, fmt in forward_formats.items() if fmt is not None}
        hooks = OperandRmsHooks(layers, grad_accumulator=grad_accumulator, input_accumulators=searched)
        with hooks, full_precision(model), torch.enable_grad():
            for batch in bar:
                _check_batch(batch, n_batches)
                inputs = model_inputs(model, batch)
                if compute_loss is not None:
                    loss = hooks.record(lambda: compute_loss(model, inputs)) * loss_scale  # noqa: B023 - run now
                else:
                    outputs = hooks.forward(model, inputs)
                    used_proxy |= loss_fn is default_loss and getattr(outputs, "loss", None) is None
                    loss = loss_fn(outputs, inputs) * loss_scale
                    del outputs
                _check_loss(loss, n_batches)
                hooks.backward(loss)
                n_batches += 1
                n_tokens += _count_tokens(inputs)
    finally:
        for module, training in was_training.items():
            module.training = training
    if num_batches is not None and 0 < n_batches < num_batches:
        logger.warning(
            f"`batches` yielded {n_batches} batch(es), fewer than `num_batches={num_batches}`: calibrated over those."
        )
    # every rank reaches the collectives, also one whose share of the batches is empty
    n_batches, n_tokens = (
        int(n) for n in all_reduce_across_processes(torch.tensor([n_batches, n_tokens], dtype=torch.float64))
    )
    _all_reduce_statistics(hooks.accumulators())
    if n_batches == 0:
        raise ValueError("`batches` yielded no batch; calibration needs at least one.")
    if used_proxy:
        logger.warning(
            "Calibrating without a loss (no `labels`): output-gradient scales c come from the proxy "
            "sum(logits²)/2/rows. Pass batches with `labels` or a `loss_fn` for the real training gradients."
        )

    # every new scale is computed and checked before any buffer changes, so an error leaves the model as it was
    scales: dict[torch.Tensor, float] = {}
    unmeasured, over_budget, flushed = [], [], []
    for name, layer in layers.items():
        input_format, grad_format = _operand_formats(layer)
        for what, buffer, accumulator, fmt, budget in (
            ("input", layer.input_scale, hooks.inputs[name], input_format, None),
            ("gradient", layer.grad_scale, hooks.grads[name], grad_format, grad_underflow_budget),
        ):
            value = measured = accumulator.value()
            if math.isnan(measured):
                unmeasured.append(f"{name} ({what})")
                continue
            if not (math.isfinite(measured) and measured > 0):
                raise ValueError(f"Calibration measured a non-finite or zero {what} RMS {measured} at `{name}`.")
            if isinstance(accumulator, RoundingErrorAccumulator):
                value = accumulator.best_scale_near(value)
            if fmt is not None and (headroom is not None or budget is not None):
                floor = (headroom or 1.0) * accumulator.peak() / fmt.max  # peaks at most M/h
                if budget is not None:
                    budget_scale = accumulator.largest_scale_flushing_at_most(budget, fmt.smallest_subnormal)
                    value = min(value, budget_scale)
                    if budget_scale < floor:
                        over_budget.append(f"{name} ({fmt.name})")
                value = max(value, floor)
            stored = float(torch.tensor(value, dtype=buffer.dtype))  # as the buffer will hold it
            if not (math.isfinite(stored) and stored > 0):
                raise ValueError(
                    f"Calibration's {what} scale at `{name}` is {stored} in {buffer.dtype} (RMS {measured}, "
                    f"peak {accumulator.peak()}, headroom {headroom}): not a finite positive number. Lower `headroom`; "
                    "no scale was changed."
                )
            scales[buffer] = stored
            if fmt is not None and layer.precision is not None and measured / stored < fmt.smallest_subnormal:
                flushed.append(f"{name} ({what}, {fmt.name})")
    with torch.no_grad():
        for buffer, value in scales.items():
            buffer.fill_(value)
    table: dict[str, dict[str, float]] = {
        name: {
            "input_rms": hooks.inputs[name].value(),
            "grad_rms": hooks.grads[name].value(),
            "input_scale": float(layer.input_scale),
            "grad_scale": float(layer.grad_scale),
            # the largest operands the casts will see: max|x|/a, max|g|/c (nan if unmeasured)
            "input_peak": hooks.inputs[name].peak() / float(layer.input_scale),
            "grad_peak": hooks.grads[name].peak() / float(layer.grad_scale),
        }
        for name, layer in layers.items()
    }
    if unmeasured:
        logger.warning(
            f"Calibration kept the previous scale of {len(unmeasured)} operand(s) it could not "
            f"measure (layer unused or no gradient reaches it): {_listed(unmeasured)}"
        )
    if over_budget:
        logger.warning_once(
            f"Calibration: the output gradients of {len(over_budget)} layer(s) span more than their format's range: "
            f"flushing at most {grad_underflow_budget} of their elements to zero would saturate their peaks, so "
            f"saturation won: {_listed(over_budget)}. Lower `headroom`, or keep these layers in full precision "
            "(`fp8_full_precision_modules`)."
        )
    if flushed:  # names only, so recalibrating every N steps does not repeat it
        logger.warning_once(
            f"Calibration put the RMS of {len(flushed)} operand(s) below their format's smallest subnormal m, so a "
            f"large share of their elements flush to zero (38% of a Gaussian operand's at RMS m, 68% at m/2): "
            f"{_listed(flushed)}. Their peak/RMS times max(1, `headroom`) (headroom={headroom}) exceeds the "
            "format's max/smallest subnormal (E4M3 229376, E5M2 3.8e9; the peaks and RMS are in the table calibrate "
            "returns). Lower `headroom`, or keep these layers in full precision "
            "(`fp8_full_precision_modules`)."
        )
    _warn_about_headroom(table, layers)
    loss_name = "model loss" if not used_proxy else "proxy sum(logits^2)/2/rows"
    if compute_loss is not None:
        loss_name = "compute_loss"
    elif loss_fn is not default_loss:
        loss_name = "loss_fn"
    record = {
        "num_batches": n_batches,
        "num_tokens": n_tokens,
        "statistic": "sqrt(mean over batches of mean square over non-zero elements)",
        "loss": loss_name,
        "loss_scale": loss_scale,
        "headroom": headroom,
        "grad_underflow_budget": grad_underflow_budget,
        "input_rounding_search": input_rounding_search,
        "precision": "full (fp32 path, casts off)",
        "mode": "eval",
    }
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, CONFIG_KEY, None), dict):
        getattr(config, CONFIG_KEY)["calibration"] = record
    logger.info(f"Calibrated {len(layers)} matmul layers on {n_batches} batches ({n_tokens} tokens).")
    return table
