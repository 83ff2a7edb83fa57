"""The package imports its public names on first use: `import hf_unitscale` and `hf-unitscale --help` load neither
torch nor transformers (whose `Trainer` pulls datasets, pandas and pyarrow), and every name of `__all__` resolves.

Each check runs in a fresh interpreter, since this one has imported everything already.
"""

import json
import subprocess
import sys

import pytest

import hf_unitscale

HEAVY = ("torch", "transformers", "transformers.trainer", "datasets", "pandas")


def _modules_loaded_by(code: str) -> list[str]:
    """The modules of `HEAVY` that a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import hf_unitscale",
        "from hf_unitscale.cli import build_parser\nbuild_parser().format_help()",
        "from hf_unitscale.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
        "from hf_unitscale.cli import main\nassert main(['convert', 'in', 'out', '--no-such-flag']) == 2",
    ],
    ids=["import", "build_parser", "help", "argument_error"],
)
def test_light_entry_points_load_neither_torch_nor_transformers(code):
    assert _modules_loaded_by(code) == []


def test_train_help_is_built_without_the_trainer():
    code = "from hf_unitscale.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass"
    assert "transformers.trainer" not in _modules_loaded_by(code)  # the recipe keys need TrainingArguments only


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_every_public_name_resolves():
    assert hf_unitscale.__version__ == "0.1.0"
    assert set(hf_unitscale.__all__) <= set(dir(hf_unitscale))
    code = (
        "import inspect, hf_unitscale\n"
        "from hf_unitscale import *\n"
        "for name in hf_unitscale.__all__:\n"
        "    value = globals()[name]\n"
        "    assert not inspect.ismodule(value), name\n"
        "    assert getattr(hf_unitscale, name) is value, name\n"
    )
    _run(code)


def test_a_submodule_imported_first_does_not_shadow_its_namesake_function():
    # the trainer's callbacks import the submodule `hf_unitscale.calibrate`, which defines the function `calibrate`
    _run(
        "import hf_unitscale.callbacks, hf_unitscale\n"
        "from hf_unitscale import calibrate\n"
        "assert callable(hf_unitscale.calibrate) and calibrate is hf_unitscale.calibrate, hf_unitscale.calibrate\n"
    )


def test_submodules_are_attributes_of_the_package():
    _run(
        "import hf_unitscale\n"
        "assert callable(hf_unitscale.embedded.minilm_path) and callable(hf_unitscale.hub.save_pretrained)\n"
        "assert not hasattr(hf_unitscale, 'no_such_name')\n"
        "assert not any(hasattr(hf_unitscale, name) for name in ('', '.x', 'cli.train', 'recipes'))\n"
    )


def test_the_lazy_table_the_public_names_and_the_type_checking_imports_agree():
    """Three lists name the public API in `__init__.py`: `__all__`, the lazy name → submodule table, and the imports
    type checkers read; a name added to one only would be missing for `*`, at run time or to a type checker."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(hf_unitscale))
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    checked = {
        alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert set(checked) == set(hf_unitscale.__all__) == set(hf_unitscale._SUBMODULE_OF)
    assert {name: f".{module}" for name, module in hf_unitscale._SUBMODULE_OF.items()} == {
        name: f".{module}" for name, module in checked.items()
    }
