"""Find the layers whose weights an enclosing module's code reads directly instead of calling the layer.

A converted layer holds Ŵ = W/s and multiplies s back in inside its own forward. Code that reads the
tensor itself (`self.rel_embeddings.weight` in DeBERTa's encoder, `self.dt_proj.weight` in Mamba's
mixer, `self.decoder.weight` in MobileBERT's LM head, `self.out_proj.weight` in `nn.MultiheadAttention`)
would get Ŵ, off by 1/s, and the model would silently compute another function. Such layers stay
unconverted, and so does any layer tied to one of them.

The check parses the source of every module class in the model (`class_source`: transformers' model code,
torch.nn's modules, user classes; not the methods that build weights: `__init__`, `_init_weights`, `resize_*`, …)
and collects the reads `self.a.b.p` (or `x.p` after `x = self.a.b`; any step may be a `getattr(self.a, "b")`
with a literal name) in which `a.b` is a submodule and `p` one of its weights (≥2-D parameters: biases and norm
gains are not rescaled), used for its value (not only for `.dtype`, `.shape`, `isinstance` or `is None`). A read
inside `if <condition>:` whose condition uses only the module's own attributes and constants (BLOOM's
`if self.pretraining_tp > 1 and self.slow_but_exact:`) counts only where the condition holds for that module.
Code that reaches a weight another way (`getattr` with a computed name, indexing a `ModuleList`, a module passed
to a function) is not seen, nor are classes whose source cannot be read (defined in `exec`), which are named in a
warning.
"""

from __future__ import annotations

import ast
import functools
import operator
from dataclasses import dataclass

from torch import nn
from transformers.utils import logging

from .class_source import computing_methods, scanned_classes

__all__ = ["modules_read_directly"]

logger = logging.get_logger(__name__)

# attributes of a tensor that describe it without reading its values
_METADATA = frozenset(
    {"dtype", "device", "shape", "ndim", "size", "dim", "numel", "nelement", "requires_grad", "is_meta", "layout"}
)
_COMPARISONS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_UNKNOWN = object()


@dataclass(frozen=True)
class _Read:
    """`self.<chain>` loaded for its value, under the `if` conditions around it (each with whether the read is in
    its body (True) or its `else` (False))."""

    chain: tuple[str, ...]
    guards: tuple[tuple[ast.expr, bool], ...]


def _inspected_only(function: ast.AST) -> set[int]:
    """ids of the expressions `function` only inspects: `isinstance(x, …)`, `x is None`, `x.dtype`, `x.shape`, …"""
    nodes = list(ast.walk(function))
    accesses = [access for n in nodes if (access := _attribute_access(n)) is not None]
    inspected = {id(target) for target, name in accesses if name in _METADATA}  # `x.dtype`, `getattr(x, "shape")`
    for node in nodes:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            inspected.add(id(node.args[0]))
        elif isinstance(node, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            inspected.update(id(operand) for operand in (node.left, *node.comparators))
    return inspected


def _self_aliases(function: ast.AST) -> dict[str, tuple[str, ...]]:
    """Local names bound to an attribute chain of self in `function` (`emb = self.embeddings.word`)."""
    aliases = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            chain = _chain(node.value, {})
            if chain:
                aliases[node.targets[0].id] = chain
    return aliases


def _attribute_access(node: ast.AST) -> tuple[ast.expr, str] | None:
    """(`x`, "p") for `x.p` and for `getattr(x, "p")` or `getattr(x, "p", default)` (a literal name); else None."""
    if isinstance(node, ast.Attribute):
        return node.value, node.attr
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) in (2, 3)
        and not node.keywords
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        return node.args[0], node.args[1].value
    return None


def _chain(node: ast.AST, aliases: dict[str, tuple[str, ...]]) -> tuple[str, ...] | None:
    """("a", "b", "p") for `self.a.b.p` (or `x.p` with x an alias of `self.a.b`, or any step as `getattr(…, "b")`);
    None for anything else."""
    names = []
    while (access := _attribute_access(node)) is not None:
        node, name = access
        names.append(name)
    if not isinstance(node, ast.Name) or not names:
        return None
    root = () if node.id == "self" else aliases.get(node.id)
    return None if root is None else root + tuple(reversed(names))


@functools.cache
def _class_reads(cls: type) -> tuple[_Read, ...] | None:
    """The reads of `cls`'s own methods, or None if its source cannot be read."""
    methods = computing_methods(cls)
    if methods is None:
        return None
    reads = []
    for function in methods:
        inspected, aliases = _inspected_only(function), _self_aliases(function)
        reads.extend(_walk_reads(function, (), inspected, aliases))
    return tuple(reads)


def _walk_reads(node: ast.AST, guards: tuple, inspected: set[int], aliases: dict) -> list[_Read]:
    """Reads under `node`, each with the `if` conditions that enclose it."""
    if isinstance(node, ast.If):
        found = _walk_reads(node.test, guards, inspected, aliases)
        for child in node.body:
            found += _walk_reads(child, (*guards, (node.test, True)), inspected, aliases)
        for child in node.orelse:
            found += _walk_reads(child, (*guards, (node.test, False)), inspected, aliases)
        return found
    found = []
    access = _attribute_access(node)
    loaded = not isinstance(node, ast.Attribute) or isinstance(node.ctx, ast.Load)  # a `getattr` call loads
    if access is not None and loaded and access[1] not in _METADATA and id(node) not in inspected:
        chain = _chain(node, aliases)
        if chain and len(chain) > 1:
            found.append(_Read(chain, guards))
    for child in ast.iter_child_nodes(node):
        found += _walk_reads(child, guards, inspected, aliases)
    return found


def _evaluate(expression: ast.expr, module: nn.Module):
    """The value of a condition built from `self.<attribute>` (not `self.training`, which changes), constants,
    comparisons, `and`, `or`, `not`, for `module`; `_UNKNOWN` if it uses anything else (an argument, a call)."""
    if isinstance(expression, ast.Constant):
        return expression.value
    if isinstance(expression, ast.Attribute):
        chain = _chain(expression, {})
        if not chain or chain[0] == "training":  # train/eval mode changes after conversion
            return _UNKNOWN
        value = module
        for name in chain:
            value = getattr(value, name, _UNKNOWN)
            if value is _UNKNOWN:
                return _UNKNOWN
        return value
    if isinstance(expression, ast.UnaryOp) and isinstance(expression.op, ast.Not):
        value = _evaluate(expression.operand, module)
        return _UNKNOWN if value is _UNKNOWN else not value
    if isinstance(expression, ast.BoolOp):  # one known false operand decides `and`, one known true `or`
        values = [_evaluate(v, module) for v in expression.values]
        known = [bool(v) for v in values if v is not _UNKNOWN]
        deciding = isinstance(expression.op, ast.Or)
        if deciding in known:
            return deciding
        return _UNKNOWN if len(known) < len(values) else not deciding
    if isinstance(expression, ast.Compare) and all(type(op) in _COMPARISONS for op in expression.ops):
        operands = [_evaluate(v, module) for v in (expression.left, *expression.comparators)]
        if _UNKNOWN in operands:
            return _UNKNOWN
        pairs = zip(operands, operands[1:], strict=False)
        return all(_COMPARISONS[type(op)](a, b) for op, (a, b) in zip(expression.ops, pairs, strict=True))
    return _UNKNOWN


def _may_run(read: _Read, module: nn.Module) -> bool:
    """False only where an enclosing condition is known, for `module`, to skip the read."""
    for test, in_body in read.guards:
        value = _evaluate(test, module)
        if value is not _UNKNOWN and bool(value) != in_body:
            return False
    return True


def _parameter_read(module: nn.Module, chain: tuple[str, ...]) -> tuple[nn.Module, int] | None:
    """The submodule whose weight (a ≥2-D parameter, the kind `unit_scale` rescales) `chain` reads, and that
    weight's position in the chain: `self.a.b.weight` → (module.a.b, 2); None if it reads none."""
    target = module
    for depth, attribute in enumerate(chain):
        parameter = target._parameters.get(attribute) if depth > 0 else None
        if parameter is not None and parameter.dim() >= 2:
            return target, depth
        target = target._modules.get(attribute)
        if target is None:
            return None
    return None


def modules_read_directly(model: nn.Module) -> dict[int, str]:
    """{id(module): why} for every module of `model` whose own parameters other code reads directly, and every
    module sharing a parameter with one of those."""
    reasons: dict[int, str] = {}
    read: list[nn.Module] = []
    unreadable = set()
    for reader_name, reader in model.named_modules():
        if not reader._modules:
            continue  # reads of a child's weight need a child
        for cls in scanned_classes(reader):
            reads = _class_reads(cls)
            if reads is None:
                unreadable.add(cls.__qualname__)
                continue
            for item in reads:
                found = _parameter_read(reader, item.chain)
                if found is None or id(found[0]) in reasons or not _may_run(item, reader):
                    continue
                where = f"`{reader_name}`" if reader_name else "the model"
                reasons[id(found[0])] = f"{cls.__name__} ({where}) reads `self.{'.'.join(item.chain[: found[1] + 1])}`"
                read.append(found[0])
    if unreadable:
        logger.warning(
            f"Could not read the source of {sorted(unreadable)} to check whether it reads a layer's weight directly "
            "(defined in `exec` or an interactive session?); if its code reads `self.<layer>.weight`, exclude that "
            "layer (`UnitScaleConfig.exclude_modules`)."
        )
    names = {id(m): name for name, m in model.named_modules()}
    read_weights = {id(p): names[id(m)] for m in read for p in m.parameters() if p.dim() >= 2}
    for module in model.modules():
        tied = next((read_weights[id(p)] for p in module.parameters(recurse=False) if id(p) in read_weights), None)
        if tied is not None and id(module) not in reasons:
            reasons[id(module)] = f"it shares a weight with `{tied}`"
    return reasons
