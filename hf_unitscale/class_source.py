"""The parsed source of the module classes that `direct_reads`, `gains` and `right_operands` read.

They scan the methods a class defines itself for what they compute with its attributes: which classes are model
code worth scanning (`scanned_classes`), each Python module's class definitions parsed once
(`class_definitions`), those methods without the ones that build or rebuild weights (`computing_methods`,
skipping the names that start with `WEIGHT_BUILDERS`), and a read of the module's own attribute (`own_attribute`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
from collections.abc import Iterator

from torch import nn

__all__ = [
    "WEIGHT_BUILDERS",
    "binary_operands",
    "class_definitions",
    "computing_methods",
    "own_attribute",
    "scanned_classes",
]

# prefixes of the methods that build or rebuild weights rather than compute with them
WEIGHT_BUILDERS = ("__init__", "_init", "init_", "_tie", "tie_", "resize", "reset_parameters", "_reset_parameters")


def _is_scanned(cls: type) -> bool:
    """Model code: transformers' model files, torch.nn's layers, user classes; not the library plumbing."""
    module = cls.__module__ or ""
    if module.startswith("transformers."):
        return module.startswith("transformers.models.")
    if module.startswith("torch."):
        return module.startswith("torch.nn.modules.") and module != "torch.nn.modules.module"
    return not module.startswith("hf_unitscale")


def scanned_classes(module: nn.Module) -> Iterator[type]:
    """The classes of `module`'s MRO whose code is model code (see `_is_scanned`), most derived first."""
    for cls in type(module).__mro__:
        if cls is not nn.Module and issubclass(cls, nn.Module) and _is_scanned(cls):
            yield cls


@functools.cache
def class_definitions(module_name: str) -> dict[str, ast.ClassDef]:
    """{qualified name: ClassDef} of a Python module's source, parsed once per module; {} if it cannot be read."""
    try:
        tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    except (KeyError, OSError, TypeError, SyntaxError):
        return {}
    found: dict[str, ast.ClassDef] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                found[prefix + child.name] = child
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{prefix}{child.name}.<locals>.")

    visit(tree, "")
    return found


def computing_methods(cls: type) -> list[ast.FunctionDef | ast.AsyncFunctionDef] | None:
    """The methods `cls` defines itself (not inherited ones), but those whose names start with `WEIGHT_BUILDERS`;
    None if its source cannot be read (a class defined in `exec` or an interactive session)."""
    definition = class_definitions(cls.__module__).get(cls.__qualname__)
    if definition is None:
        return None
    return [
        function
        for function in definition.body
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        and not function.name.startswith(WEIGHT_BUILDERS)
    ]


# tensor methods that change a read's shape, dtype or device, not its values
_LAYOUT_METHODS = frozenset(
    {"to", "float", "half", "bfloat16", "type_as", "view", "view_as", "reshape", "unsqueeze", "squeeze", "expand",
     "expand_as", "contiguous"}
)  # fmt: skip


def own_attribute(node: ast.expr) -> str | None:
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


def binary_operands(
    node: ast.AST, operator: type[ast.operator], methods: frozenset[str]
) -> tuple[ast.expr, ast.expr] | None:
    """(left, right) of a binary operation written with `operator` (`a * b`: ast.Mult) or as a call of one of
    `methods` (`torch.mul(a, b)`, `a.mul(b)`); None for anything else."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, operator):
        return node.left, node.right
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in methods:
        if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            return (node.args[0], node.args[1]) if len(node.args) == 2 else None
        return (node.func.value, node.args[0]) if len(node.args) == 1 else None
    return None
