"""A `UnitScaleTrainer` run under DDP on CPU (gloo), under Accelerate's FSDP2 path, or its single-process reference.

    torchrun --standalone --nproc_per_node 2 tests/distributed/ddp_train.py --out DIR --per-device-batch 2
    torchrun --standalone --nproc_per_node 2 tests/distributed/ddp_train.py --out DIR --per-device-batch 2 \
        --accelerate-fsdp2
    python tests/distributed/ddp_train.py --out DIR --per-device-batch 4      # same global batch, one process

`TrainingArguments(use_cpu=True)` under torchrun makes Accelerate pick MULTI_CPU with gloo and
wrap the model in `DistributedDataParallel`. The tiny GPT-2 (tied embeddings) is converted by the
trainer and trained `--steps` steps with the `equivalent` lr rule and gradient clipping (in
plain-gradient space) on a fixed dataset read in order, so the global batch of step t holds the
same rows whatever the number of processes: rank r of a 2-process run gets the r-th half of it.
Every row is full length, so each process's mean loss weighs the same number of tokens.

With `--fp8` the trainer runs FP8 matmuls (`fp8=True`): calibrated on 2 batches at the start and
again every 5 steps, the casts' saturation/underflow fractions in every log; rank 0 records rms(g)/c of every
layer in the first micro-batch.

With `--accelerate-fsdp2` the trainer gets `fsdp="full_shard"` with `fsdp_version: 2`, and
Accelerate is made to take its FSDP2 path on CPU (see `force_accelerate_fsdp2_on_cpu`).

Rank 0 writes `DIR/result.json` (distributed type, the wrapper, world size, parameter types,
optimizer groups, per-step losses, gradient norms and FP8 cast fractions) and the trainer saves `DIR/run/checkpoint-<steps>/`
(unit-scaled format) and `DIR/final/` (`save_model`).

With `--resume-at K` the run also writes a full checkpoint (optimizer, scheduler, RNG) at step K;
afterwards a fresh model and trainer, in the same processes, resume from it to the last step and
save `DIR/final_resumed/`; result.json gains the resumed run's losses and gradient norms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from transformers import TrainerCallback  # noqa: E402

from hf_unitscale.arguments import UnitScaleTrainingArguments  # noqa: E402
from hf_unitscale.convert import matmul_layers  # noqa: E402
from hf_unitscale.distributed import check_buffers_in_sync  # noqa: E402
from hf_unitscale.lr_rules import check_param_groups  # noqa: E402
from hf_unitscale.trainer import UnitScaleTrainer  # noqa: E402

from tiny_models import CASES_BY_ID, VOCAB  # noqa: E402

SEQ_LEN = 16
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 3e-3, 0.01, 0.5  # below the tiny GPT-2's first gradient norms (0.64-0.84)


class FixedTokens(Dataset):
    """`rows` full-length rows of random token ids (labels = inputs), the same in every process."""

    def __init__(self, rows: int, seed: int = 1234) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (rows, SEQ_LEN), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def force_accelerate_fsdp2_on_cpu() -> None:
    """Let Accelerate's FSDP2 path run on CPU processes.

    Accelerate only switches to FSDP on accelerator devices: on CPU it keeps MULTI_CPU (DDP) even
    when `TrainingArguments(fsdp=...)` hands it an FSDP plugin. After its state is built, set the
    distributed type and plugin it would have set on GPUs; everything downstream — `Trainer`
    building the optimizer, `Accelerator.prepare` calling `fully_shard` by the plugin's wrap
    policy and re-pointing the optimizer groups, clipping, `get_state_dict` on save — is
    Accelerate's and Trainer's own code.
    """
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # PartialState too: AcceleratorState re-reads its fields when it is instantiated again
            PartialState().distributed_type = self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


class FirstStepGradientScales(TrainerCallback):
    """rms(g)/c of every matmul layer's output gradient in the first micro-batch training backpropagates (non-zero
    elements, this rank): c was calibrated on that batch, so the ratios are ≈ 1 when calibration scaled the loss as
    training does."""

    def __init__(self) -> None:
        self.ratios: dict[str, float] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            for name, layer in matmul_layers(model).items():
                layer.register_full_backward_hook(self._record(name, layer))

    def _record(self, name, layer):
        def hook(module, grad_input, grad_output):
            nonzero = grad_output[0][grad_output[0] != 0]
            self.ratios.setdefault(name, float(nonzero.square().mean().sqrt()) / float(layer.grad_scale))

        return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--case", default="gpt2")
    parser.add_argument(
        "--accelerate-fsdp2", action="store_true", help="shard with Accelerate's FSDP2 path instead of DDP"
    )
    parser.add_argument("--resume-at", type=int, default=None, help="full checkpoint at this step, then resume it")
    parser.add_argument("--fp8", action="store_true", help="FP8 matmuls, calibrated at the start and every 5 steps")
    args = parser.parse_args()
    fsdp_args = {}
    if args.accelerate_fsdp2:
        force_accelerate_fsdp2_on_cpu()
        fsdp_args = {
            "fsdp": "full_shard",
            "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"},
        }

    fp8_args = {"fp8": True, "calibration_batches": 2, "recalibrate_every": 5} if args.fp8 else {}
    training_args = UnitScaleTrainingArguments(
        output_dir=str(args.out / "run"),
        use_cpu=True,
        per_device_train_batch_size=args.per_device_batch,
        max_steps=args.steps,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        lr_rule="equivalent",
        save_format="unit-scaled",  # `final/` is compared tensor by tensor with the checkpoint format
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.resume_at or args.steps,
        save_only_model=args.resume_at is None,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        **fsdp_args,
        **fp8_args,
    )
    global_batch = args.per_device_batch * training_args.world_size
    dataset = FixedTokens(rows=args.steps * global_batch)
    gradient_scales = FirstStepGradientScales()
    trainer = UnitScaleTrainer(
        model=CASES_BY_ID[args.case].model(seed=0).train(),
        args=training_args,
        train_dataset=dataset,
        callbacks=[gradient_scales] if args.fp8 else None,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    check_buffers_in_sync(trainer.model)  # s, a, c identical on every rank (collective)
    try:  # the optimizer steps the model's own (possibly re-pointed DTensor) parameters, each in one group
        check_param_groups(trainer.model, trainer.optimizer.param_groups)
        groups_cover_model = True
    except ValueError as err:
        groups_cover_model = str(err)
    trainer.save_model(str(args.out / "final"))
    resumed_history = None
    if args.resume_at is not None:
        training_args.output_dir = str(args.out / "run_resumed")
        resumed = UnitScaleTrainer(
            model=CASES_BY_ID[args.case].model(seed=0).train(), args=training_args, train_dataset=dataset
        )
        resumed.train(resume_from_checkpoint=str(args.out / "run" / f"checkpoint-{args.resume_at}"))
        resumed.save_model(str(args.out / "final_resumed"))
        # the resumed state carries the first run's history up to step K: keep the steps trained after resuming
        resumed_history = [e for e in resumed.state.log_history if "loss" in e and e["step"] > args.resume_at]

    if trainer.is_world_process_zero():
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        result = {
            "distributed_type": str(trainer.accelerator.distributed_type),
            "backend": trainer.accelerator.state.backend,
            "wrapped_in_ddp": isinstance(trainer.model_wrapped, DistributedDataParallel),
            "wrapper": type(trainer.model_wrapped).__name__,
            "world_size": training_args.world_size,
            "num_processes": trainer.accelerator.num_processes,
            "global_batch": global_batch,
            "parameter_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
            "optimizer_groups": [
                [g["name"], g["base_lr"], g["eps"], g["weight_decay"]] for g in trainer.optimizer.param_groups
            ],
            "optimizer_groups_cover_model": groups_cover_model,
            "steps": [entry["step"] for entry in history],
            "losses": [entry["loss"] for entry in history],
            "grad_norms": [entry.get("grad_norm") for entry in history],
            "cast_fractions": [{k: v for k, v in entry.items() if k.startswith("fp8/")} for entry in history],
            "first_step_grad_to_scale": gradient_scales.ratios,
            "train_seconds": seconds,
        }
        if resumed_history is not None:
            result["resumed"] = {
                "steps": [entry["step"] for entry in resumed_history],
                "losses": [entry["loss"] for entry in resumed_history],
                "grad_norms": [entry.get("grad_norm") for entry in resumed_history],
            }
        (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
