"""`UnitScaleSeq2SeqTrainer`: Seq2SeqTrainer's generation with UnitScaleTrainer's training, on tiny T5 and BART."""

from __future__ import annotations

import copy
import json
import math

import datasets
import numpy
import pytest
import torch
import yaml
from test_trainer import (
    _args,
    _assert_bit_identical_run,
    _assert_same_trajectory,
    _one_thread,  # noqa: F401 (autouse: tiny models on one thread)
    _train_logs,
)
from transformers import GenerationConfig, HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments
from transformers.trainer_utils import EvalPrediction

import hf_unitscale
from hf_unitscale import (
    UnitScaleConfig,
    UnitScaleSeq2SeqTrainer,
    UnitScaleSeq2SeqTrainingArguments,
    UnitScaleTrainingArguments,
    is_unit_scaled,
    unit_scale,
)
from hf_unitscale.convert import matmul_layers

from tiny_models import SEQ2SEQ_CASES, VOCAB

CASE_IDS = list(SEQ2SEQ_CASES)
FIRST_DATA_TOKEN = 3  # ids below are the tiny models' special tokens


def _seq2seq_dataset(rows: int = 48, source_len: int = 10, target_len: int = 6) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(FIRST_DATA_TOKEN, VOCAB, (rows, source_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, -3:] = 0  # some padding
    labels = torch.randint(FIRST_DATA_TOKEN, VOCAB, (rows, target_len), generator=generator)
    labels[::4, -2:] = -100  # shorter targets
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def _token_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Generated tokens (after the decoder start token) equal to the label tokens, over the label tokens."""
    generated, labels = prediction.predictions[:, 1:], prediction.label_ids
    width = min(generated.shape[1], labels.shape[1])
    generated, labels = generated[:, :width], labels[:, :width]
    targets = labels >= FIRST_DATA_TOKEN  # not -100, not the pad Seq2SeqTrainer fills labels up with
    return {"token_accuracy": float((generated == labels)[targets].mean())}


@pytest.mark.parametrize("power_of_two", [False, True], ids=["rms", "power-of-two"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_equivalent_rule_trains_and_generates_as_plain_seq2seq_trainer(case_id, power_of_two, tmp_path):
    """Losses and plain-space gradient norms step for step: within 1e-6 relative with s = rms(W) (2e-7 measured),
    bit for bit, weights included, with power-of-two s. Then `predict` and `evaluate` generate with
    `generation_max_length` and `generation_num_beams` the tokens, loss and metrics plain Seq2SeqTrainer gets."""
    case = SEQ2SEQ_CASES[case_id]
    data, held_out = _seq2seq_dataset(), _seq2seq_dataset(rows=8)
    generation = dict(predict_with_generate=True, generation_max_length=8, generation_num_beams=2)
    plain_args = _args(tmp_path / "plain", cls=Seq2SeqTrainingArguments, **generation)
    plain = Seq2SeqTrainer(model=case.model(), args=plain_args, train_dataset=data, compute_metrics=_token_accuracy)
    plain.train()
    converted = unit_scale(case.model(), UnitScaleConfig(power_of_two_scales=power_of_two))
    our_args = _args(tmp_path / "ours", cls=UnitScaleSeq2SeqTrainingArguments, lr_rule="equivalent", **generation)
    ours = UnitScaleSeq2SeqTrainer(model=converted, args=our_args, train_dataset=data, compute_metrics=_token_accuracy)
    ours.train()
    if power_of_two:
        _assert_bit_identical_run(plain, ours, max_grad_norm=0.5)
    else:
        _assert_same_trajectory(plain, ours, max_grad_norm=0.5, rtol=1e-6)

    expected, got = plain.predict(held_out), ours.predict(held_out)
    numpy.testing.assert_array_equal(got.predictions, expected.predictions)
    numpy.testing.assert_array_equal(got.label_ids, expected.label_ids)
    assert got.metrics["test_loss"] == pytest.approx(expected.metrics["test_loss"], rel=1e-6)
    assert got.metrics["test_token_accuracy"] == expected.metrics["test_token_accuracy"]
    # token ids (not logits) from generate with the arguments' settings, padded to the model's max_length
    assert got.predictions.ndim == 2 and len({tuple(row) for row in got.predictions.tolist()}) > 1
    batch = {key: torch.tensor(held_out[key]) for key in ("input_ids", "attention_mask")}
    beams = ours.model.eval().generate(**batch, max_length=8, num_beams=2).numpy()
    greedy = ours.model.generate(**batch, max_length=8, num_beams=1).numpy()
    assert beams.shape[1] <= 8 and not numpy.array_equal(beams, greedy), "premise: the beams change the tokens"
    numpy.testing.assert_array_equal(got.predictions[:, : beams.shape[1]], beams)
    assert (got.predictions[:, beams.shape[1] :] == ours.model.config.pad_token_id).all()

    expected, got = plain.evaluate(held_out), ours.evaluate(held_out)
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert got["eval_token_accuracy"] == expected["eval_token_accuracy"]


@pytest.mark.parametrize("save_format", ["merged", "unit-scaled"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_saved_checkpoints_reload_with_the_generation_config(case_id, save_format, tmp_path):
    """`args.generation_config` becomes the model's; checkpoints (unit-scaled) and `save_model` (`save_format`) write
    it, and `hf_unitscale.from_pretrained` generates with it what the trained model generates."""
    case = SEQ2SEQ_CASES[case_id]
    model = case.model()
    generation = copy.deepcopy(model.generation_config)
    generation.update(num_beams=3, max_length=9)
    args = _args(
        tmp_path,
        cls=UnitScaleSeq2SeqTrainingArguments,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        save_format=save_format,
        generation_config=generation,
    )
    trainer = UnitScaleSeq2SeqTrainer(model=model, args=args, train_dataset=_seq2seq_dataset(rows=8))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    batch = case.batch()
    expected = trainer.model.eval().generate(**batch)
    for folder in (tmp_path / "checkpoint-2", tmp_path / "final"):
        reloaded = hf_unitscale.from_pretrained(folder)
        assert is_unit_scaled(reloaded)
        assert (reloaded.generation_config.num_beams, reloaded.generation_config.max_length) == (3, 9), folder
        torch.testing.assert_close(reloaded.generate(**batch), expected, rtol=0, atol=0, msg=str(folder))
    format_saved = json.loads((tmp_path / "final" / "config.json").read_text())["unit_scaling"]["checkpoint_format"]
    assert format_saved == save_format
    trainer.create_model_card()  # Trainer's card with the unit-scaling section
    card = (tmp_path / "README.md").read_text()
    assert "Training hyperparameters" in card and f"**Checkpoint format:** `{save_format}`" in card, card


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_fp8_calibrates_trains_and_generates(case_id, tmp_path):
    case = SEQ2SEQ_CASES[case_id]
    args = _args(
        tmp_path,
        cls=UnitScaleSeq2SeqTrainingArguments,
        max_steps=3,
        fp8=True,
        calibration_batches=2,
        predict_with_generate=True,
        generation_max_length=6,
    )
    trainer = UnitScaleSeq2SeqTrainer(model=case.model(), args=args, train_dataset=_seq2seq_dataset())
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 3 and all(math.isfinite(log["loss"]) for log in logs)
    cast = [layer for layer in matmul_layers(trainer.model).values() if layer.precision is not None]
    assert cast, "no layer runs FP8 GEMMs"
    assert any(float(layer.grad_scale) != 1.0 for layer in cast), "no layer was calibrated"
    prediction = trainer.predict(_seq2seq_dataset(rows=4))
    assert prediction.predictions.ndim == 2 and math.isfinite(prediction.metrics["test_loss"])


def test_seq2seq_arguments_hold_both_sets_of_options(tmp_path):
    values = {
        "output_dir": str(tmp_path),
        "lr_rule": "umup",
        "lr_multipliers": {"lm_head": 2.0},
        "fp8": True,
        "calibration_batches": 2,
        "predict_with_generate": True,
        "generation_max_length": 12,
        "generation_num_beams": 4,
        "use_cpu": True,
        "report_to": [],
    }
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(values))
    parser = HfArgumentParser(UnitScaleSeq2SeqTrainingArguments)
    (from_yaml,) = parser.parse_yaml_file(str(tmp_path / "args.yaml"))
    assert isinstance(from_yaml, Seq2SeqTrainingArguments) and isinstance(from_yaml, UnitScaleTrainingArguments)
    for key, value in values.items():
        assert getattr(from_yaml, key) == value, key
    (from_cli,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--lr_rule", "mup", "--mup_base_width", "16", "--predict_with_generate"]
    )
    assert (from_cli.lr_rule, from_cli.mup_base_width, from_cli.predict_with_generate) == ("mup", 16, True)

    args = UnitScaleSeq2SeqTrainingArguments(
        output_dir=str(tmp_path), generation_config=GenerationConfig(num_beams=4), fp8=True, use_cpu=True
    )
    saved = json.loads(args.to_json_string())
    assert saved["generation_config"]["num_beams"] == 4 and saved["fp8"] is True
    with pytest.raises(ValueError, match="`lr_rule` must be one of"):
        UnitScaleSeq2SeqTrainingArguments(output_dir=str(tmp_path), lr_rule="sgd", use_cpu=True)


def test_takes_trainers_optimizer_arguments_and_refuses_arguments_without_generation(tmp_path):
    """`optimizer_cls_and_kwargs` (which transformers' Seq2SeqTrainer does not take) reaches the per-group AdamW and,
    as in UnitScaleTrainer, replaces a non-AdamW `optim`, which alone is refused; `args` without
    Seq2SeqTrainingArguments' generation settings are refused by name."""
    case = SEQ2SEQ_CASES["t5"]
    args = _args(tmp_path, cls=UnitScaleSeq2SeqTrainingArguments, optim="adafactor")
    trainer = UnitScaleSeq2SeqTrainer(
        model=case.model(), args=args, optimizer_cls_and_kwargs=(torch.optim.AdamW, {"betas": (0.8, 0.95)})
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.AdamW
    assert all(group["betas"] == (0.8, 0.95) and "base_lr" in group for group in optimizer.param_groups)
    with pytest.raises(ValueError, match="`optim='adafactor'` is not supported"):
        UnitScaleSeq2SeqTrainer(model=case.model(), args=args)
    with pytest.raises(TypeError, match="needs `args` of a `Seq2SeqTrainingArguments` class"):
        UnitScaleSeq2SeqTrainer(model=case.model(), args=_args(tmp_path, cls=UnitScaleTrainingArguments))


def test_a_non_adamw_optimizer_class_is_refused_before_conversion(tmp_path):
    """UnitScaleSeq2SeqTrainer hands `optimizer_cls_and_kwargs` to UnitScaleTrainer through `self` (Seq2SeqTrainer
    does not take it): a class other than AdamW is refused there, before the caller's model is converted."""
    model = SEQ2SEQ_CASES["t5"].model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    args = _args(tmp_path, cls=UnitScaleSeq2SeqTrainingArguments)
    with pytest.raises(ValueError, match=r"`optimizer_cls_and_kwargs` gives <class 'torch\.optim\.sgd\.SGD'>"):
        UnitScaleSeq2SeqTrainer(model=model, args=args, optimizer_cls_and_kwargs=(torch.optim.SGD, {}))
    assert not is_unit_scaled(model) and not hasattr(model.config, "unit_scaling")
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
