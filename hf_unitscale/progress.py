"""Progress bars for conversion and loading that take seconds: transformers' tqdm, so
`transformers.utils.logging.disable_progress_bar()` (or `HF_HUB_DISABLE_PROGRESS_BARS=1`) turns them off with
transformers' own. Shown only for work on at least `MIN_VALUES` weight values (~1 s on a CPU core: SmolLM2's 135M
values take seconds to convert or load; MiniLM's 23M under one), so small models convert silently; under
torch.distributed, by each node's first process only, as Trainer shows its own."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch.distributed as dist
from transformers.utils import logging

__all__ = ["MIN_VALUES", "progress"]

# weight values from which a pass over them gets a progress bar
MIN_VALUES = 50_000_000

T = TypeVar("T")


def _is_local_main_process() -> bool:
    """False on a process of an initialised torch.distributed group that is not its node's first: local rank
    `LOCAL_RANK` (as torchrun and accelerate set it), else the global rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0


def progress(items: Iterable[T], *, total: int, values: int, desc: str, unit: str) -> Iterator[T]:
    """`items` with a progress bar of `total` steps, shown when the work covers at least `MIN_VALUES` weight values
    (`values`), transformers' progress bars are on, and this is a node's first process."""
    hidden = values < MIN_VALUES or not _is_local_main_process()
    return iter(logging.tqdm(items, total=total, desc=desc, unit=unit, disable=hidden))
