"""`RecalibrationCallback`: keep static FP8 operand scales current during training, log what casts clip.

Static scales a = rms(x), c = rms(g) are measured once (see `calibrate.py`), but gradients grow
~10× during fine-tuning, so a c measured at step 0 later lets g/c reach E5M2's max and saturate.
Every `every` optimizer steps this callback re-runs `calibrate` on a few fixed batches (fresh
scales for the current weights), and at every log it adds the saturation/underflow fractions
counted since the previous log (`summarize_casts`), so a run shows whether its scales still fit.
Callbacks see a log in list order: `UnitScaleTrainer` puts this one right after `DefaultFlowCallback`, so
reporting integrations (`report_to`), the printer and later callbacks get the fractions; with a plain
`Trainer`, do the same (`trainer.callback_handler.callbacks.insert(1, callback)`).

Batches come from `batches` (a re-iterable such as a list or DataLoader, or a zero-argument
callable returning an iterable), else from the `train_dataloader` the Trainer passes to callbacks:
then the first `num_batches` are drawn once, in a pass of their own under a forked RNG so the training data
order and RNG stream are unchanged (a one-pass IterableDataset, one shared iterator, would lose them to training),
and reused for every recalibration of the run (the same batches measure how the *model* changed). Each training
run draws them afresh from its own DataLoader: a retry of `auto_find_batch_size` calibrates on its smaller batches.
A run resumed from a checkpoint with calibrated scales keeps them (no calibration at train begin), so it
continues the uninterrupted run's trajectory.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .calibrate import calibrate, check_headroom
from .checkpoint import operand_scales
from .convert import matmul_layers
from .precision import cast_statistics, summarize_casts, track_casts
from .training_loss import loss_shifts_labels, model_inputs, trainer_num_items_in_batch

__all__ = ["RecalibrationCallback"]

logger = logging.get_logger(__name__)

Batches = Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]]


def _detached(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _as_trained(
    model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], args: Any
) -> tuple[Iterable[Mapping[str, Any]], float]:
    """Calibration batches and loss factor that give the gradients `Trainer.training_step` gives with the model's own
    loss. A model that takes `**kwargs` gets `num_items_in_batch` (`trainer_num_items_in_batch`) and its loss is
    left as it is (× the processes with `average_tokens_across_devices`, as `Trainer.compute_loss`): a causal LM
    normalizes by it (≈ 1/accumulation of its mean), a head that ignores it (BERT's classifiers) trains on its
    plain mean. Otherwise the loss is divided by the accumulation steps. Tensor, context and sequence parallelism
    live in the Trainer's accelerator, which callbacks do not see: there, pass `compute_loss`."""
    accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
    forward = inspect.signature(model.forward).parameters.values()
    accepts = getattr(model, "accepts_loss_kwargs", any(p.kind == inspect.Parameter.VAR_KEYWORD for p in forward))
    if not accepts:
        return batches, 1.0 / accumulation
    labelled = [model_inputs(model, batch) for batch in batches]
    shifts = loss_shifts_labels(model)
    counts = [
        trainer_num_items_in_batch(inputs, args, shifts_labels=shifts) if "labels" in inputs else None
        for inputs in labelled
    ]
    if any(count is None for count in counts):
        return labelled, 1.0 / accumulation  # no loss of the model's own to normalize
    processes = getattr(args, "world_size", 1) if getattr(args, "average_tokens_across_devices", False) else 1
    counted = [{**inputs, "num_items_in_batch": count} for inputs, count in zip(labelled, counts, strict=True)]
    return counted, float(processes)


class RecalibrationCallback(TrainerCallback):
    """Calibrate at train begin, recalibrate every `every` steps, log cast counters.

    Args:
        batches: calibration batches (an iterable, the first `num_batches` drawn once, or a zero-argument
            callable, called at every calibration); None = the Trainer's train dataloader (drawn once per `train()`).
        every: recalibrate after every `every` optimizer steps; 0 or None = never.
        num_batches: batches per calibration.
        calibrate_at_start: calibrate in `on_train_begin` (off when the model was calibrated already; a resumed
            run whose checkpoint holds calibrated scales is not calibrated again).
        log_casts: attach cast counters to every matmul layer and add their fractions to each log.
        log_prefix: prefix of the log keys (`fp8/grad_output_saturated_fraction`, …).
        loss_fn: `loss_fn(outputs, batch)` for calibration when training does not use the model's own
            loss; default: the model's loss, see `calibrate`.
        compute_loss: `compute_loss(model, batch)`, forward and the loss training backpropagates for `batch`,
            gradient accumulation's scaling included (`calibrate`'s, with `loss_scale` 1): `UnitScaleTrainer` passes
            its `training_step`'s loss (its `compute_loss`, `num_items_in_batch`, ÷ accumulation as Trainer does).
            Default: the model's own loss, scaled for accumulation as Trainer scales it.
        headroom: `calibrate`'s `headroom`: keep every operand's peak this factor below its format's max.
        grad_underflow_budget: `calibrate`'s `grad_underflow_budget`: lower gradient scales where unit RMS flushes
            more than this fraction of a layer's output-gradient elements to zero.
        input_rounding_search: `calibrate`'s `input_rounding_search`: choose each a near rms(x) to minimize x's
            forward rounding error.
    """

    def __init__(
        self,
        batches: Batches | None = None,
        *,
        every: int | None = 100,
        num_batches: int = 4,
        calibrate_at_start: bool = True,
        log_casts: bool = True,
        log_prefix: str = "fp8/",
        loss_fn: Callable[[Any, Mapping[str, Any]], torch.Tensor] | None = None,
        compute_loss: Callable[[Any, Mapping[str, Any]], torch.Tensor] | None = None,
        headroom: float | None = None,
        grad_underflow_budget: float | None = None,
        input_rounding_search: bool = False,
    ) -> None:
        if every is not None and every < 0:
            raise ValueError(f"`every` should be a non-negative number of steps or None, got {every}.")
        if num_batches < 1:
            raise ValueError(f"`num_batches` should be a positive integer, got {num_batches}.")
        check_headroom(headroom)
        self.batches = batches
        self.every = every or 0
        self.num_batches = num_batches
        self.calibrate_at_start = calibrate_at_start
        self.log_casts = log_casts
        self.log_prefix = log_prefix
        self.loss_fn = loss_fn
        self.compute_loss = compute_loss
        self.headroom = headroom
        self.grad_underflow_budget = grad_underflow_budget
        self.input_rounding_search = input_rounding_search
        self._cached: list[dict[str, Any]] | None = None
        self.history: list[dict[str, Any]] = []  # one entry per calibration: step and per-layer scales
        self.logged: list[dict[str, float]] = []  # the cast fractions of every log, with their step

    # ------------------------------------------------------------------ batches and calibration

    def _calibration_batches(self, train_dataloader: Iterable | None) -> Iterable[Mapping[str, Any]]:
        """The first `num_batches` of the source, drawn once (a callable `batches`: at every call) under a forked
        RNG, so a shuffled DataLoader neither shifts the training data order nor changes what is measured."""
        if self._cached is not None and not callable(self.batches):
            return self._cached
        if self.batches is not None:
            source = self.batches() if callable(self.batches) else self.batches
        elif train_dataloader is not None:
            source = train_dataloader
        else:
            raise ValueError(
                "RecalibrationCallback has no batches: pass `batches=` or use it in a Trainer, "
                "which hands its `train_dataloader` to callbacks."
            )
        with torch.random.fork_rng(devices=[]):
            self._cached = [_detached(b) for b in islice(iter(source), self.num_batches)]
        loader = getattr(source, "base_dataloader", source)  # under Accelerate's DataLoaderShard
        if getattr(loader, "persistent_workers", False):
            # training's `iter()` would reuse this iterator, whose workers' base seed was drawn under the forked RNG:
            # the global RNG (dropout) would run one draw behind an uncalibrated run's. Let training draw its own.
            loader._iterator = None
        return self._cached

    def recalibrate(self, model, args=None, state=None, train_dataloader=None) -> dict[str, dict[str, float]]:
        """Calibrate `model` now; returns calibrate's per-layer table and records it in `history`."""
        batches, loss_scale = self._calibration_batches(train_dataloader), 1.0
        if self.compute_loss is None:  # the model's own loss, scaled here as Trainer scales it
            batches, loss_scale = _as_trained(model, batches, args)
        table = calibrate(
            model,
            batches,
            num_batches=self.num_batches,
            loss_fn=self.loss_fn,
            compute_loss=self.compute_loss,
            loss_scale=loss_scale,
            headroom=self.headroom,
            grad_underflow_budget=self.grad_underflow_budget,
            input_rounding_search=self.input_rounding_search,
            progress=False,
        )
        step = state.global_step if state is not None else None
        self.history.append({"step": step, "scales": table})
        logger.info(f"Recalibrated static FP8 scales of {len(table)} layers at step {step}.")
        return table

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.batches is None:  # this run's DataLoader (an `auto_find_batch_size` retry's batches are smaller)
            self._cached = None
        if model is None or not matmul_layers(model):
            logger.warning("RecalibrationCallback: the model has no converted matmul layer; nothing to do.")
            return
        if self.log_casts:
            track_casts(model)
        if state.global_step > 0 and operand_scales(model):
            # resumed: the checkpoint holds the run's a, c at this step; draw the batches of later recalibrations
            # now, from the same place in the data as the uninterrupted run did
            if self.every and self.batches is None:
                self._calibration_batches(train_dataloader)
            logger.info(f"Resuming at step {state.global_step} with the checkpoint's calibrated FP8 scales.")
        elif self.calibrate_at_start:
            self.recalibrate(model, args, state, train_dataloader)

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.every and model is not None and state.global_step % self.every == 0 and matmul_layers(model):
            self.recalibrate(model, args, state, train_dataloader)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        """Add the fractions counted since the last log to a training log (one with `loss`) and to its entry in
        `state.log_history`; evaluation logs are `evaluate()`'s results, where they would read as metrics."""
        if not self.log_casts or not logs or "loss" not in logs or model is None or not matmul_layers(model):
            return
        entries = self.cast_log_entries(model)
        if not entries:  # nothing was cast since the last log (e.g. the end-of-training summary)
            return
        self.logged.append({"step": state.global_step, **entries})
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def cast_log_entries(self, model) -> dict[str, float]:
        """Saturation/underflow fractions of the casts of every process since the previous call (counters are
        reset). Collective under torch.distributed: the Trainer calls `on_log` on every rank."""
        return summarize_casts(cast_statistics(model, reset=True, all_processes=True), prefix=self.log_prefix)
