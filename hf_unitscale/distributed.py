"""Unit-scaled models under torch.distributed: FSDP2 sharding, scale buffers, full checkpoints.

What changes when a converted model is sharded with FSDP2 (`fully_shard`, or Accelerate's FSDP2
path that calls it):

- Ŵ (every Parameter) becomes a new DTensor Parameter, sharded on dim 0. An optimizer built
  before sharding — as `Trainer` builds it, so the per-group lrs exist — still holds the old
  tensors and must be re-pointed by parameter name: Accelerate does this in `prepare`,
  `repoint_optimizer_params` does it for a hand-written loop.
- s, a, c are buffers, which FSDP2 does not shard: every rank keeps its own copy, and they must
  agree bit for bit or the ranks compute different functions (`check_buffers_in_sync`).
- A tied weight (GPT-2's `wte`/`lm_head`) is one Parameter and must be in one shard group:
  shard the module that holds both (or both modules together: `fully_shard([embedding, head])`),
  never the embedding alone — that unties them, and torch ≥ 2.13 then refuses the first forward
  ("shared with a parameter already managed by another FSDP group").
- A full checkpoint is gathered with `torch.distributed.checkpoint` (`gather_full_state_dict`)
  and written by rank 0 in either format with `save_full_checkpoint`.
- Statistics a rank gathers on its own share of the batch (calibration sums, cast counts) are
  pooled with `all_reduce_across_processes`, so every rank sees those of the global batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging

__all__ = [
    "all_reduce_across_processes",
    "check_buffers_in_sync",
    "gather_full_state_dict",
    "repoint_optimizer_params",
    "retie_state_dict",
    "save_full_checkpoint",
]

logger = logging.get_logger(__name__)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """Where the default group reduces tensors: CPU under gloo, the current accelerator under NCCL and its kin."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; before it, CUDA is the accelerator
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    if accelerator is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if not accelerator.is_available():
        return torch.device("cpu")
    return torch.device(accelerator.current_accelerator().type, accelerator.current_device_index())


def all_reduce_across_processes(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over every process of the default group (`op`: "sum" or "max"), on `tensor`'s device.

    `tensor` itself outside torch.distributed. Collective: every rank must call it, with the same shape.
    """
    if not _is_distributed():
        return tensor
    reduced = tensor.to(_collective_device(), copy=True)
    dist.all_reduce(reduced, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return reduced.to(tensor.device)


def repoint_optimizer_params(
    optimizer: torch.optim.Optimizer, params_before: dict[str, nn.Parameter], model: nn.Module
) -> None:
    """Point `optimizer`'s groups at `model`'s current Parameters, matched by name, keeping every group setting.

    Args:
        params_before: `dict(model.named_parameters())` taken before sharding.

    Raises:
        ValueError: the optimizer already has state (it was stepped before sharding), or a
            parameter it holds has no counterpart in `model` (named).
    """
    if optimizer.state:
        raise ValueError(
            "The optimizer was stepped before the model was sharded; its state belongs to the unsharded tensors. "
            "Shard the model before the first step."
        )
    name_of = {id(p): n for n, p in params_before.items()}
    current = dict(model.named_parameters())
    for group in optimizer.param_groups:
        repointed = []
        for p in group["params"]:
            name = name_of.get(id(p))
            if name is None or name not in current:
                raise ValueError(
                    f"Optimizer group `{group.get('name', '?')}` holds a tensor of shape {tuple(p.shape)} named "
                    f"{name!r} before sharding, which the sharded model does not have."
                )
            repointed.append(current[name])
        group["params"] = repointed


@torch.no_grad()
def check_buffers_in_sync(model: nn.Module) -> None:
    """Raise unless every buffer of `model` (s, a, c, …) is bit-identical on every rank. Collective."""
    if not _is_distributed():
        return
    buffers = [(n, b) for n, b in model.named_buffers() if b.device.type != "meta"]
    if not buffers:
        return
    local = torch.cat([_full(b).detach().to("cpu", torch.float64).flatten() for _, b in buffers])
    local = local.to(_collective_device())
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    bad = set()
    for other in gathered:
        offset = 0
        for name, b in buffers:
            n = b.numel()
            if not torch.equal(local[offset : offset + n], other[offset : offset + n]):
                bad.add(name)
            offset += n
    if bad:
        raise RuntimeError(
            f"Buffers differ between ranks: {sorted(bad)[:5]} ({len(bad)} in all). Unit scales s, a, c must be "
            "identical on every rank: convert (and calibrate) the same model on every rank, or broadcast them."
        )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model, Ŵ and s, a, c, on CPU on rank 0; `{}` on other ranks.

    Collective: every rank must call it. Names of a tied Parameter map to one tensor (see
    `retie_state_dict`), so the checkpoint writers store it once, as for an unsharded model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return retie_state_dict(model, full)


def retie_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make every name of a tied Parameter (GPT-2's `lm_head.weight`) point at the first name's tensor, in place.

    A gathered state dict (`get_model_state_dict`, `Accelerator.get_state_dict` under FSDP2) holds
    a separate copy per name; the checkpoint writers recognize a tied weight by shared storage.
    """
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in first_name:
            first_name[id(param)] = name
        elif name in state_dict and first_name[id(param)] in state_dict:
            state_dict[name] = state_dict[first_name[id(param)]]
    return state_dict


def save_full_checkpoint(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    checkpoint_format: str = "merged",
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """Gather an FSDP2 model's full state dict and write it from rank 0 in `checkpoint_format`. Collective.

    Args:
        state_dict: an already gathered full state dict (from `gather_full_state_dict`), to save
            several formats with one gather.
        kwargs: passed to `hf_unitscale.save_pretrained`.
    """
    from .hub import save_pretrained

    if state_dict is None:
        state_dict = gather_full_state_dict(model)
    is_main = not _is_distributed() or dist.get_rank() == 0
    if is_main:
        save_pretrained(model, save_directory, checkpoint_format=checkpoint_format, state_dict=state_dict, **kwargs)
        _unwrap_architecture_name(model, Path(save_directory) / "config.json")
    if _is_distributed():
        dist.barrier()


def _unwrap_architecture_name(model: nn.Module, config_file: Path) -> None:
    """`fully_shard` re-classes the model as `FSDP<Class>`; `config.architectures` must name `<Class>`.

    transformers' own `save_pretrained` strips the prefix (the merged format); the unit-scaled
    writer names `type(model)`, which `from_pretrained` could not resolve.
    """
    name = type(model).__name__
    if not name.startswith("FSDP") or not config_file.exists():
        return
    config = json.loads(config_file.read_text())
    if config.get("architectures") == [name]:
        config["architectures"] = [name.removeprefix("FSDP")]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
