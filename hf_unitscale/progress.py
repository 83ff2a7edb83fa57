"""Progress bars for conversion and loading that take seconds: transformers' tqdm, so
`transformers.utils.logging.disable_progress_bar()` (or `HF_HUB_DISABLE_PROGRESS_BARS=1`) turns them off with
transformers' own. Shown only for work on at least `MIN_VALUES` weight values (~1 s on a CPU core: SmolLM2's 135M
values take seconds to convert or load; MiniLM's 23M under one), so small models convert silently."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from transformers.utils import logging

__all__ = ["MIN_VALUES", "progress"]

# weight values from which a pass over them gets a progress bar
MIN_VALUES = 50_000_000

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int, values: int, desc: str, unit: str) -> Iterator[T]:
    """`items` with a progress bar of `total` steps, shown when the work covers at least `MIN_VALUES` weight values
    (`values`) and transformers' progress bars are on."""
    return iter(logging.tqdm(items, total=total, desc=desc, unit=unit, disable=values < MIN_VALUES))
