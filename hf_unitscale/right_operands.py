"""Find the weights a module's code multiplies from the right: `x @ self.w`, `torch.matmul(x, self.w)`.

(`x.matmul(self.w)` and `mm` too.) Such a weight is stored (in, out), as transformers' Conv1D stores its own:
SwiftFormer's `w_g` (c, 1) in `query @ self.w_g`, Gemma 3's `mm_input_projection_weight` (vision width, text width).
Each output sums `in` products, so its fan-in is its first dimension, not the trailing one of an nn.Linear's (out,
in) weight. `self.w` is read as it is or only cast, reshaped or indexed (`class_source.own_attribute`), and `x` is
no such read of the module's own attribute; `x @ self.w.T` multiplies by a weight stored (out, in), and is not
counted.
"""

from __future__ import annotations

import ast
import functools

from torch import nn

from .class_source import binary_operands, computing_methods, own_attribute, scanned_classes

__all__ = ["multiplies_from_the_right"]

_MATMULS = frozenset({"matmul", "mm"})


def _matmul_operands(node: ast.AST) -> tuple[ast.expr, ast.expr] | None:
    """(left, right) of `a @ b`, `torch.matmul(a, b)`, `torch.mm(a, b)`, `a.matmul(b)`, `a.mm(b)`; None otherwise."""
    return binary_operands(node, ast.MatMult, _MATMULS)


@functools.cache
def _class_right_operands(cls: type) -> frozenset[str]:
    """Names `w` that the methods of `cls` (its own, not inherited) multiply an activation by as `x @ self.w`."""
    names = set()
    for function in computing_methods(cls) or ():
        for node in ast.walk(function):
            operands = _matmul_operands(node)
            if operands is not None and own_attribute(operands[0]) is None:
                right = own_attribute(operands[1])
                if right is not None:
                    names.add(right)
    return frozenset(names)


def multiplies_from_the_right(module: nn.Module, name: str) -> bool:
    """Whether the code of `module`'s classes multiplies an activation from the right by its attribute `name`
    (`x @ self.<name>`): a weight stored (in, out)."""
    return any(name in _class_right_operands(cls) for cls in scanned_classes(module))
