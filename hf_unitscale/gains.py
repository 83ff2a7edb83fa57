"""Find a model's gains: the parameters that multiply each channel of an activation by a value of their own.

A gain is a vector, one value per channel: 1-D, or stored in the shape it broadcasts in, one dimension larger than 1
and the others 1 (SwiftFormer's layer scales (c, 1, 1), ConvNeXt V2's GRN γ (1, 1, 1, c), RWKV's `time_mix_key`
(1, 1, c)). It is a normalization layer's `weight`, weight_norm's g, or a vector its module's code multiplies an
activation by. y = γ ⊙ x sums no fan-in: `convert` leaves gains as they are (no s, as it leaves biases), and
`lr_rules` gives them the `norm` role, η on W under every rule. Converted, a gain W = s·Ŵ trained with η would move
by η·s, s its pretrained RMS: 1e-5 for SwiftFormer's layer scales, where a 1-D one moves by η.

A layer scale (ConvNeXt's `layer_scale_parameter`, BEiT's `lambda_1`, DINOv2's `lambda1`) is a vector γ, one
value per channel, and its module computes γ ⊙ x, as a norm layer applies its gain. No class or name says so,
the code does: the check parses the source of the module's classes (`class_source`, as `direct_reads` does;
not the methods that build weights) for a product of `self.p` and `x`, written `self.p * x`, `x * self.p`,
`x *= self.p`, `torch.mul(x, self.p)` or `x.mul(self.p)`, in which `self.p` is read as it is or only reshaped,
cast or indexed (`self.p[:, None, None]`, `self.p.unsqueeze(-1)`, `self.p.to(x.dtype)`), and `x` is no such read
of the module's own attribute. Not a gain:

- `p` only under a function first (`self.logit_scale.exp()`, `softplus(self.per_dim_scale)`);
- a product of two of the module's own tensors (DiffLlama's `self.lambda_q1 * self.lambda_k1`);
- a product summed or averaged at once, which is a dot product, a weight with a fan-in: `(x * self.w).sum(-1)`,
  and a product inside a summed one, `(x * self.w * 2).sum(-1)`;
- `p` itself updated in place, `self.p *= x` or `self.p.mul_(x)` (a running average);
- `self.p` weighted by the complement of a mixing weight, `(1 - w) * self.p`: a value blended into the
  activations, not a gain on them (SAM 2's `no_object_pointer`, added where no object is).

A product alone cannot tell γ ⊙ x from a learned vector weighted by an activation in other forms (ViT's mask token
would pass, written `self.mask_token * mask`): it is asked only about per-channel vectors, after the checks for
embeddings, readouts and biases.
"""

from __future__ import annotations

import ast
import functools

import torch
from torch import nn
from torch.nn.utils import parametrize

from .class_source import binary_operands, computing_methods, own_attribute, scanned_classes

__all__ = ["gain_parameters", "is_gain", "is_norm_layer", "is_vector", "multiplies_activation", "parameter_owners"]

_REDUCTIONS = frozenset({"sum", "mean"})
# a product as a call: `torch.mul(a, b)`, `a.mul(b)`, in place `a.mul_(b)`
_PRODUCTS = frozenset({"mul", "mul_", "multiply", "multiply_"})


def _factors(node: ast.AST) -> tuple[ast.expr, ast.expr] | None:
    """The two factors of a product expression `a * b`, `torch.mul(a, b)`, `a.mul(b)`; None for anything else."""
    return binary_operands(node, ast.Mult, _PRODUCTS)


def _in_place(node: ast.AST) -> bool:
    """`a *= b` or `a.mul_(b)`: a product written into its first factor."""
    if isinstance(node, ast.AugAssign):
        return True
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_")


def _reduced(function: ast.AST) -> set[int]:
    """ids of the expressions `function` sums or averages (`e.sum(…)`, `torch.sum(e, …)`, `e.mean(…)`), and of the
    factors of a summed product: in `(x * self.w * 2).sum()` the product `x * self.w` is summed too."""
    pending = []
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _REDUCTIONS:
            pending += [node.func.value, *node.args[:1]]
    found = set()
    while pending:
        node = pending.pop()
        found.add(id(node))
        pending += _factors(node) or ()
    return found


def _is_complement(node: ast.expr) -> bool:
    """`1 - w`: the complement of a mixing weight, which weights a value blended in (`x + (1 - w) * self.p`)."""
    return (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Sub)
        and isinstance(node.left, ast.Constant)
        and node.left.value == 1
    )


@functools.cache
def _class_gains(cls: type) -> frozenset[str]:
    """Names `p` that the methods of `cls` (its own, not inherited) multiply an activation by as `self.p`."""
    gains = set()
    for function in computing_methods(cls) or ():
        reduced = _reduced(function)
        for node in ast.walk(function):
            if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Mult):
                factors = (node.target, node.value)  # `x *= self.p`
            else:
                factors = None if id(node) in reduced else _factors(node)
            if factors is None:
                continue
            left, right = own_attribute(factors[0]), own_attribute(factors[1])
            if left is not None and _in_place(node):
                continue  # `self.p *= x`, `self.p.mul_(x)`: p itself updated (a running average), no gain on x
            if (left is None) != (right is None) and not _is_complement(factors[0] if right else factors[1]):
                gains.add(left or right)
    return frozenset(gains)


def multiplies_activation(module: nn.Module, name: str) -> bool:
    """Whether the code of `module`'s classes multiplies an activation by its attribute `name` (`self.<name> * x`)."""
    return any(name in _class_gains(cls) for cls in scanned_classes(module))


def is_vector(param: torch.Tensor) -> bool:
    """One value per channel: 1-D, or stored in the shape it broadcasts in, one dimension larger than 1 and the others
    1 (ConvNeXt V2's GRN γ (1, 1, 1, c), SwiftFormer's layer scales (c, 1, 1), RWKV's `time_mix_key` (1, 1, c))."""
    return param.dim() == 1 or sum(size > 1 for size in param.shape) == 1


def is_norm_layer(module: nn.Module) -> bool:
    """A normalization layer: torch's LayerNorm, GroupNorm, RMSNorm, BatchNorm/InstanceNorm, or a class named `*Norm*`
    (transformers' `LlamaRMSNorm`, …)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)):
        return True
    return "norm" in type(module).__name__.lower()


def _is_parametrization_gain(module: nn.Module, leaf: str, param: torch.Tensor) -> bool:
    """weight_norm's g: an original of a parametrized weight that broadcasts against a larger one (v)."""
    if not parametrize.is_parametrized(module, leaf):
        return False
    largest = max(module.parametrizations[leaf].parameters(recurse=False), key=torch.numel)
    broadcasts = param.dim() == largest.dim() and all(
        a in (1, b) for a, b in zip(param.shape, largest.shape, strict=True)
    )
    return broadcasts and param.numel() < largest.numel()


def is_gain(module: nn.Module, leaf: str, param: torch.Tensor) -> bool:
    """Whether `param`, named `leaf` in `module` (the module that computes with it: `parameter_owners`), is a gain:
    a vector (`is_vector`) that is a normalization layer's `weight` or that `module`'s code multiplies an activation
    by (`multiplies_activation`), or weight_norm's g."""
    if _is_parametrization_gain(module, leaf, param):
        return True
    if not is_vector(param):
        return False
    return (leaf == "weight" and is_norm_layer(module)) or multiplies_activation(module, leaf)


def parameter_owners(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """{id(parameter): (module that computes with it, the name it has there)}. torch.nn.utils.parametrize keeps a
    weight's originals (weight_norm's g and v) in a ParametrizationList: they belong to the parametrized module,
    under the weight's name."""
    owner: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor_name, originals in module.parametrizations.items():
                for param in originals.parameters(recurse=False):
                    owner.setdefault(id(param), (module, tensor_name))
        for leaf, param in module.named_parameters(recurse=False):
            owner.setdefault(id(param), (module, leaf))
    return owner


def gain_parameters(model: nn.Module) -> set[int]:
    """ids of the gains (`is_gain`) among the parameters of `model`."""
    owners = parameter_owners(model)
    return {id(param) for param in model.parameters() if is_gain(*owners[id(param)], param)}
