"""How `UnitScaleTrainer`'s Hub pushes carry a unit-scaled checkpoint, which transformers' `Trainer` would push
without its weights or beside another format's.

`Trainer._push_from_checkpoint` copies a checkpoint's config.json to the output folder but only its
model.safetensors/pytorch_model.bin weights: `mirror_weight_files` copies every format's. Trainer's uploads
delete nothing in the repo: `trainer_uploads_replacing_weights` makes them delete the weight files of every
format they do not upload (`hub.WEIGHT_PATTERNS`) in the same commit, as `hub.push_to_hub` does, so no commit
holds a config without its weights or a stale model.safetensors that plain transformers would load as the model.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from .hub import WEIGHT_PATTERNS, remove_stale_weights

__all__ = ["WeightReplacingApi", "mirror_weight_files", "trainer_uploads_replacing_weights"]


def mirror_weight_files(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make `target`'s weight files `source`'s: delete every weight file in `target`, copy those of `source`.
    `Trainer._push_from_checkpoint` copies a checkpoint's config.json to its output folder but only
    model.safetensors/pytorch_model.bin weights, so a unit-scaled checkpoint would be pushed without any."""
    remove_stale_weights(target, "copied")
    for pattern in WEIGHT_PATTERNS:
        for path in Path(source).glob(pattern):
            shutil.copy(path, Path(target) / path.name)


class WeightReplacingApi:
    """`api`, whose `upload_folder` of one of `folders` to the repo's root also deletes the repo's weight files that it
    does not upload (`delete_patterns`), as `push_to_hub` does: for Trainer's uploads, which delete nothing. The commit
    that brings one format's weights then removes another's, so no commit holds a config without its weights or a
    stale model.safetensors that plain transformers would load as the model."""

    def __init__(self, api: HfApi, folders: frozenset[str]) -> None:
        self._api, self._folders = api, folders

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    def upload_folder(self, *args: Any, **kwargs: Any) -> Any:
        folder = kwargs.get("folder_path")
        if folder is not None and not kwargs.get("path_in_repo") and os.path.abspath(folder) in self._folders:
            kwargs["delete_patterns"] = WEIGHT_PATTERNS
        return self._api.upload_folder(*args, **kwargs)  # the same client: its queue keeps Trainer's commits in order


_replacing_lock = threading.Lock()
_replacing_folders: Counter[str] = Counter()  # output folders of the Trainer pushes running now
_trainer_hf_api: list = []  # transformers.trainer's own `hf_api` while ours stands in for it


@contextmanager
def trainer_uploads_replacing_weights(folder: str | os.PathLike) -> Iterator[None]:
    """For the length of a Trainer push, its uploads of `folder` (through `transformers.trainer.hf_api()`) delete the
    repo's weight files of another format in the same commit (`WeightReplacingApi`): a separate delete commit would
    leave the repo's head without weights until the upload lands, and for good if it fails. Other callers of
    `hf_api()` get the same client, unchanged for other folders. Pushes may overlap (trainers in threads): the
    stand-in lists every running push's folder and is removed when the last one ends."""
    import transformers.trainer as transformers_trainer

    folder = os.path.abspath(folder)
    with _replacing_lock:
        if not _replacing_folders:
            original = transformers_trainer.hf_api
            _trainer_hf_api.append(original)
            transformers_trainer.hf_api = lambda: WeightReplacingApi(original(), frozenset(_replacing_folders))
        _replacing_folders[folder] += 1
    try:
        yield
    finally:
        with _replacing_lock:
            _replacing_folders[folder] -= 1
            if not _replacing_folders[folder]:
                del _replacing_folders[folder]
            if not _replacing_folders:
                transformers_trainer.hf_api = _trainer_hf_api.pop()
