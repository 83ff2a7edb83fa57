"""`UnitScaleTrainer`: `transformers.Trainer` for unit-scaled models.

What it changes, and where:

* `__init__` / `call_model_init`: converts an unconverted model with `unit_scale` and records
  the lr rule in `model.config.unit_scaling["lr_rule"]`. Arguments checked without the model (`optim`, the class of
  `optimizer_cls_and_kwargs`, `optimizers`, `use_liger_kernel`, …) are refused before the conversion; an argument
  `__init__` refuses after it (checks that need the converted model) merges the caller's model back before the
  error, so it is left plain.
* `create_optimizer`: the named per-group learning rates of `lr_rules.build_param_groups`
  (AdamW-family optimizers only: they take per-group lr, eps and decoupled weight_decay), whose options
  `__init__` has checked against the model (`lr_rules.check_lr_options`: a pattern that matches no parameter or
  a parameter with no role is an error before any evaluation or training). η, ε and the
  decay are read as Trainer reads them: from `optim` and the arguments, or from `optimizer_cls_and_kwargs`
  (the class's own lr and eps defaults where the kwargs give none; decay always `args.weight_decay`).
  The optimizer's `defaults["lr"]` stays η, so schedules that divide by it (`min_lr` of
  `cosine_with_min_lr`, `lr_end` of `polynomial`) give every group its own lr times the plain
  schedule factor; `greedy`, which sets absolute per-group lrs, is refused.
* `create_scheduler`: `reduce_lr_on_plateau` is `plateau.SharedFactorReduceLROnPlateau`, whose `eps` and `min_lr`
  apply to the schedule's lr η·f (torch's to each group's own lr η/s).
* `_clip_grad_norm` / `_get_grad_norm`: the norm is measured on plain gradients,
  ‖g‖² = Σ ‖g_Ŵ/s‖² + Σ ‖g_other‖², and every gradient is multiplied by the same factor
  min(1, max_grad_norm / (‖g‖ + 1e-6)) as `torch.nn.utils.clip_grad_norm_` would on the plain
  model — so the update equals plain clipping. The logged `grad_norm` is that plain norm. Each
  ‖g_Ŵ‖ is taken, and divided by s, in its gradient's dtype, as `clip_grad_norm_` keeps it, so with
  power-of-two scales (the default for bf16/fp16 weights) the norm and the clipping are plain's bit
  for bit.
* `log`: `learning_rate` is the schedule's lr η·f(t) (not the first group's), plus `lr/<role>`
  entries — the lr on W = s·Ŵ under `equivalent` (one value per role, or its min and max), the
  lr of every group under `umup`/`mup`.
* `_save`, `_load_from_checkpoint`, `_load_best_model`: checkpoints in the exact `unit-scaled`
  format (Ŵ, s, a, c), so resuming continues the same trajectory; a checkpoint of another `lr_rule` or other
  conversion options than the model's is refused.
* `fp8=True`: FP8 matmuls, E4M3 forward and E5M2 (`fp8_format="HYBRID"`) or E4M3 (`"E4M3"`) output
  gradients (`precision.set_precision`; the output heads, or the layers named by
  `fp8_full_precision_modules`, stay in full precision) with static scales calibrated on
  `calibration_batches` training batches at train begin and every `recalibrate_every` steps
  (`callbacks.RecalibrationCallback`), with `calibration_headroom` below the formats' max and at most
  `calibration_grad_underflow_budget` of each output gradient flushed to zero. `evaluation_loop` runs every GEMM in
  full precision when `fp8_eval=False`.

`UnitScaleSeq2SeqTrainer` is `UnitScaleTrainer` before `Seq2SeqTrainer` in one class: Seq2SeqTrainer overrides only
`evaluate`, `predict` and `prediction_step` (generation), which UnitScaleTrainer leaves alone, so the two compose.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer
from transformers.trainer_utils import HubStrategy
from transformers.utils import logging

from .arguments import (
    UnitScaleSeq2SeqTrainingArguments,
    UnitScaleTrainingArguments,
    deepspeed_optimizer_error,
    unit_scale_options,
)
from .callbacks import RecalibrationCallback
from .checkpoint import UNIT_SCALED_WEIGHTS_NAME, has_unit_scaled_weights, load_checkpoint_into, stored_gain_names
from .config import CONFIG_KEY, UnitScaleConfig, as_unit_scale_config
from .convert import (
    check_converted_with,
    check_no_peft_adapters,
    conversion_differences,
    is_unit_scaled,
    matmul_layers,
    merge_unit_scale,
    recorded_conversion,
    unit_scale,
    weight_scales,
)
from .formats import FP8_FORMAT_PAIRS
from .hub import save_pretrained
from .lr_rules import Role, build_param_groups, check_lr_options, summarize_param_groups
from .model_card import update_model_card
from .plateau import SharedFactorReduceLROnPlateau, lr_ratio
from .precision import casts_uncounted, full_precision, set_precision
from .trainer_push import mirror_weight_files, trainer_uploads_replacing_weights
from .training_loss import loss_shifts_labels, trainer_num_items_in_batch

__all__ = [
    "UnitScaleSeq2SeqTrainer",
    "UnitScaleSeq2SeqTrainingArguments",
    "UnitScaleTrainer",
    "UnitScaleTrainingArguments",
]

logger = logging.get_logger(__name__)

# `optim` values whose optimizer is AdamW with decoupled decay and per-group lr / eps / weight_decay
ADAMW_OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_torch_xla",
    "adamw_torch_npu_fused",
    "adamw_anyprecision",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
)
# AdamW with 8- or 4-bit moments, quantized per block against its absmax
_QUANTIZED_STATE_OPTIMIZERS = (
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "paged_adamw_8bit",
)
# schedulers that set absolute per-group lrs instead of multiplying each group's initial lr
_ABSOLUTE_LR_SCHEDULERS = ("greedy",)


def _follow_log_level(args) -> None:
    """Give this package's loggers (`hf_unitscale.*`) the level Trainer gives transformers' for this process:
    `log_level` on the main one, `log_level_replica` on the others; `"passive"` leaves them as the application set
    them. It sets levels only: as a library, hf_unitscale adds no handler, so its info records (conversion and
    calibration steps) reach the application's handlers (`logging.basicConfig(level=logging.INFO)`), and warnings
    Python's last-resort handler without one."""
    chosen = args.log_level if args.should_log else args.log_level_replica
    if chosen != "passive":
        logging.get_logger("hf_unitscale").setLevel(args.get_process_log_level())


def _check_arguments(args) -> None:
    """Refuse settings that would silently drop or distort the per-group learning rates, or the model's function.

    `use_liger_kernel`: Trainer patches the converted model in `train()`, and Liger's kernels take weight tensors as
    they are, not the layer's s·Ŵ: the fused linear cross-entropy (on by default for causal LMs) multiplies by
    `lm_head.weight`, which holds Ŵ, and its MoE SwiGLU by the experts' `gate_up_proj` / `down_proj`, which
    `convert_other_modules` converts. Which kernels a `liger_kernel_config` turns on differs per model type, so no
    subset is accepted.
    """
    error = deepspeed_optimizer_error(getattr(args, "deepspeed", None))
    if error:
        raise ValueError(error)
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(
            "`use_liger_kernel=True` is not supported by UnitScaleTrainer: Liger's fused kernels read weight tensors "
            "directly (the fused linear cross-entropy multiplies by `lm_head.weight`), bypassing the converted "
            "layers' s·Ŵ, so they would compute with Ŵ = W/s and train another model, with no error. Set "
            "`use_liger_kernel=False`, or train the plain model (`merge_unit_scale` a converted one) with plain "
            "`Trainer`."
        )
    if getattr(args, "deepspeed", None) is not None and args.max_grad_norm > 0:
        raise ValueError(
            "DeepSpeed clips gradients inside its engine, on the unit-scaled gradients g_Ŵ = s·g_W, which is not "
            "plain clipping. Set `max_grad_norm=0` with DeepSpeed, or train with DDP/FSDP2."
        )
    scheduler = _scheduler_name(args)
    if scheduler in _ABSOLUTE_LR_SCHEDULERS:
        raise ValueError(
            f"`lr_scheduler_type={scheduler!r}` sets the same absolute lr bounds on every parameter group, but "
            "UnitScaleTrainer's groups have different lrs (η/s per weight). Use a schedule that multiplies each "
            "group's lr (linear, cosine, cosine_with_min_lr, warmup_stable_decay, reduce_lr_on_plateau, …)."
        )


def _check_optim(args) -> str:
    """`args.optim`, refused unless it builds an AdamW (the optimizer the learning-rate rules are derived for)."""
    optim = getattr(args.optim, "value", args.optim)
    if optim not in ADAMW_OPTIMIZERS:
        raise ValueError(
            f"`optim={optim!r}` is not supported by UnitScaleTrainer: its learning-rate rules "
            f"assume AdamW (per-group lr, eps and decoupled weight_decay). Use one of {ADAMW_OPTIMIZERS}."
        )
    return optim


def _check_optimizer_cls(optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]]) -> None:
    """Refuse an `optimizer_cls_and_kwargs` class that is not AdamW or a subclass (the optimizer the learning-rate
    rules are derived for)."""
    optimizer_cls = optimizer_cls_and_kwargs[0]
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.AdamW)):
        raise ValueError(
            f"`optimizer_cls_and_kwargs` gives {optimizer_cls!r}, which UnitScaleTrainer does not support: its "
            "learning-rate rules assume AdamW (per-group lr, eps and decoupled weight_decay). Use `torch.optim.AdamW` "
            "or a subclass of it, or train the plain model with plain `Trainer`."
        )


def _scheduler_name(args) -> str:
    return getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)


@contextmanager
def _merged_back_on_error(model: nn.Module | None) -> Iterator[None]:
    """If the block raises, merge back (`merge_unit_scale`) a `model` that came unconverted and was converted inside
    it, its `unit_scaling` config block as it was: a refused UnitScaleTrainer leaves the caller's model plain, W = s·Ŵ
    (bit for bit where s is a power of two, the default for 16-bit weights; else within fp32 rounding of W)."""
    if model is None or is_unit_scaled(model):
        yield
        return
    config = getattr(model, "config", None)
    block = copy.deepcopy(getattr(config, CONFIG_KEY, None))
    try:
        yield
    except BaseException:
        if is_unit_scaled(model):
            merge_unit_scale(model)
            if block is not None:
                setattr(config, CONFIG_KEY, block)
        raise


class UnitScaleTrainer(Trainer):
    """A `Trainer` that trains a unit-scaled model with per-group learning-rate rules.

    Takes `Trainer`'s arguments, except those that would replace or bypass its per-group learning rates, which are
    errors: an optimizer instance in `optimizers`, an `optim` or `optimizer_cls_and_kwargs` class other than AdamW,
    `lr_scheduler_type="greedy"`, a DeepSpeed config with its own optimizer or with `max_grad_norm` > 0, and
    `use_liger_kernel`. `args` may be a `UnitScaleTrainingArguments` (for `lr_rule`, `mup_base_width`,
    `umup_depth_scaling`, `lr_multipliers`, `role_overrides`, FP8 options) or a plain `TrainingArguments` (rule
    `equivalent`: the plain-AdamW trajectory).

    Args:
        unit_scale_config: conversion options (a `UnitScaleConfig` or its dict, as config.json's `unit_scaling`
            block stores it) used when `model` (or `model_init`'s result) is not yet unit-scaled; for a model
            already unit-scaled, an error unless its `config.unit_scaling` records the same conversion options
            (`merge_unit_scale` it first to convert with others; the GEMM precision follows `fp8`, not this config).
        role_overrides: {regex over parameter names (re.fullmatch): role} for parameters the automatic roles
            do not cover (see `lr_rules.describe_parameters`); for plain `TrainingArguments`, or instead of
            `UnitScaleTrainingArguments.role_overrides` (giving both is an error).
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args=None,
        *trainer_args: Any,
        unit_scale_config: UnitScaleConfig | dict[str, Any] | None = None,
        role_overrides: dict[str, Role] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        self.unit_scale_config = unit_scale_config
        # the next class's own signature (Seq2SeqTrainer takes no `optimizer_cls_and_kwargs`: a subclass that takes
        # it for Trainer stores it on `self` before calling this)
        given = inspect.signature(super().__init__).bind(model, args, *trainer_args, **trainer_kwargs).arguments
        if given.get("optimizers", (None, None))[0] is not None:  # before conversion: the model stays untouched
            raise ValueError(
                "UnitScaleTrainer builds its own optimizer groups (per-weight lr = η/s, eps = s·ε under "
                "`equivalent`); an optimizer passed in `optimizers=(optimizer, scheduler)` would train Ŵ with the "
                "wrong learning rates. Pass `optimizer_cls_and_kwargs=(torch.optim.AdamW, {...})` instead, or use "
                "plain `Trainer`."
            )
        replacement = given.get("optimizer_cls_and_kwargs", getattr(self, "optimizer_cls_and_kwargs", None))
        if replacement is not None:  # it builds the optimizer, `optim` is not read
            _check_optimizer_cls(replacement)
        if args is not None:
            _check_arguments(args)
            if replacement is None:  # `optim` builds the optimizer
                _check_optim(args)
            _follow_log_level(args)  # before conversion, which logs
        options = unit_scale_options(args) if args is not None else unit_scale_options(object())
        if role_overrides is not None and options["role_overrides"] is not None:
            raise ValueError(
                "`role_overrides` is given twice: as a UnitScaleTrainer argument and in `args.role_overrides`; give "
                "it in one place."
            )
        self.role_overrides = options["role_overrides"] if role_overrides is None else role_overrides
        with _merged_back_on_error(model):
            if model is not None:
                self._prepare_unit_scaled(model, options)
            super().__init__(model, args, *trainer_args, **trainer_kwargs)
            self.unit_scale_options = unit_scale_options(self.args)
            if self.model is not None:  # an lr option that does not fit the model: an error now, not at the first step
                self._check_lr_options(self.model)
        if self.unit_scale_options["fp8"]:
            self._add_recalibration()
        self._clip_cache: tuple[nn.Module, list[nn.Parameter], dict[int, float]] | None = None
        self._card_follows = False  # True while `push_to_hub` saves: the card it writes next replaces the save's
        self._group_lrs: list[float] | None = None

    # ---- conversion ----

    def _prepare_unit_scaled(self, model: nn.Module, options: dict[str, Any]) -> nn.Module:
        config = as_unit_scale_config(self.unit_scale_config, "unit_scale_config")
        if is_unit_scaled(model):
            check_no_peft_adapters(model)  # converted before `get_peft_model`; unit_scale checks the other order
            if config is not None:  # options it was not converted with would be dropped
                check_converted_with(model, config, "unit_scale_config")
        else:
            unit_scale(model, config)
        config = getattr(model, "config", None)
        block = getattr(config, CONFIG_KEY, None) if config is not None else None
        if isinstance(block, dict):
            block["lr_rule"] = options["lr_rule"]
        if options["fp8"]:
            backend = (
                options["fp8_backend"] or (block.get("backend") if isinstance(block, dict) else None) or "simulate"
            )
            before = {name: layer.precision for name, layer in matmul_layers(model).items()}
            formats = FP8_FORMAT_PAIRS[options["fp8_format"]]
            set_precision(model, *formats, backend, full_precision_modules=options["fp8_full_precision_modules"])
            after = {name: layer.precision for name, layer in matmul_layers(model).items()}
            changed = [name for name, precision in after.items() if before[name] not in (None, precision)]
            if changed:  # set by hand (`set_precision`) or restored from a checkpoint: the arguments decide
                first = changed[0]
                logger.warning(
                    f"`fp8=True` set the GEMM precision of {len(changed)} matmul layers that had another one (e.g. "
                    f"`{first}`: {before[first]} → {after[first] or 'full precision'}) from the arguments "
                    "`fp8_format`, `fp8_full_precision_modules` and `fp8_backend`; pass your settings there."
                )
        elif cast := [name for name, layer in matmul_layers(model).items() if layer.precision is not None]:
            # set by hand or restored from a checkpoint's `unit_scaling` block; without fp8=True nothing calibrates
            logger.warning(
                f"{len(cast)} matmul layers of the model have low-precision GEMMs on (e.g. `{cast[0]}`), but `fp8` is "
                "False: turning them off to train in full precision. Pass `fp8=True` to train in FP8 with calibrated "
                "scales."
            )
            set_precision(model, None, None)
        return model

    def call_model_init(self, trial=None) -> nn.Module:
        return self._prepare_unit_scaled(super().call_model_init(trial), unit_scale_options(self.args))

    # ---- FP8: static operand scales (calibrate.py), kept current by callbacks.RecalibrationCallback ----

    def _add_recalibration(self) -> None:
        """Calibrate a, c on `calibration_batches` training batches at train begin, again every `recalibrate_every`."""
        options = self.unit_scale_options
        callback = RecalibrationCallback(
            compute_loss=self._calibration_loss,
            every=options["recalibrate_every"],
            num_batches=options["calibration_batches"],
            headroom=options["calibration_headroom"],
            grad_underflow_budget=options["calibration_grad_underflow_budget"],
            input_rounding_search=options["calibration_input_rounding_search"],
        )
        # first after DefaultFlowCallback: its `on_log` adds the fp8/ fractions before reporting integrations, the
        # printer and the user's callbacks read the logs
        self.callback_handler.callbacks.insert(1, callback)

    def _calibration_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The loss whose gradient `training_step` backpropagates for `inputs` as one of a step's
        `gradient_accumulation_steps` micro-batches on every process, so that c = rms(g) is what training meets.

        As Trainer: `num_items_in_batch` (`training_loss.trainer_num_items_in_batch`: this batch's label tokens ×
        accumulation, × processes when averaging tokens across devices) goes to a model that takes loss kwargs or to
        `compute_loss_func`; `compute_loss` (an override, label smoothing, `label_names`; it multiplies by the
        processes when it averages tokens across devices); then ÷ accumulation unless the loss is scaled for it
        already (`loss_is_scaled_for_ga`, default: `num_items_in_batch` was used).
        """
        num_items = None
        if "labels" in inputs and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            shifts = getattr(self, "_loss_shifts_labels", None)  # Trainer's own, where it has one
            if shifts is None:
                shifts = loss_shifts_labels(self.accelerator.unwrap_model(model))
            # processes that share one batch (tensor, context, sequence parallel) count it once, as Trainer does
            shared = 1
            for size in ("get_tp_size", "get_cp_size", "get_sp_size"):
                shared *= getattr(self, size, lambda: 1)()
            num_items = trainer_num_items_in_batch(inputs, self.args, shifts_labels=shifts, shared_batch=shared)
        loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items is not None) or self.compute_loss_func is not None
        return loss if scaled else loss / self.args.gradient_accumulation_steps

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        """Trainer's loop (evaluate, predict), its casts left out of the training logs' fractions; with
        `fp8_eval=False`, inside `precision.full_precision`."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        with (
            casts_uncounted(model),
            full_precision(model) if not self.unit_scale_options["fp8_eval"] else nullcontext(),
        ):
            return super().evaluation_loop(*args, **kwargs)

    # ---- optimizer ----

    def _lr_options(self) -> dict[str, Any]:
        """The options of `lr_rules.check_lr_options` and `build_param_groups` that the trainer's arguments give."""
        options = self.unit_scale_options
        names = ("lr_rule", "mup_base_width", "umup_depth_scaling", "lr_multipliers")
        return {**{name: options[name] for name in names}, "role_overrides": self.role_overrides}

    def _check_lr_options(self, model: nn.Module) -> None:
        """Raise what `create_optimizer` would about `lr_rule`, its options, `lr_multipliers` and `role_overrides`
        (`lr_rules.check_lr_options`), before a baseline evaluation or the first training step. `create_optimizer`
        checks again, on the model and options it then has (layers frozen, scales loaded, a model from
        `model_init`)."""
        check_lr_options(model, **self._lr_options(), decay_parameter_names=self.get_decay_parameter_names(model))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        if self.optimizer_cls_and_kwargs is not None:
            _check_optimizer_cls(self.optimizer_cls_and_kwargs)  # again: it may have been set after `__init__`
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            optimizer_kwargs = dict(optimizer_kwargs)
        else:
            optim = _check_optim(self.args)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs = dict(optimizer_kwargs)
            if optim in _QUANTIZED_STATE_OPTIMIZERS:
                logger.warning(
                    f"`optim={optim!r}` quantizes Adam's moments per block, with a floor under each block's absmax "
                    "(torchao: 1e-12). Ŵ's gradients are s·g_W, so its second moment s²·v_W meets that floor 1/s² "
                    "sooner than plain training's"
                    + (
                        ", and the 32-bit embedding states Trainer registers for bitsandbytes are not set up here"
                        if not optim.startswith("adamw_torch")  # bitsandbytes
                        else ""
                    )
                    + ": the run follows plain AdamW approximately, not step for step."
                )
        for key in ("params", "model", "optimizer_dict"):
            if key in optimizer_kwargs:
                raise ValueError(f"UnitScaleTrainer cannot use an optimizer that brings its own `{key}`.")
        if self.optimizer_cls_and_kwargs is not None:
            # as in Trainer: `learning_rate` and `adam_epsilon` go only to optimizers built from `optim`; these
            # kwargs fall back to the class's own defaults, read from an instance (a subclass may take **kwargs)
            device = next(opt_model.parameters()).device
            probe = optimizer_cls([nn.Parameter(torch.zeros(1, device=device))], **optimizer_kwargs)
            for name in ("lr", "eps"):
                optimizer_kwargs.setdefault(name, probe.defaults[name])
        scales = weight_scales(opt_model)
        trainable = opt_model.named_parameters()
        half = [n for n, p in trainable if p.requires_grad and p.dtype == torch.float16 and id(p) in scales]
        if half:
            raise ValueError(
                f"The model's trainable unit-scaled weights are fp16 (`{half[0]}`, …; `fp16_full_eval` leaves them so "
                "after an evaluate()). Adam keeps its moments in the weights' dtype, and Ŵ's second moment s²·v_W "
                "underflows fp16 where plain training's does not. Train fp32 weights (with `fp16=True` or "
                "`bf16=True` mixed precision) or bf16 weights."
            )
        lr = optimizer_kwargs.get("lr", self.args.learning_rate)
        eps = optimizer_kwargs.get("eps", self.args.adam_epsilon)
        weight_decay = self.args.weight_decay  # as Trainer's groups: a `weight_decay` in optimizer_kwargs is overridden
        groups = build_param_groups(
            opt_model,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            **self._lr_options(),
            decay_parameter_names=self.get_decay_parameter_names(opt_model),
        )
        # defaults["lr"] = η: schedules that divide by it (min_lr, lr_end) get the plain factor
        optimizer_kwargs["lr"] = lr
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        logger.info(
            f"UnitScaleTrainer: lr rule `{self.unit_scale_options['lr_rule']}`, η = {lr:g}, {len(groups)} parameter "
            "groups:\n" + summarize_param_groups(groups)
        )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """Trainer's scheduler, once the optimizer is final: first refuse groups that give a converted Ŵ a plain lr.
        `reduce_lr_on_plateau` decides and bounds its reductions on the schedule's lr η·f, as plain Trainer's does,
        not on each group's lr η/s (`plateau.SharedFactorReduceLROnPlateau`)."""
        optimizer = self.optimizer if optimizer is None else optimizer
        self._check_optimizer_groups(optimizer)
        if self.lr_scheduler is None and _scheduler_name(self.args) == "reduce_lr_on_plateau":
            kwargs = self.args.lr_scheduler_kwargs or {}
            self.lr_scheduler = SharedFactorReduceLROnPlateau(optimizer, **kwargs)
            self._created_lr_scheduler = True  # as Trainer's: a later train() builds a new one
        return super().create_scheduler(num_training_steps, optimizer)

    def _check_optimizer_groups(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise if a group not built by `build_param_groups` (a subclass's `create_optimizer`) holds a converted Ŵ:
        its lr η would move W = s·Ŵ by s·η, its eps and weight decay would be off by the same factor."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        scales = weight_scales(model)
        names = {id(p): name for name, p in model.named_parameters()}
        for index, group in enumerate(optimizer.param_groups):
            converted = [names.get(id(p), "?") for p in group["params"] if id(p) in scales]
            if converted and "base_lr" not in group:
                raise ValueError(
                    f"Optimizer group {index} holds {len(converted)} unit-scaled weight(s) (`{converted[0]}`, …) but "
                    "was not built by `hf_unitscale.build_param_groups`: a plain group's lr applies to Ŵ = W/s, so "
                    "W = s·Ŵ would move by s·lr instead of lr. Let UnitScaleTrainer.create_optimizer build the "
                    "groups (per-parameter factors: `lr_multipliers`), or build them with `build_param_groups`."
                )

    # ---- gradient clipping in plain-gradient space ----

    def _scaled_parameters(self, model: nn.Module) -> tuple[list[nn.Parameter], dict[int, float]]:
        """Every parameter once, and {id: s} for the converted ones (s never changes during training)."""
        if self._clip_cache is None or self._clip_cache[0] is not model:  # `model_init` builds a new one per train()
            unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
            self._clip_cache = (model, list(model.parameters()), weight_scales(unwrapped))
        return self._clip_cache[1:]

    def _plain_clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """‖g_W‖ over all parameters (g_W = g_Ŵ/s); clips every gradient by one factor when `max_norm` is finite."""
        params, scales = self._scaled_parameters(model)
        params = [p for p in params if p.grad is not None]
        grads = [p.grad for p in params]
        if not grads:
            return torch.zeros(())
        inverse = [1.0 / scales.get(id(p), 1.0) for p in params]
        if self.is_fsdp_enabled or any(type(g) is not torch.Tensor for g in grads):
            # DTensor / sharded gradients: turn them into plain gradients, let accelerate clip, turn back
            torch._foreach_mul_(grads, inverse)
            norm = (
                super()._clip_grad_norm(model)
                if math.isfinite(max_norm)
                else self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
            )
            torch._foreach_mul_(grads, [scales.get(id(p), 1.0) for p in params])
            return norm
        self.accelerator.unscale_gradients()  # fp16 loss scaling; a no-op otherwise
        # clip_grad_norm_'s own steps on ‖g_W‖ = ‖g_Ŵ‖/s, each norm in its gradient's dtype as torch keeps it
        norms = torch._foreach_mul(torch._foreach_norm(grads), inverse)
        total = torch.nn.utils.get_total_norm(norms)
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def _clip_grad_norm(self, model: nn.Module):
        return self._plain_clip_grad_norm(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        if grad_norm is None:
            grad_norm = self._plain_clip_grad_norm(model, float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # ---- logging every group's lr ----

    def _get_learning_rate(self) -> float:
        """The schedule's lr η·f(t), and a snapshot of every group's lr for `log`."""
        groups = self.optimizer.param_groups
        self._group_lrs = [float(g["lr"]) for g in groups]
        reference = next((g for g in groups if g.get("base_lr")), None)
        if reference is None:
            return super()._get_learning_rate()
        return float(reference["lr"] / lr_ratio(reference, self.optimizer.defaults["lr"]))  # η·f(t)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "learning_rate" in logs and self.optimizer is not None:
            logs.update(self._group_lr_logs())
        super().log(logs, start_time)

    def _group_lr_logs(self) -> dict[str, float]:
        """Per-group lr entries for `log`, from the group lrs `_get_learning_rate` read for the logged `learning_rate`.

        Under `equivalent` (every group has a `weight_scale` s) a group's lr η·f/s is the lr lr·s = η·f on W = s·Ŵ:
        one `lr/<role>` per role, or `lr/<role>/min` and `/max` where its groups' lr·s differ by more than 1e-6
        (relative; an `lr_multipliers` factor). Other rules: `lr/<group name>` = the group's lr, on the trained tensor.
        """
        groups = self.optimizer.param_groups
        lrs = self._group_lrs if self._group_lrs is not None else [float(g["lr"]) for g in groups]
        if len(lrs) != len(groups):
            lrs = [float(g["lr"]) for g in groups]
        out: dict[str, float] = {}
        if all("weight_scale" in g for g in groups):  # equivalent: per role, the lr on W = s·Ŵ
            by_role: dict[str, list[float]] = {}
            for group, lr in zip(groups, lrs, strict=True):
                by_role.setdefault(group.get("role", "other"), []).append(lr * group["weight_scale"])
            for role, values in by_role.items():
                low, high = min(values), max(values)
                if high - low <= 1e-6 * abs(high):
                    out[f"lr/{role}"] = high
                else:
                    out[f"lr/{role}/min"], out[f"lr/{role}/max"] = low, high
        else:
            for index, (group, lr) in enumerate(zip(groups, lrs, strict=True)):
                out[f"lr/{group.get('name', f'group_{index}')}"] = lr
        return out

    # ---- checkpoints: exact unit-scaled format ----

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self._writing_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._writing_checkpoint = False

    def _save_format(self) -> str:
        """Checkpoints: always `unit-scaled` (exact resume); `save_model`/`push_to_hub`: `args.save_format`."""
        return "unit-scaled" if getattr(self, "_writing_checkpoint", False) else self.unit_scale_options["save_format"]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not (isinstance(model, PreTrainedModel) and is_unit_scaled(model)):
            return super()._save(output_dir, state_dict)
        # Trainer._save calls model.save_pretrained(output_dir, state_dict=..., is_main_process=...); route it to
        # this save's format, and to no card when `push_to_hub` writes one next, for the length of the call.
        options = {"checkpoint_format": self._save_format(), "model_card": not self._card_follows}
        had_attribute = "save_pretrained" in model.__dict__
        previous = model.__dict__.get("save_pretrained")

        def save_routed(save_directory, **kwargs):
            save_pretrained(model, save_directory, **options, **kwargs)

        model.save_pretrained = save_routed
        try:
            super()._save(output_dir, state_dict)
        finally:
            if had_attribute:
                model.save_pretrained = previous
            else:
                del model.save_pretrained

    # ---- Hub: Trainer's uploads carry the checkpoint's weights and leave no other format's behind ----

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's mid-training push of the output folder, which mirrors the latest checkpoint: with its
        unit-scaled weights too (Trainer copies only model.safetensors/pytorch_model.bin) and a card that describes
        them (Trainer copies none: an earlier merged push's card would stay), in a commit that deletes the repo's
        weights of another format."""
        push = getattr(self, "push_in_progress", None)
        skipped = push is not None and not push.is_done() and not self.args.hub_always_push  # as Trainer decides
        if self.is_world_process_zero() and self.args.hub_strategy != HubStrategy.END and not skipped:
            # the running upload may still read the output folder's files: touch them only for a push that happens
            mirror_weight_files(checkpoint_folder, self.args.output_dir)
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if isinstance(model, PreTrainedModel) and is_unit_scaled(model):  # as `_save` wrote the checkpoint
                update_model_card(
                    model, self.args.output_dir, checkpoint_format="unit-scaled", repo_id=self.hub_model_id
                )
        with trainer_uploads_replacing_weights(self.args.output_dir):
            super()._push_from_checkpoint(checkpoint_folder)

    def push_to_hub(self, *args: Any, **kwargs: Any):
        """Trainer's `push_to_hub` of the `save_format` checkpoint, in a commit that deletes the repo's weight files of
        another format (mid-training pushes are unit-scaled; a stale model.safetensors would load in plain
        transformers). Its `save_model` writes no card: `create_model_card` writes one over it next, and a merged
        card reads the saved weights back (`model_card._loaded_scales`), once this way."""
        if self.is_world_process_zero():
            self._finish_current_push()  # `save_model` rewrites the output folder that upload may still read
        self._card_follows = True
        try:
            with trainer_uploads_replacing_weights(self.args.output_dir):
                return super().push_to_hub(*args, **kwargs)
        finally:
            self._card_follows = False

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Trainer's card (training summary), merged with the unit-scaling section (format, scales, lr rule)."""
        super().create_model_card(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self.is_world_process_zero() and is_unit_scaled(model):
            repo_id = self.hub_model_id or self.args.hub_model_id  # with its namespace once the repo exists
            update_model_card(model, self.args.output_dir, checkpoint_format=self._save_format(), repo_id=repo_id)

    def _load_unit_scaled(self, checkpoint_dir: str, model: nn.Module) -> bool:
        """Load a unit-scaled checkpoint into `model`; False when `checkpoint_dir` holds none.

        A plain/merged checkpoint cannot be resumed exactly (it holds W, not Ŵ and s): refused.
        """
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        if not is_unit_scaled(unwrapped):
            return False
        if has_unit_scaled_weights(checkpoint_dir):
            load_checkpoint_into(unwrapped, checkpoint_dir)
            self._clip_cache = None
            return True
        raise ValueError(
            f"{checkpoint_dir} holds no {UNIT_SCALED_WEIGHTS_NAME} (nor shards of it): it is not a UnitScaleTrainer "
            "checkpoint, and resuming from plain weights W would not continue the same trajectory (the optimizer "
            "state is in Ŵ = W/s space). Resume from a checkpoint written by UnitScaleTrainer, or start a new run "
            "from these weights."
        )

    def _check_resumable(self, checkpoint_dir: str) -> None:
        """Refuse a checkpoint folder that does not exist, one trained with another `lr_rule` (the optimizer state it
        holds has that rule's parameter groups and learning rates, so the run would not continue), one converted with
        other conversion options (`_check_same_conversion`), or one that stores gains as Ŵ and s
        (`checkpoint.stored_gain_names`: their Adam moments are of Ŵ, not W)."""
        if not os.path.isdir(checkpoint_dir):
            raise ValueError(
                f"`resume_from_checkpoint` {checkpoint_dir!r} does not exist; give a checkpoint folder of the run "
                "(`output_dir/checkpoint-N`), or `True` for the last one in `output_dir`."
            )
        config_path = os.path.join(checkpoint_dir, "config.json")
        block = None
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                block = json.load(f).get(CONFIG_KEY)
        stored_gains = stored_gain_names(self.model, checkpoint_dir) if self.model is not None else []
        if stored_gains:
            raise ValueError(
                f"The checkpoint {checkpoint_dir!r} was written by an hf_unitscale version that unit-scaled gains "
                f"stored in broadcast shape ({len(stored_gains)}: `{stored_gains[0]}`, …), which now stay "
                "unconverted: its optimizer state holds their Adam moments of Ŵ, off by s and s² from W's, so the run "
                "cannot continue exactly. Start a new run from its weights (`hf_unitscale.from_pretrained`, which "
                "loads them as W = s·Ŵ)."
            )
        self._check_same_conversion(checkpoint_dir, block)
        saved = block.get("lr_rule") if isinstance(block, dict) else None
        wanted = self.unit_scale_options["lr_rule"]
        if saved is not None and saved != wanted:
            raise ValueError(
                f"The checkpoint {checkpoint_dir!r} was trained with `lr_rule={saved!r}`, and the arguments give "
                f"`lr_rule={wanted!r}`: its optimizer state holds the parameter groups and learning rates of "
                f"{saved!r}, so the run cannot continue under {wanted!r}. Resume with `lr_rule={saved!r}`, or start "
                f"a new run with {wanted!r} from its weights (`hf_unitscale.from_pretrained`)."
            )

    def _check_same_conversion(self, checkpoint_dir: str, block: dict | None) -> None:
        """Refuse a checkpoint converted with other conversion options (`convert.CONVERSION_OPTIONS`) than the model:
        loading restores its Ŵ and s, but the model's `unit_scaling` block, which the run's saves write, would still
        record the model's options (`power_of_two_scales=True` over scales that are no powers of two)."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False) if self.model is not None else None
        converted_with = getattr(getattr(model, "config", None), CONFIG_KEY, None)
        if not (
            isinstance(block, dict) and isinstance(converted_with, dict) and has_unit_scaled_weights(checkpoint_dir)
        ):
            return  # a checkpoint of merged weights is refused when loading, as not a UnitScaleTrainer checkpoint
        differing = conversion_differences(block, recorded_conversion(converted_with), model)
        if differing:
            saved = ", ".join(f"{option}={value!r}" for option, value, _ in differing)
            given = ", ".join(f"{option}={value!r}" for option, _, value in differing)
            raise ValueError(
                f"The checkpoint {checkpoint_dir!r} was converted with `{saved}`, and the trainer's model with "
                f"`{given}`: its Ŵ and s would load, but the `unit_scaling` block the run saves would record "
                f"`{given}`, which does not fit them. Resume with the checkpoint's options (an unconverted model and "
                f"`unit_scale_config=UnitScaleConfig({saved})`), or start a new run from its weights "
                "(`hf_unitscale.from_pretrained`)."
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._check_resumable(resume_from_checkpoint)
        model = self.model if model is None else model
        if (
            self.is_fsdp_enabled
            or self.is_deepspeed_enabled
            or not self._load_unit_scaled(resume_from_checkpoint, model)
        ):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        checkpoint = self.state.best_model_checkpoint
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not self._load_unit_scaled(checkpoint, self.model):
            super()._load_best_model()
        else:
            logger.info(f"Loaded best model from {checkpoint} (score: {self.state.best_metric}).")


class UnitScaleSeq2SeqTrainer(UnitScaleTrainer, Seq2SeqTrainer):
    """A `Seq2SeqTrainer` that trains a unit-scaled model as `UnitScaleTrainer` does.

    UnitScaleTrainer's conversion, optimizer groups, plain-space clipping, FP8 and checkpoints, with Seq2SeqTrainer's
    generation: `evaluate` and `predict` call `model.generate` when `predict_with_generate` (with
    `generation_max_length`, `generation_num_beams` or their `gen_kwargs`), inside UnitScaleTrainer's
    `evaluation_loop` (FP8 GEMMs unless `fp8_eval=False`), and `args.generation_config` becomes the model's, which
    checkpoints and `save_model` write in either format.

    Takes Seq2SeqTrainer's arguments, UnitScaleTrainer's `unit_scale_config` and `role_overrides`, and Trainer's
    `optimizer_cls_and_kwargs` (which transformers' Seq2SeqTrainer does not take). `args` is a
    `UnitScaleSeq2SeqTrainingArguments`, or a plain `Seq2SeqTrainingArguments` (rule `equivalent`).
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: Seq2SeqTrainingArguments | None = None,
        *trainer_args: Any,
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if not isinstance(args, Seq2SeqTrainingArguments):
            raise TypeError(
                "UnitScaleSeq2SeqTrainer needs `args` of a `Seq2SeqTrainingArguments` class (its generation settings): "
                f"`UnitScaleSeq2SeqTrainingArguments` for the unit-scaling options too; got {type(args).__name__}."
            )
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs  # read by UnitScaleTrainer's `optim` check
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs  # as Trainer.__init__ stores it (it set None)
