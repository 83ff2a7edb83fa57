"""The README's Python examples run as written (concatenated, in a fresh process and folder)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_the_three_quick_start_commands():
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.*?)```", quick_start, flags=re.DOTALL).group(1)
    assert "scripts/setup.sh" in commands
    assert "hf-unitscale train text_classification " in commands
    assert "python -m pytest -q" in commands
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/setup.sh" in ci and "python -m pytest -q" in ci, "CI must run the README's commands"


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path):
    blocks = readme_python_blocks()
    assert len(blocks) >= 3
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
