"""The `hf-unitscale` command end to end on tiny models: convert, merge, report, train, --help.

Commands run in-process through `main([...])` (fast); `--help` also runs as a real subprocess of
the installed console script.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from test_recipe import RECIPES_DIR, save_tiny_model, stand_in_overrides
from transformers import AutoConfig, AutoModel

import hf_unitscale
from hf_unitscale.cli import main
from hf_unitscale.convert import is_unit_scaled

from tiny_models import CASES_BY_ID

CASES = ["bert", "gpt2", "llama-tied"]


def _logits(model, case_id):
    with torch.no_grad():
        out = model.eval()(**CASES_BY_ID[case_id].batch())
    return out.logits


def _close(a, b, rtol=1e-5):
    assert torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max()), f"max diff {(a - b).abs().max():.3g}"


# --------------------------------------------------------------------------- help


def test_help_as_a_real_subprocess():
    exe = shutil.which("hf-unitscale") or str(__import__("pathlib").Path(sys.executable).with_name("hf-unitscale"))
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for command in ("convert", "merge", "report", "train"):
        assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.M), f"`{command}` not explained:\n{result.stdout}"


@pytest.mark.parametrize("command", ["convert", "merge", "report", "train"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-unitscale {command}")


def test_train_help_lists_recipe_keys_from_dataclass_metadata(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--max-seq-length", "--lr_rule", "--fp8", "--learning_rate"):
        assert flag in out
    assert "embedded:minilm" in out  # a field's help text


def test_no_command_prints_help(capsys):
    assert main([]) == 1
    assert "commands" in capsys.readouterr().out


# --------------------------------------------------------------------------- convert and merge


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize(
    "fmt, weight_dtype", [("unit-scaled", "float32"), ("merged", "float32"), ("unit-scaled", "bfloat16")]
)
def test_convert(case_id, fmt, weight_dtype, tmp_path):
    source = save_tiny_model(case_id, tmp_path / "plain")
    out = tmp_path / "converted"
    assert main(["convert", str(source), str(out), "--format", fmt, "--weight_dtype", weight_dtype]) == 0
    block = json.loads((out / "config.json").read_text())["unit_scaling"]
    assert block["checkpoint_format"] == fmt
    assert (out / "tokenizer.json").is_file()
    loaded = hf_unitscale.from_pretrained(out)
    assert is_unit_scaled(loaded)
    reference = _logits(CASES_BY_ID[case_id].model(), case_id)
    _close(_logits(loaded, case_id), reference, rtol=1e-5 if weight_dtype == "float32" else 2e-2)


def test_convert_refuses_weight_dtype_for_merged(tmp_path, capsys):
    source = save_tiny_model("bert", tmp_path / "plain")
    assert main(["convert", str(source), str(tmp_path / "o"), "--format", "merged", "--weight-dtype", "e4m3"]) == 2
    assert "--weight-dtype" in capsys.readouterr().err


def test_convert_missing_model_is_one_line_error(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "could not load" in capsys.readouterr().err


@pytest.mark.parametrize("case_id", CASES)
def test_merge_gives_a_plain_checkpoint(case_id, tmp_path):
    source = save_tiny_model(case_id, tmp_path / "plain")
    assert main(["convert", str(source), str(tmp_path / "us"), "--format", "unit-scaled"]) == 0
    assert main(["merge", str(tmp_path / "us"), str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "unit_scaling" not in config
    # plain transformers loads it, with the original function
    cls = getattr(__import__("transformers"), AutoConfig.from_pretrained(tmp_path / "merged").architectures[0])
    plain = cls.from_pretrained(tmp_path / "merged")
    assert not is_unit_scaled(plain)
    _close(_logits(plain, case_id), _logits(CASES_BY_ID[case_id].model(), case_id))


def test_convert_with_model_class(tmp_path):
    source = save_tiny_model("bert", tmp_path / "plain")
    assert main(["convert", str(source), str(tmp_path / "o"), "--model-class", "AutoModel"]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["architectures"] == ["BertModel"]
    assert isinstance(hf_unitscale.from_pretrained(tmp_path / "o", model_class=AutoModel), torch.nn.Module)


# --------------------------------------------------------------------------- report

_ROW = re.compile(r"^(\S+)\s+((?:\S+\s+){11}\S+)\s*$")


def _parse_table(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        match = _ROW.match(line)
        if match and not line.startswith("layer"):
            rows[match.group(1)] = match.group(2).split()
    return rows


@pytest.mark.parametrize("case_id, tokenizer", [("bert", False), ("gpt2", True)])
def test_report_writes_png_and_table_matching_the_plot_data(case_id, tokenizer, tmp_path, capsys, monkeypatch):
    source = save_tiny_model(case_id, tmp_path / "plain", tokenizer=tokenizer)
    if tokenizer:  # real text lines for the tokenizer instead of the embedded corpus
        (tmp_path / "text.txt").write_text("\n".join(f"w{i} w{i + 1} w{i + 2} w3 w4" for i in range(40)))
    png, table_json = tmp_path / "plot" / "scales.png", tmp_path / "scales.json"
    args = ["report", str(source), "--output", str(png), "--json", str(table_json), "--batch-size", "4"]
    args += ["--max-length", "12"] + (["--text-file", str(tmp_path / "text.txt")] if tokenizer else [])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(table_json.read_text())
    table = _parse_table(out)
    assert list(table) == [row["name"] for row in data["layers"]]
    columns = ["weight_rms", "unit_weight_rms", "input_rms", "grad_rms", "grad_flushed"]
    columns += ["input_scale", "grad_scale", "scaled_input_rms", "scaled_grad_rms", "scaled_grad_flushed"]
    columns += ["scaled_input_peak", "scaled_grad_peak"]
    for row in data["layers"]:
        for column, cell in zip(columns, table[row["name"]], strict=True):
            value = row[column]
            if value is None:
                assert cell == "—"
            elif column.endswith("flushed"):
                assert float(cell.rstrip("%")) == pytest.approx(100 * value, abs=0.051)
            else:
                assert cell != "—" and float(cell) == pytest.approx(value, rel=5e-4), (row["name"], column, cell)
    # unit scale and calibration did their job on every matmul layer
    matmuls = [row for row in data["layers"] if row["kind"] == "matmul"]
    assert all(row["unit_weight_rms"] == pytest.approx(1.0, rel=1e-5) for row in data["layers"])
    assert all(0.3 < row["scaled_input_rms"] < 3 and 0.3 < row["scaled_grad_rms"] < 3 for row in matmuls)


def test_report_plot_values_equal_the_table(tmp_path, capsys):
    """The figure `report` draws is built from the same numbers it prints (analysis tests check the figure)."""
    from hf_unitscale.analysis import plot_scale_report, plotted_series, scale_report
    from hf_unitscale.cli.report import report_batches
    from hf_unitscale.cli.utils import load_model

    source = save_tiny_model("llama-tied", tmp_path / "plain", tokenizer=False)
    assert main(["report", str(source), "-o", str(tmp_path / "a.png"), "--json", str(tmp_path / "a.json")]) == 0
    data = json.loads((tmp_path / "a.json").read_text())
    args = __import__("argparse").Namespace(num_batches=1, batch_size=8, max_length=64, seed=0, text_file=None)
    model = load_model(str(source))
    batches = report_batches(model, str(source), args)
    report = scale_report(model, batches[:1], calibration_batches=batches[1:])
    series = plotted_series(plot_scale_report(report))
    assert series["rms(g)"] == pytest.approx([row["grad_rms"] for row in data["layers"]], rel=1e-6)
    assert series["rms(W)"] == pytest.approx([row["weight_rms"] for row in data["layers"]], rel=1e-6)


# --------------------------------------------------------------------------- train


def test_train_five_step_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((RECIPES_DIR / "text_classification.yaml").read_text())
    assert main(["train", str(recipe), *stand_in_overrides(tmp_path, "text-classification", max_steps=5)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"accuracy\s+\d\.\d{4}\s+\d\.\d{4}", out), out
    results = json.loads((tmp_path / "out" / "recipe_results.json").read_text())
    assert results["train"]["train_loss"] > 0
    assert results["after"]["epoch"] > 0
    # the final model is a plain (merged) checkpoint any transformers install loads
    assert json.loads((tmp_path / "out" / "config.json").read_text())["unit_scaling"]["checkpoint_format"] == "merged"
    assert is_unit_scaled(hf_unitscale.from_pretrained(tmp_path / "out"))
