"""Find the layers whose weights an enclosing module's code reads directly instead of calling the layer.

A converted layer holds Ŵ = W/s and multiplies s back in inside its own forward. Code that reads the
tensor itself (`self.rel_embeddings.weight` in DeBERTa's encoder, `self.dt_proj.weight` in Mamba's
mixer, `self.decoder.weight` in MobileBERT's LM head, `self.out_proj.weight` in `nn.MultiheadAttention`)
would get Ŵ, off by 1/s, and the model would silently compute another function. Such layers stay
unconverted, and so does any layer tied to one of them.

The check reads the source of every module class in the model (transformers' model code, torch.nn's
modules, user classes; not the methods that build weights: `__init__`, `_init_weights`, `resize_*`, …)
and collects the attribute chains `self.a.b.p` in which `a.b` is a submodule and `p` one of its weights
(≥2-D parameters: biases and norm gains are not rescaled), used for its value (not only for `.dtype`,
`.shape`, `isinstance` or `is None`). Code that reaches a weight another way (`getattr`, indexing a
`ModuleList`, a module passed to a function) is not seen.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from torch import nn

__all__ = ["modules_read_directly"]

# attributes of a tensor that describe it without reading its values
_METADATA = frozenset(
    {"dtype", "device", "shape", "ndim", "size", "dim", "numel", "nelement", "requires_grad", "is_meta", "layout"}
)


def _scanned(cls: type) -> bool:
    """Model code: transformers' model files, torch.nn's layers, user classes; not the library plumbing."""
    module = cls.__module__ or ""
    if module.startswith("transformers."):
        return module.startswith("transformers.models.")
    if module.startswith("torch."):
        return module.startswith("torch.nn.modules.") and module != "torch.nn.modules.module"
    return not module.startswith(("hf_unitscale", "builtins"))


def _rebuilds_weights(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Methods that build or rebuild weights rather than compute with them (`__init__`, `_init_weights`,
    `reset_parameters`, `tie_weights`, `resize_position_embeddings`)."""
    name = function.name
    return "init" in name or "tie" in name or name.startswith("resize") or name == "reset_parameters"


def _inspected_only(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[int]:
    """ids of the expressions `function` only inspects: `isinstance(x, …)`, `x is None`, `x.dtype`, `x.shape`, …"""
    nodes = list(ast.walk(function))
    inspected = {id(n.value) for n in nodes if isinstance(n, ast.Attribute) and n.attr in _METADATA}
    for node in nodes:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            inspected.add(id(node.args[0]))
        elif isinstance(node, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            inspected.update(id(operand) for operand in (node.left, *node.comparators))
    return inspected


@functools.cache
def _self_attribute_reads(cls: type) -> tuple[tuple[str, ...], ...]:
    """Attribute chains `self.x.y…` that `cls`'s own methods load for their value, as ("x", "y", …)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return ()
    chains = set()
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) or _rebuilds_weights(function):
            continue
        inspected = _inspected_only(function)
        for node in ast.walk(function):
            if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
                continue
            if node.attr in _METADATA or id(node) in inspected:
                continue
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id == "self" and len(chain) > 1:
                chains.add(tuple(reversed(chain)))
    return tuple(sorted(chains))


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
    for reader_name, reader in model.named_modules():
        for cls in type(reader).__mro__:
            if cls is nn.Module or not _scanned(cls):
                continue
            for chain in _self_attribute_reads(cls):
                found = _parameter_read(reader, chain)
                if found is not None and id(found[0]) not in reasons:
                    where = f"`{reader_name}`" if reader_name else "the model"
                    reasons[id(found[0])] = f"{cls.__name__} ({where}) reads `self.{'.'.join(chain[: found[1] + 1])}`"
                    read.append(found[0])
    names = {id(m): name for name, m in model.named_modules()}
    read_weights = {id(p): names[id(m)] for m in read for p in m.parameters() if p.dim() >= 2}
    for module in model.modules():
        tied = next((read_weights[id(p)] for p in module.parameters(recurse=False) if id(p) in read_weights), None)
        if tied is not None and id(module) not in reasons:
            reasons[id(module)] = f"it shares a weight with `{tied}`"
    return reasons
