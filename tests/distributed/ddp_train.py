"""A `UnitScaleTrainer` run under DDP on CPU (gloo), or its single-process reference.

    torchrun --standalone --nproc_per_node 2 tests/distributed/ddp_train.py --out DIR --per-device-batch 2
    python tests/distributed/ddp_train.py --out DIR --per-device-batch 4      # same global batch, one process

`TrainingArguments(use_cpu=True)` under torchrun makes Accelerate pick MULTI_CPU with gloo and
wrap the model in `DistributedDataParallel`. The tiny GPT-2 (tied embeddings) is converted by the
trainer and trained `--steps` steps with the `equivalent` lr rule and gradient clipping (in
plain-gradient space) on a fixed dataset read in order, so the global batch of step t holds the
same rows whatever the number of processes: rank r of a 2-process run gets the r-th half of it.
Every row is full length, so each process's mean loss weighs the same number of tokens.

Rank 0 writes `DIR/result.json` (distributed type, whether the model was wrapped in DDP, world
size, per-step losses and gradient norms) and the trainer saves `DIR/run/checkpoint-<steps>/`
(unit-scaled format) and `DIR/final/` (`save_model`).
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

from hf_unitscale.arguments import UnitScaleTrainingArguments  # noqa: E402
from hf_unitscale.distributed import check_buffers_in_sync  # noqa: E402
from hf_unitscale.trainer import UnitScaleTrainer  # noqa: E402

from tiny_models import CASES_BY_ID, VOCAB  # noqa: E402

SEQ_LEN = 16
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 3e-3, 0.01, 1.0


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--case", default="gpt2")
    args = parser.parse_args()

    training_args = UnitScaleTrainingArguments(
        output_dir=str(args.out / "run"),
        use_cpu=True,
        per_device_train_batch_size=args.per_device_batch,
        max_steps=args.steps,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        lr_rule="equivalent",
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.steps,
        save_only_model=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    global_batch = args.per_device_batch * training_args.world_size
    model = CASES_BY_ID[args.case].model(seed=0).train()
    trainer = UnitScaleTrainer(
        model=model, args=training_args, train_dataset=FixedTokens(rows=args.steps * global_batch)
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    check_buffers_in_sync(trainer.model)  # s, a, c identical on every rank (collective)
    trainer.save_model(str(args.out / "final"))

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
            "steps": [entry["step"] for entry in history],
            "losses": [entry["loss"] for entry in history],
            "grad_norms": [entry.get("grad_norm") for entry in history],
            "train_seconds": seconds,
        }
        (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
