"""Recipes: every YAML in hf_unitscale/recipes/ parses and trains on a tiny stand-in; bad recipes name the bad key.

Also holds the tiny stand-ins the CLI tests share: a model folder from the table in
`tiny_models.py` with a word-level tokenizer over its vocabulary, and tiny JSON-lines data.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import typing
from pathlib import Path

import numpy
import pytest
import yaml

from hf_unitscale.cli import main
from hf_unitscale.recipe import RECIPES_DIR, TASKS, DataArguments, ModelArguments, RecipeError, load_recipe

from tiny_models import CASES_BY_ID, VOCAB

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
# the tiny stand-in of each task in the table
STAND_IN = {"text-classification": "bert", "causal-lm": "llama-tied"}


# --------------------------------------------------------------------------- tiny stand-ins (shared with test_cli)


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A word-level tokenizer whose ids cover exactly the tiny models' vocabulary (or `vocab_size` tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL))]
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[SEP]",
    )


def save_tiny_model(case_id: str, folder: Path, *, tokenizer: bool = True) -> Path:
    """Save the tiny model `case_id` of the table (and a tokenizer) to `folder`."""
    model = CASES_BY_ID[case_id].model()
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def write_tiny_data(folder: Path, task: str, *, n_train: int = 48, n_eval: int = 16) -> tuple[Path, Path]:
    """train.jsonl / eval.jsonl of random word sentences; classification label = the first word is in the upper half."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            row = {"text": " ".join(words)}
            if task == "text-classification":
                row["label"] = int(WORDS.index(words[0]) >= len(WORDS) // 2)
            rows.append(row)
        path = folder / f"{split}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def stand_in_overrides(tmp_path: Path, task: str, max_steps: int = 2) -> list[str]:
    """Command-line overrides that point a recipe at the tiny stand-in of its task."""
    model_dir = save_tiny_model(STAND_IN[task], tmp_path / "model")
    train_file, eval_file = write_tiny_data(tmp_path / "data", task)
    return [
        "--model_name_or_path", str(model_dir),
        "--train_file", str(train_file),
        "--eval_file", str(eval_file),
        "--max_steps", str(max_steps),
        "--max-seq-length", "16",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--scale_plot_batches", "1",
        "--output_dir", str(tmp_path / "out"),
        "--logging_steps", "1",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def assert_trained(source: Path, output_dir: Path, task: str) -> None:
    """Every weight matrix of the model `train` saved in `output_dir` moved away from the one in `source`.

    The tests' runs of 2 to 5 steps move each by about the warmup's learning rate (1.2e-5 or more on the tiny
    stand-ins); merging W = s·Ŵ back changes W by fp32 rounding only, and a run that trains nothing (learning rate 0)
    moves none. A merged checkpoint is loaded with plain transformers; a unit-scaled one through
    `hf_unitscale.from_pretrained`, then merged.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import hf_unitscale

    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModelForCausalLM
    if (output_dir / "model.safetensors").exists():
        trained = auto.from_pretrained(output_dir)
    else:
        trained = hf_unitscale.merge_unit_scale(hf_unitscale.from_pretrained(output_dir))
    before, after = auto.from_pretrained(source).state_dict(), trained.state_dict()
    assert before.keys() == after.keys(), before.keys() ^ after.keys()
    unmoved = [name for name, w in before.items() if w.dim() == 2 and not (after[name] - w).abs().max() > 1e-6]
    assert not unmoved, f"not trained: {unmoved}"


# --------------------------------------------------------------------------- every shipped recipe


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"text_classification", "causal_lm", "text_classification_fp8", "causal_lm_fp8"} <= names, names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(recipe):
    parsed = load_recipe(recipe)
    assert parsed.model.task in ("text-classification", "causal-lm")
    assert parsed.model.model_name_or_path.startswith("embedded:"), "shipped recipes must run offline"
    assert parsed.training.fp8 == recipe.stem.endswith("_fp8")
    assert parsed.training.report_to in ([], ["none"]), parsed.training.report_to
    # flat, as `read_recipe_file` requires: every line that is not a comment is one top-level `key: value`
    lines = [line for line in recipe.read_text().splitlines() if line.strip() and not line.startswith("#")]
    nested = [line for line in lines if not re.match(r"[a-z0-9_]+: \S", line)]
    assert lines and not nested, nested


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.stem.startswith("causal_lm")], ids=lambda p: p.stem)
def test_causal_lm_recipe_evaluates_every_novel(recipe):
    """The embedded Austen test split lists each novel's last paragraphs in turn: the recipe's evaluation rows
    (the first `max_eval_samples`) must reach all six novels, not the first two or three."""
    from hf_unitscale.tasks import _load_raw

    parsed = load_recipe(recipe)
    _, evaluation = _load_raw(parsed.data, parsed.model.task, parsed.training.seed)
    assert len(set(evaluation["book"])) == 6, sorted(set(evaluation["book"]))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_on_tiny_stand_in(recipe, tmp_path, capsys):
    task = load_recipe(recipe).model.task
    assert main(["train", recipe.stem, *stand_in_overrides(tmp_path, task)]) == 0  # by name, as the README runs it
    out = capsys.readouterr().out
    assert "before training" in out and "after training" in out
    results = json.loads((tmp_path / "out" / "recipe_results.json").read_text())
    assert results["train"]["train_loss"] > 0
    assert_trained(tmp_path / "model", tmp_path / "out", task)
    assert results["before"] is not None and results["after"]
    if task == "text-classification":
        assert 0.0 <= results["after"]["eval_accuracy"] <= 1.0 and "eval_f1" in results["after"]
    else:
        assert results["after"]["eval_perplexity"] > 1.0
    assert (tmp_path / "out" / "scales.png").stat().st_size > 1000
    block = json.loads((tmp_path / "out" / "config.json").read_text())["unit_scaling"]
    if recipe.stem.endswith("_fp8"):  # trained with FP8 GEMMs on calibrated static scales
        assert (block["forward_format"], block["backward_format"]) == ("e4m3", "e5m2"), block
        assert block["calibration"]["num_batches"] >= 1, block
        recipe_values = yaml.safe_load(recipe.read_text())
        for key in ("headroom", "grad_underflow_budget"):  # the recipe's calibration options reached `calibrate`
            assert block["calibration"][key] == recipe_values.get(f"calibration_{key}"), (key, block)
    else:
        assert block["forward_format"] is None and block["backward_format"] is None, block


def test_train_and_eval_files_are_each_read_by_their_own_format(tmp_path):
    """A .csv training file beside a gzipped .jsonl evaluation file (each parsed with its own suffix's reader)."""
    overrides = stand_in_overrides(tmp_path, "text-classification", max_steps=1)
    train_file = Path(overrides[overrides.index("--train_file") + 1])
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    csv_file = train_file.with_suffix(".csv")
    csv_file.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    overrides[overrides.index("--train_file") + 1] = str(csv_file)
    eval_file = Path(overrides[overrides.index("--eval_file") + 1])
    gzipped = eval_file.with_name(eval_file.name + ".gz")
    gzipped.write_bytes(gzip.compress(eval_file.read_bytes()))
    overrides[overrides.index("--eval_file") + 1] = str(gzipped)
    recipe = next(r for r in RECIPES if r.stem == "text_classification")
    assert main(["train", str(recipe), *overrides, "--scale_plot", "null", "--baseline_eval", "false"]) == 0
    results = json.loads((tmp_path / "out" / "recipe_results.json").read_text())
    assert results["train"]["train_loss"] > 0 and 0 <= results["after"]["eval_accuracy"] <= 1


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.stem.endswith("_fp8")], ids=lambda p: p.stem)
def test_fp8_recipe_baseline_evaluates_the_untrained_model_in_full_precision(recipe, tmp_path, capsys):
    """Before training the FP8 scales are a = c = 1 (calibration runs when training starts): the baseline is the
    pretrained model's own function, the same numbers as the recipe run without FP8."""
    overrides = [*stand_in_overrides(tmp_path, load_recipe(recipe).model.task, max_steps=1), "--scale_plot", "null"]
    assert main(["train", str(recipe), *overrides]) == 0
    assert "(baseline) in full precision" in capsys.readouterr().out
    with_fp8 = json.loads((tmp_path / "out" / "recipe_results.json").read_text())["before"]
    overrides[overrides.index("--output_dir") + 1] = str(tmp_path / "without")
    assert main(["train", str(recipe), *overrides, "--fp8", "false"]) == 0
    without = json.loads((tmp_path / "without" / "recipe_results.json").read_text())["before"]
    assert with_fp8["eval_loss"] == without["eval_loss"]


# --------------------------------------------------------------------------- parsing and bad recipes


def _write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


GOOD = {"model_name_or_path": "some/model", "output_dir": "out", "max_steps": 3, "report_to": "none"}


def test_values_are_typed_and_yaml_exponents_are_floats(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model_name_or_path: m\noutput_dir: o\nlearning_rate: 5e-5\nfp8: true\nmetrics: [accuracy]\n"
        "report_to: [tensorboard]\n"
    )
    recipe = load_recipe(path)
    assert isinstance(recipe.model, ModelArguments) and isinstance(recipe.data, DataArguments)
    assert recipe.training.learning_rate == 5e-5  # YAML 1.1 reads 5e-5 as a string
    assert recipe.training.fp8 is True and recipe.data.metrics == ["accuracy"]
    assert recipe.training.report_to == ["tensorboard"]  # a field typed `str | list[str]` takes a list


def test_overrides_replace_recipe_values(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD), {"max_steps": "7", "learning_rate": "1e-3"})
    assert recipe.training.max_steps == 7 and recipe.training.learning_rate == 1e-3


@pytest.mark.parametrize(
    "change, key",
    [
        ({"learnig_rate": 1e-4}, "learnig_rate"),  # unknown key (typo)
        ({"lr_rules": "umup"}, "lr_rules"),
        ({"model_name_or_path": None}, "model_name_or_path"),  # missing model
        ({"max_steps": "five"}, "max_steps"),  # wrong types
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"fp8": "sometimes"}, "fp8"),
        ({"per_device_train_batch_size": 2.5}, "per_device_train_batch_size"),
        ({"lr_rule": "adam"}, "lr_rule"),
        ({"max_seq_length": [64]}, "max_seq_length"),
        ({"eval_strategy": False}, "eval_strategy"),  # YAML's unquoted `no`
    ],
)
def test_bad_recipe_error_names_the_key(tmp_path, change, key, capsys):
    values = {**GOOD, **change}
    if values["model_name_or_path"] is None:
        del values["model_name_or_path"]
    path = _write(tmp_path, values)
    with pytest.raises(RecipeError, match=f"`{key}`"):
        load_recipe(path)
    # the command reports it in one line, with exit status 2
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"`{key}`" in err and "Traceback" not in err


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(RecipeError, match="Did you mean `learning_rate`"):
        load_recipe(_write(tmp_path, {**GOOD, "learnig_rate": 1e-4}))


def test_sectioned_recipe_is_refused_with_the_section_name(tmp_path):
    with pytest.raises(RecipeError, match="`training`"):
        load_recipe(_write(tmp_path, {**GOOD, "training": {"max_steps": 3}}))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_packaged_recipe_by_name(tmp_path, monkeypatch):
    packaged = str(RECIPES_DIR / "text_classification.yaml")
    assert load_recipe("text_classification").source == packaged
    assert load_recipe("text_classification.yaml").source == packaged
    assert load_recipe("text_classification.yml").source == packaged
    monkeypatch.chdir(tmp_path)  # a file of that name in the working folder is the user's own recipe
    (tmp_path / "text_classification.yaml").write_text((RECIPES_DIR / "text_classification.yaml").read_text())
    assert load_recipe("text_classification.yaml").source == "text_classification.yaml"


@pytest.mark.parametrize("name", ["no_such_recipe", "recipes/text_classification.yaml"])
def test_unknown_recipe_name_lists_the_packaged_recipes(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # `recipes/…` was a file of the checkout before the recipes moved into the package
    assert main(["train", name]) == 2
    err = capsys.readouterr().err
    assert f"{name!r} does not exist" in err
    assert all(recipe.stem in err for recipe in RECIPES), err
    assert ("recipes moved into the package" in err) == name.startswith("recipes/"), err


def test_package_data_ships_every_recipe():
    """The wheel holds the recipes: every file of `hf_unitscale/recipes` matches pyproject's package data."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the backport, in the dev extra
        import tomli as tomllib
    pyproject = tomllib.loads((RECIPES_DIR.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["hf_unitscale"]
    shipped = {path for pattern in patterns for path in RECIPES_DIR.parent.glob(pattern)}  # as setuptools globs
    files = {path for path in RECIPES_DIR.rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert len(files) >= len(RECIPES) + 2, files  # the recipes and the two Accelerate configs
    assert files <= shipped, sorted(files - shipped)


# --------------------------------------------------------------------------- shipped metrics


@pytest.mark.parametrize("average", ["binary", "macro", "micro", "weighted"])
def test_shipped_metrics_load_offline_and_match_sklearn(average):
    import os

    from sklearn.metrics import accuracy_score, f1_score

    from hf_unitscale.metrics import load_metric

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    rng = random.Random(average)
    classes = 2 if average == "binary" else 3
    references = [rng.randrange(classes) for _ in range(50)]
    predictions = [r if rng.random() < 0.7 else rng.randrange(classes) for r in references]
    f1 = load_metric("f1").compute(predictions=predictions, references=references, average=average)["f1"]
    assert f1 == pytest.approx(f1_score(references, predictions, average=average))
    accuracy = load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
    assert accuracy == pytest.approx(accuracy_score(references, predictions))


def test_f1_given_by_name_or_path_averages_over_classes_alike():
    from types import SimpleNamespace

    from sklearn.metrics import f1_score

    from hf_unitscale.metrics import metric_path
    from hf_unitscale.tasks import _classification_metrics

    references = [0, 1, 2, 2, 1, 0, 2]
    logits = numpy.eye(3)[[0, 2, 2, 1, 1, 0, 2]]
    for name in ("f1", str(metric_path("f1"))):
        scores = _classification_metrics([name], 3)(SimpleNamespace(predictions=logits, label_ids=references))
        assert scores["f1"] == pytest.approx(f1_score(references, logits.argmax(-1), average="macro")), name


def test_unknown_shipped_metric_name_is_passed_to_evaluate():
    from hf_unitscale.metrics import metric_path

    with pytest.raises(ValueError, match="shipped metrics"):
        metric_path("bleu")


def test_dict_typed_training_arguments_take_a_mapping(tmp_path):
    from hf_unitscale.recipe import mapping_keys

    dict_keys = {"lr_scheduler_kwargs", "lr_multipliers", "role_overrides", "fsdp_config", "accelerator_config"}
    assert dict_keys | {"deepspeed"} <= mapping_keys()
    assert "gradient_checkpointing_kwargs" in mapping_keys() and "max_steps" not in mapping_keys()
    values = {
        **GOOD,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "accelerator_config": {"split_batches": True},
    }
    recipe = load_recipe(_write(tmp_path, values))
    assert recipe.training.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert recipe.training.accelerator_config.split_batches is True


def test_scale_plot_batches_must_be_positive(tmp_path, capsys):
    path = _write(tmp_path, {**GOOD, "scale_plot_batches": 0})
    with pytest.raises(RecipeError, match="`scale_plot_batches` should be at least 1"):
        load_recipe(path)
    assert main(["train", str(path)]) == 2


@pytest.mark.parametrize("key", ["max_train_samples", "max_eval_samples"])
@pytest.mark.parametrize("count", [0, -5])
def test_sample_counts_must_be_positive_or_null(key, count, tmp_path):
    """0 would train on an empty set (a misleading Trainer error) or silently skip evaluation."""
    path = _write(tmp_path, {**GOOD, key: count})
    with pytest.raises(RecipeError, match=f"`{key}` should be at least 1, or null for every row, got {count}"):
        load_recipe(path)
    assert main(["train", str(path)]) == 2
    assert getattr(load_recipe(path, {key: None}).data, key) is None


def test_unknown_metric_names_the_shipped_ones(tmp_path, capsys):
    path = _write(tmp_path, {**GOOD, "metrics": ["accuracy", "acuracy"]})
    with pytest.raises(RecipeError, match=r"`metrics`.*\['accuracy', 'f1'\].*'acuracy'.*Did you mean `accuracy`"):
        load_recipe(path)
    assert main(["train", str(path), "--metrics", "f1", "acuracy"]) == 2
    err = capsys.readouterr().err
    assert "'acuracy'" in err and "Traceback" not in err
    assert load_recipe(path, {"metrics": ["f1"]}).data.metrics == ["f1"]


# --------------------------------------------------------------------------- data and labels, as run_glue/run_clm


def _rows_file(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return str(path)


def test_eval_split_null_means_no_evaluation(tmp_path):
    """`eval_split: null` drops the evaluation set of a `dataset_name` (a local dataset folder here) and of the
    embedded data."""
    from hf_unitscale.tasks import _load_raw

    folder = tmp_path / "dataset"
    folder.mkdir()
    for split in ("train", "test"):
        _rows_file(folder / f"{split}.jsonl", [{"text": f"{split} {i}", "label": i % 2} for i in range(4)])
    _, evaluation = _load_raw(DataArguments(dataset_name=str(folder)), "text-classification", seed=0)
    assert evaluation["text"][0].startswith("test")
    for data in (DataArguments(dataset_name=str(folder), eval_split=None), DataArguments(eval_split=None)):
        train, evaluation = _load_raw(data, "text-classification", seed=0)
        assert evaluation is None and len(train) > 0


def _classifier_with_labels(folder: Path, id2label: dict[int, str]) -> Path:
    """The tiny BERT as a fine-tuned classifier whose head's rows mean `id2label`."""
    model = CASES_BY_ID["bert"].model()
    model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
    model.config.num_labels = len(id2label)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_classification_data_follows_the_checkpoint_and_names_what_is_wrong(tmp_path):
    from hf_unitscale.tasks import setup_task

    source = _classifier_with_labels(tmp_path / "clf", {0: "positive", 1: "negative"})
    rows = [{"text": f"w{i} w{i + 1}", "label": "positive" if i < 2 else "negative"} for i in range(8)]
    data = DataArguments(train_file=_rows_file(tmp_path / "train.jsonl", rows), max_seq_length=16)
    setup = setup_task(ModelArguments(model_name_or_path=str(source)), data)
    # the head's row 0 is "positive": the data's labels follow it, not their sorted order
    assert setup.model.config.id2label == {0: "positive", 1: "negative"}
    assert sorted(setup.train_dataset["labels"]) == [0, 0] + [1] * 6  # 2 "positive" rows, 6 "negative"
    # a classification loss is a batch mean: no scaling by `num_items_in_batch` or the number of processes
    assert setup.model.accepts_loss_kwargs is False
    three = _rows_file(tmp_path / "three.jsonl", rows + [{"text": "w1", "label": "neutral"}])
    with pytest.raises(ValueError, match="has 2 labels, but the data's `label_column` 'label' has 3: .*mismatched"):
        setup_task(ModelArguments(model_name_or_path=str(source)), DataArguments(train_file=three))
    # integer labels 0, 1 and `num_labels` 5: the 5 is the argument's, not the data's
    numbered = _rows_file(tmp_path / "numbered.jsonl", [{**row, "label": i % 2} for i, row in enumerate(rows)])
    with pytest.raises(
        ValueError, match=r"has 2 labels, but `num_labels` is 5 \(the data's `label_column` 'label' has 2\)"
    ):
        setup_task(ModelArguments(model_name_or_path=str(source), num_labels=5), DataArguments(train_file=numbered))
    setup = setup_task(
        ModelArguments(model_name_or_path=str(source), ignore_mismatched_sizes=True), DataArguments(train_file=three)
    )
    assert setup.model.config.num_labels == 3
    with pytest.raises(ValueError, match="`num_labels` is 3, but `label_column` 'label' has 2 labels"):
        setup_task(ModelArguments(model_name_or_path=str(source), num_labels=3), data)
    missing = _rows_file(tmp_path / "missing.jsonl", rows[:3] + [{"text": "w1", "label": None}])
    with pytest.raises(ValueError, match="Row 3 of the training data has no value in column 'label'"):
        setup_task(ModelArguments(model_name_or_path=str(source)), DataArguments(train_file=missing))


def test_a_tokenizer_must_fit_the_models_vocabulary(tmp_path, caplog):
    """More tokens than embedding rows: an error before any data is read (not an IndexError in the first step);
    another model's tokenizer with fewer tokens: a warning (its ids mean other tokens); the model's own: silence."""
    from hf_unitscale.tasks import setup_task

    source = save_tiny_model("bert", tmp_path / "bert")
    train_file, _ = write_tiny_data(tmp_path / "data", "text-classification", n_train=8)
    data = DataArguments(train_file=str(train_file), eval_split=None, max_seq_length=16)
    larger, smaller = tmp_path / "larger", tmp_path / "smaller"
    tiny_tokenizer(VOCAB + 4).save_pretrained(larger)
    tiny_tokenizer(VOCAB - 10).save_pretrained(smaller)
    expected = f"`tokenizer_name` '{larger}' has 105 tokens and the model's embedding 101 rows (`vocab_size`): token "
    with pytest.raises(ValueError, match=re.escape(expected + "ids from 101 on have no row. Drop `tokenizer_name`")):
        setup_task(ModelArguments(model_name_or_path=str(source), tokenizer_name=str(larger)), data)
    for tokenizer_name, warned in ((str(smaller), True), (str(source), False), (None, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
            setup_task(ModelArguments(model_name_or_path=str(source), tokenizer_name=tokenizer_name), data)
        warning = "has 91 tokens and the model's embedding 101 rows"
        assert (warning in caplog.text) == warned, (tokenizer_name, caplog.text)
    tiny_tokenizer(VOCAB + 4).save_pretrained(source)  # the model's own tokenizer is the larger one
    with pytest.raises(ValueError, match=r"The tokenizer of .* has 105 tokens.*resize_token_embeddings\(len"):
        setup_task(ModelArguments(model_name_or_path=str(source)), data)


def test_causal_lm_blocks_fit_the_model_and_a_short_eval_text_is_an_error(tmp_path, caplog):
    from hf_unitscale.tasks import setup_task

    source = save_tiny_model("gpt2", tmp_path / "gpt2")  # n_positions = 64
    text = [{"text": " ".join(f"w{i % 50}" for i in range(j, j + 40))} for j in range(20)]
    train = _rows_file(tmp_path / "train.jsonl", text)
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        setup = setup_task(
            ModelArguments(model_name_or_path=str(source)), DataArguments(train_file=train, max_seq_length=128)
        )
    assert "`max_seq_length` 128 is more than the model takes (64 positions)" in caplog.text
    assert {len(ids) for ids in setup.train_dataset["input_ids"]} == {64}
    short = _rows_file(tmp_path / "short.jsonl", [{"text": "w1 w2"}])
    with pytest.raises(ValueError, match="evaluation text is shorter than one block"):
        setup_task(
            ModelArguments(model_name_or_path=str(source)),
            DataArguments(train_file=train, eval_file=short, max_seq_length=32),
        )


def test_task_type_lists_the_tasks_the_recipe_check_takes():
    task_type, none_type = typing.get_args(typing.get_type_hints(ModelArguments)["task"])
    assert typing.get_args(task_type) == TASKS and none_type is type(None)


def test_task_is_inferred_from_the_head_or_the_model_type():
    import transformers

    from hf_unitscale.tasks import infer_task

    cases = [
        (transformers.BertConfig(architectures=["BertModel"]), "text-classification"),  # MiniLM
        (transformers.BertConfig(is_decoder=True), "causal-lm"),
        (transformers.GPT2Config(architectures=["GPT2ForSequenceClassification"]), "text-classification"),
        (transformers.LlamaConfig(architectures=["LlamaForCausalLM"]), "causal-lm"),
        (transformers.Qwen2Config(architectures=["Qwen2Model"]), "causal-lm"),  # a bare decoder-only model
        (transformers.Phi3Config(), "causal-lm"),
        (transformers.GPTNeoXConfig(), "causal-lm"),
        (transformers.MarianConfig(), "text-classification"),  # encoder-decoder: no causal-LM recipe for it
    ]
    for config, task in cases:
        assert infer_task(config) == task, (type(config).__name__, config.architectures)
    t5 = transformers.T5Config(architectures=["T5ForConditionalGeneration"])  # its generation head would be dropped
    with pytest.raises(ValueError, match=r"seq2seq LM \(T5ForConditionalGeneration\).*`task: text-classification`"):
        infer_task(t5)
