"""Find a module's gains: the parameters its own code multiplies an activation by.

A layer scale (ConvNeXt's `layer_scale_parameter`, BEiT's `lambda_1`, DINOv2's `lambda1`) is a vector γ, one
value per channel, and its module computes γ ⊙ x, as a norm layer applies its gain. No class or name says so,
the code does: the check parses the source of the module's classes (as `direct_reads` does; not the methods
that build weights) for a product `self.p * x` or `x * self.p` in which `self.p` is read as it is or only
reshaped, cast or indexed (`self.p[:, None, None]`, `self.p.unsqueeze(-1)`, `self.p.to(x.dtype)`), and `x` is
no such read of the module's own attribute. Not a gain: `p` only under a function first (`self.logit_scale.exp()`,
`softplus(self.per_dim_scale)`), a product of two of the module's own tensors (DiffLlama's
`self.lambda_q1 * self.lambda_k1`), or a product summed or averaged at once, which is a dot product
(`(x * self.w).sum(-1)`: a weight with a fan-in). A product alone cannot tell γ ⊙ x from a learned vector
weighted by an activation (SAM 2's `(1 - w) * self.no_object_pointer`, a stand-in for a pointer): `lr_rules`
asks only about the 1-D parameters that none of its other rules takes.
"""

from __future__ import annotations

import ast
import functools

from torch import nn

from .direct_reads import _WEIGHT_BUILDERS, _class_definitions, _scanned

__all__ = ["multiplies_activation"]

# tensor methods that change a read's shape, dtype or device, not its values
_LAYOUT_METHODS = frozenset(
    {"to", "float", "half", "bfloat16", "type_as", "view", "view_as", "reshape", "unsqueeze", "squeeze", "expand",
     "expand_as", "contiguous"}
)  # fmt: skip
_REDUCTIONS = frozenset({"sum", "mean"})


def _own_attribute(node: ast.expr) -> str | None:
    """`p` for `self.p`, read as it is or only reshaped, cast or indexed; None for anything else."""
    while True:
        if isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _LAYOUT_METHODS:
            node = node.func.value
        else:
            break
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _reduced(function: ast.AST) -> set[int]:
    """ids of the expressions `function` sums or averages: `e.sum(…)`, `torch.sum(e, …)`, `e.mean(…)`."""
    found = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _REDUCTIONS:
            found.add(id(node.func.value))
            found.update(id(argument) for argument in node.args[:1])
    return found


@functools.cache
def _class_gains(cls: type) -> frozenset[str]:
    """Names `p` that the methods of `cls` (its own, not inherited) multiply an activation by as `self.p`."""
    definition = _class_definitions(cls.__module__).get(cls.__qualname__)
    if definition is None:
        return frozenset()
    gains = set()
    for function in definition.body:
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if function.name == "__init__" or function.name.startswith(_WEIGHT_BUILDERS):
            continue
        reduced = _reduced(function)
        for node in ast.walk(function):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and id(node) not in reduced:
                left, right = _own_attribute(node.left), _own_attribute(node.right)
                if (left is None) != (right is None):
                    gains.add(left or right)
    return frozenset(gains)


def multiplies_activation(module: nn.Module, name: str) -> bool:
    """Whether the code of `module`'s classes multiplies an activation by its attribute `name` (`self.<name> * x`)."""
    return any(
        name in _class_gains(cls)
        for cls in type(module).__mro__
        if cls is not nn.Module and issubclass(cls, nn.Module) and _scanned(cls)
    )
