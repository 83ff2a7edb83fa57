"""FSDP2 training of unit-scaled tiny models over gloo processes, as Accelerate would shard them on GPUs.

    torchrun --standalone --nproc_per_node 2 tests/distributed/fsdp2_train.py --out DIR

For each case (GPT-2 with tied embeddings, Llama tied and untied) every rank builds the same
model (same seed), converts it with `unit_scale` and builds the per-group AdamW of `lr_rules`
BEFORE sharding, as `Trainer` does. The model is then sharded with torch's `fully_shard`, the way
Accelerate's `fsdp2_prepare_model` does it: one group per decoder block, the tail
(final norm, output head and, when tied, the input embedding) as one group, the root last.
`fully_shard` replaces every Parameter by a new DTensor Parameter, so the optimizer's groups are
re-pointed by parameter name (Accelerate's `fsdp2_switch_optimizer_parameters`). The script
checks that

- the tied weight is still one Parameter, in one shard group;
- the re-pointed groups hold exactly the model's (DTensor) parameters, with the same lr, eps and
  weight decay as groups built from the sharded model directly;
- the scale buffers s, a, c (not sharded) are bit-identical on every rank, before and after training;

then trains `STEPS` steps (rank r takes its slice of the same global batch), gathers the full
state dict and saves it in both checkpoint formats. Rank 0 writes `DIR/<case>/result.json`
(per-step losses of the global batch), `DIR/<case>/gathered.safetensors` (the full state dict)
and `DIR/<case>/{merged,unit-scaled}/`.

Run without torchrun, `train_case(case_id)` is the single-process reference: the same model and
optimizer, unsharded, on the whole global batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from hf_unitscale import unit_scale, unit_scaled_modules  # noqa: E402
from hf_unitscale.distributed import (  # noqa: E402
    check_buffers_in_sync,
    gather_full_state_dict,
    repoint_optimizer_params,
    save_full_checkpoint,
)
from hf_unitscale.lr_rules import build_param_groups, check_param_groups  # noqa: E402

from tiny_models import CASES_BY_ID, VOCAB  # noqa: E402

# case id -> lr rule: both the per-tensor `equivalent` groups and the shared `umup` groups are sharded
CASES = {"gpt2": "equivalent", "llama-tied": "umup", "llama-untied": "equivalent"}
STEPS = 10
GLOBAL_BATCH = 4  # rows; every row is full length, so each rank's mean loss weighs the same number of tokens
SEQ_LEN = 16
LR, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 3e-3, 1e-8, 0.01, 1.0


def global_batches() -> list[torch.Tensor]:
    """The same `STEPS` batches of token ids on every rank and in the reference run."""
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=generator) for _ in range(STEPS)]


def build(case_id: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The converted model and its per-group AdamW, identical on every rank."""
    model = CASES_BY_ID[case_id].model(seed=0).train()
    unit_scale(model)
    groups = build_param_groups(model, lr_rule=CASES[case_id], lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)
    return model, torch.optim.AdamW(groups, lr=LR, foreach=False)


def _group_settings(groups: list[dict]) -> list[tuple]:
    return [(g["name"], g["lr"], g["eps"], g["weight_decay"], len(g["params"])) for g in groups]


def shard(model: nn.Module, optimizer: torch.optim.Optimizer, mesh, lr_rule: str) -> dict:
    """fully_shard `model` as Accelerate's FSDP2 path does and re-point `optimizer`; returns what was checked."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    names_before = [n for n, _ in model.named_parameters()]
    old_params = dict(model.named_parameters())
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    for block in blocks:
        fully_shard(block, mesh=mesh)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    final_norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    # a tied weight must live in exactly one shard group: the embedding and the head are sharded together
    tail = [final_norm, embedding, head] if tied else [final_norm, head]
    if not tied:
        fully_shard(embedding, mesh=mesh)
    fully_shard(tail, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    assert isinstance(model, FSDPModule)

    new_params = dict(model.named_parameters())
    if list(new_params) != names_before:
        raise AssertionError(f"fully_shard changed the parameter names: {names_before} -> {list(new_params)}")
    if not all(isinstance(p, DTensor) for p in new_params.values()):
        raise AssertionError("some parameters are not DTensors after fully_shard")
    still_tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    if still_tied != tied:
        raise AssertionError(f"tying changed by sharding: tied before {tied}, after {still_tied}")

    # without re-pointing, the optimizer would step the old, unsharded tensors: training would do nothing
    stale = [g for g in optimizer.param_groups if any(p is not new_params[n] for n, p in _named(g, old_params))]
    if not stale:
        raise AssertionError("expected fully_shard to replace the Parameters the optimizer holds")
    repoint_optimizer_params(optimizer, old_params, model)
    check_param_groups(model, optimizer.param_groups)
    rebuilt = build_param_groups(model, lr_rule=lr_rule, lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)
    if _group_settings(rebuilt) != _group_settings(optimizer.param_groups):
        raise AssertionError(
            "groups built before sharding differ from groups built on the sharded model:\n"
            f"{_group_settings(optimizer.param_groups)}\n{_group_settings(rebuilt)}"
        )
    return {"tied": tied, "groups": len(optimizer.param_groups), "stale_groups_before_repoint": len(stale)}


def _named(group: dict, old_params: dict[str, nn.Parameter]):
    name_of = {id(p): n for n, p in old_params.items()}
    return [(name_of[id(p)], p) for p in group["params"]]


def clip_plain_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip as plain AdamW on W would: the norm of g_W = g_Ŵ/s, one factor for every gradient.

    The same steps as `UnitScaleTrainer` under FSDP: divide by s, clip (DTensor-aware), multiply back.
    """
    scales = {
        id(getattr(module, weight)): module.scale_of(weight).item()
        for module in unit_scaled_modules(model).values()
        for weight in module.unit_scaled_weights
    }
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    torch._foreach_mul_(grads, [1.0 / scales.get(id(p), 1.0) for p in params])
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    torch._foreach_mul_(grads, [scales.get(id(p), 1.0) for p in params])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor], rank: int, world: int):
    """`len(batches)` AdamW steps on this rank's rows; the global-batch mean loss and plain gradient norm of each."""
    rows = GLOBAL_BATCH // world
    losses, grad_norms = [], []
    for batch in batches:
        ids = batch[rank * rows : (rank + 1) * rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # FSDP2 reduce-scatters the gradients, averaged over ranks
        grad_norms.append(clip_plain_grad_norm_(model, MAX_GRAD_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())
    return losses, grad_norms


def train_case(case_id: str) -> tuple[nn.Module, list[float], list[float]]:
    """The single-process reference: (model, losses, gradient norms) after `STEPS` steps on the whole batch."""
    model, optimizer = build(case_id)
    losses, grad_norms = train(model, optimizer, global_batches(), rank=0, world=1)
    return model, losses, grad_norms


def run_distributed(case_id: str, out: Path, mesh) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer = build(case_id)
    checked = shard(model, optimizer, mesh, CASES[case_id])
    check_buffers_in_sync(model)
    start = time.perf_counter()
    losses, grad_norms = train(model, optimizer, global_batches(), rank, world)
    seconds = time.perf_counter() - start
    check_buffers_in_sync(model)
    full = gather_full_state_dict(model)  # collective; the full tensors on rank 0 only
    case_dir = out / case_id
    for fmt in ("merged", "unit-scaled"):
        save_full_checkpoint(model, case_dir / fmt, checkpoint_format=fmt, state_dict=full)
    try:  # the sharded model's own save_pretrained names the collective that gathers it (was a storage error)
        model.save_pretrained(case_dir / "direct")
        raise AssertionError("save_pretrained of a sharded model wrote something")
    except ValueError as err:
        assert "save_full_checkpoint" in str(err), err
    if rank == 0:
        save_file(
            {k: v.contiguous() for k, v in full.items() if not _is_alias(k, full)}, case_dir / "gathered.safetensors"
        )
        result = {"case": case_id, "lr_rule": CASES[case_id], "world_size": world, **checked}
        result.update(losses=losses, grad_norms=grad_norms, train_seconds=seconds)
        (case_dir / "result.json").write_text(json.dumps(result, indent=2))
    dist.barrier()


def _is_alias(name: str, state_dict: dict[str, torch.Tensor]) -> bool:
    tensor = state_dict[name]
    first = next(k for k, v in state_dict.items() if v is tensor)
    return first != name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case ids")
    args = parser.parse_args()
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    try:
        for case_id in args.cases.split(","):
            run_distributed(case_id, args.out, mesh)
        dist.barrier()  # no rank tears the group down while another still writes or reduces
    finally:
        # FSDP2 modules sit in reference cycles (hooks), so only the collector frees them and the collective work
        # they hold: do it now, not at interpreter exit, where releasing those tensors from Gloo's threads once
        # aborted a rank ("terminate called without an active exception", SIGABRT after the last case finished)
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
