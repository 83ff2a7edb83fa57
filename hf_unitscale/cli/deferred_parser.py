"""`DeferredParentParser`: an `ArgumentParser` that takes its parent parser's flags when it is first used."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


class DeferredParentParser(argparse.ArgumentParser):
    """An `ArgumentParser` that adds the actions of `deferred_parent()` (as `parents=[deferred_parent()]` would) the
    first time it parses or formats its usage or help, not when it is built.

    `hf-unitscale --help` builds every command's parser; the flags of `train` are the recipe keys, read from
    `TrainingArguments`, whose import takes seconds (torch, accelerate, peft): they are built only when `train`
    itself parses its arguments or prints its help.
    """

    def __init__(self, *args: Any, deferred_parent: Callable[[], argparse.ArgumentParser] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._deferred_parent = deferred_parent

    def _add_deferred_parent(self) -> None:
        if self._deferred_parent is None:
            return
        parent, self._deferred_parent = self._deferred_parent(), None
        self._add_container_actions(parent)  # what `ArgumentParser(parents=[parent])` does
        self._defaults.update(parent._defaults)

    def parse_known_args(self, args=None, namespace=None):
        self._add_deferred_parent()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_deferred_parent()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_deferred_parent()
        return super().format_help()
