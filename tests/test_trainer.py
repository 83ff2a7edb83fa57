"""`UnitScaleTrainer`: the plain-AdamW trajectory step for step, exact resume, logged lrs, arguments."""

from __future__ import annotations

import json
import logging
import os
import typing
from types import SimpleNamespace

import datasets
import numpy
import pytest
import torch
import yaml
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

import hf_unitscale
from hf_unitscale import (
    UnitScaleConfig,
    build_param_groups,
    is_unit_scaled,
    merge_unit_scale,
    set_precision,
    unit_scale,
)
from hf_unitscale.arguments import SAVE_FORMATS, UnitScaleTrainingArguments
from hf_unitscale.checkpoint import CHECKPOINT_FORMATS, UNIT_SCALED_WEIGHTS_NAME
from hf_unitscale.lr_rules import LR_RULES
from hf_unitscale.trainer import UnitScaleTrainer, _check_arguments

from tiny_models import CASES_BY_ID, VOCAB

RTOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest, and reproducibly, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dataset(case_id: str, rows: int = 48, seq_len: int = 12) -> datasets.Dataset:
    ids = torch.randint(3, VOCAB, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::3, -4:] = 0  # some padding
    labels = ids.masked_fill(mask == 0, -100) if case_id in ("gpt2", "llama-untied") else ids[:, 1] % 2
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def _args(output_dir, cls=TrainingArguments, **overrides):
    values = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        log_level="error",
        max_steps=30,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        weight_decay=0.01,
        warmup_steps=5,
        lr_scheduler_type="linear",
        max_grad_norm=0.5,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    values.update(overrides)
    return cls(**values)


def _train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def _assert_same_trajectory(plain, ours, max_grad_norm, rtol=RTOL):
    plain_logs, our_logs = _train_logs(plain), _train_logs(ours)
    assert len(plain_logs) == len(our_logs) > 0
    clipped = sum(log["grad_norm"] > max_grad_norm for log in plain_logs)
    assert clipped >= len(plain_logs) // 2, f"clipping triggered on only {clipped}/{len(plain_logs)} steps"
    for step, (a, b) in enumerate(zip(plain_logs, our_logs, strict=True)):
        assert abs(a["loss"] - b["loss"]) <= rtol * abs(a["loss"]), (
            f"step {step}: loss {b['loss']} vs plain {a['loss']}"
        )
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=rtol), f"step {step}: plain-space grad norm"
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-9, abs=1e-15)


def _assert_bit_identical_run(plain, ours, max_grad_norm):
    plain_logs, our_logs = _train_logs(plain), _train_logs(ours)
    keys = ("loss", "grad_norm", "learning_rate")
    assert [[log[k] for k in keys] for log in our_logs] == [[log[k] for k in keys] for log in plain_logs]
    clipped = sum(log["grad_norm"] > max_grad_norm for log in plain_logs)
    assert clipped >= len(plain_logs) // 2, f"clipping triggered on only {clipped}/{len(plain_logs)} steps"
    merged = merge_unit_scale(ours.model).state_dict()
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(merged[name], tensor), f"{name} differs after training"


def _max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case_id", ["gpt2", "bert"])
def test_equivalent_rule_reproduces_plain_trainer(case_id, tmp_path):
    case = CASES_BY_ID[case_id]
    data = _dataset(case_id)
    plain = Trainer(model=case.model(), args=_args(tmp_path / "plain"), train_dataset=data)
    plain.train()
    ours = UnitScaleTrainer(model=case.model(), args=_args(tmp_path / "ours"), train_dataset=data)
    ours.train()
    assert is_unit_scaled(ours.model)
    _assert_same_trajectory(plain, ours, max_grad_norm=0.5)
    batch = case.batch()
    with torch.no_grad():
        expected = plain.model.eval()(**batch).logits
        got = ours.model.eval()(**batch).logits
    assert _max_relative(got, expected) <= RTOL, f"outputs after training differ by {_max_relative(got, expected):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case_id", ["gpt2", "bert", "llama-untied"])
def test_power_of_two_scales_reproduce_plain_trainer_bit_for_bit(case_id, dtype, tmp_path):
    """With s = 2^k every product by s, 1/s, s² (forward, backward, Adam's moments, eps·s, lr/s, clipping) is
    exact, so the equivalent rule is plain AdamW to the last bit, not to rounding (RTOL above), and the logged
    `learning_rate` η·f = lr·s is plain's (η·lr/(η/s) was off in the last bits). bf16 weights get power-of-two
    scales by default; their gradient norms are bf16, as in torch's clip_grad_norm_."""
    case = CASES_BY_ID[case_id]
    data = _dataset(case_id)
    plain = Trainer(model=case.model().to(dtype), args=_args(tmp_path / "plain"), train_dataset=data)
    plain.train()
    config = UnitScaleConfig(power_of_two_scales=True if dtype == torch.float32 else None)
    converted = unit_scale(case.model().to(dtype), config)
    ours = UnitScaleTrainer(model=converted, args=_args(tmp_path / "ours"), train_dataset=data)
    ours.train()
    _assert_bit_identical_run(plain, ours, max_grad_norm=0.5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "power_of_two"),
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, None)],
    ids=["fp32-rms", "fp32-power-of-two", "bf16-default"],
)
def test_equivalent_rule_on_real_minilm(tmp_path, minilm_path, dtype, power_of_two):
    """rms(W) scales follow plain AdamW to rounding; power-of-two scales (asked for in fp32, the default for bf16
    weights) follow it bit for bit."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from hf_unitscale.embedded import load_sentiment

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = load_sentiment("train").select(range(80))
    data = texts.map(
        lambda rows: tokenizer(rows["text"], padding="max_length", truncation=True, max_length=32),
        batched=True,
        remove_columns=["text", "score"],
    ).rename_column("label", "labels")

    def model():
        torch.manual_seed(0)  # the new classifier head
        return BertForSequenceClassification.from_pretrained(minilm_path, num_labels=2, dtype=dtype)

    settings = dict(max_steps=10, per_device_train_batch_size=8, learning_rate=1e-4, warmup_steps=2, max_grad_norm=0.2)
    plain = Trainer(model=model(), args=_args(tmp_path / "plain", **settings), train_dataset=data)
    plain.train()
    converted = unit_scale(model(), UnitScaleConfig(power_of_two_scales=power_of_two))
    ours = UnitScaleTrainer(model=converted, args=_args(tmp_path / "ours", **settings), train_dataset=data)
    ours.train()
    if power_of_two is not False:
        _assert_bit_identical_run(plain, ours, max_grad_norm=0.2)
        return
    _assert_same_trajectory(plain, ours, max_grad_norm=0.2)
    batch = {k: torch.tensor(data[:8][k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        expected = plain.model.eval()(**batch).logits
        got = ours.model.eval()(**batch).logits
    assert _max_relative(got, expected) <= RTOL


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8-recalibrated"])
def test_resume_from_checkpoint_continues_the_same_run(tmp_path, fp8):
    """With FP8, the checkpoint's calibrated a, c carry on (no calibration at train begin) and the recalibration
    at step 6, in the second epoch, measures the batches the uninterrupted run drew at train begin."""
    case = CASES_BY_ID["gpt2"]
    data = _dataset("gpt2", rows=32)
    settings = dict(max_steps=8, save_strategy="steps", save_steps=4, lr_rule="umup")
    if fp8:
        settings.update(fp8=True, recalibrate_every=3, calibration_batches=2, per_device_train_batch_size=8)

    def trainer(output_dir):
        args = _args(output_dir, cls=UnitScaleTrainingArguments, **settings)
        return UnitScaleTrainer(model=case.model(), args=args, train_dataset=data)

    uninterrupted = trainer(tmp_path / "run")
    uninterrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert UNIT_SCALED_WEIGHTS_NAME in files and "model.safetensors" not in files, files
    config = json.loads((checkpoint / "config.json").read_text())["unit_scaling"]
    assert config["checkpoint_format"] == "unit-scaled" and config["lr_rule"] == "umup"

    uninterrupted.create_model_card()
    assert "umup" in (tmp_path / "run" / "README.md").read_text()
    if fp8:  # the record of how the checkpoint's a, c were calibrated comes with them (saved configs, cards)
        fresh = trainer(tmp_path / "fresh")
        fresh._load_from_checkpoint(str(checkpoint))
        assert fresh.model.config.unit_scaling["calibration"] == config["calibration"] is not None

    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 8
    expected = uninterrupted.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-7, msg=f"{name} after resume")
    assert _train_logs(resumed)[-1]["loss"] == pytest.approx(_train_logs(uninterrupted)[-1]["loss"], rel=1e-6)


def test_resume_refuses_a_missing_folder_and_another_lr_rule(tmp_path):
    """The optimizer state of a checkpoint holds its rule's groups: another rule is named, not torch's group count."""
    data = _dataset("bert", rows=8)

    def trainer(lr_rule):
        args = _args(
            tmp_path / "run",
            cls=UnitScaleTrainingArguments,
            max_steps=1,
            save_strategy="steps",
            save_steps=1,
            lr_rule=lr_rule,
        )
        return UnitScaleTrainer(model=CASES_BY_ID["bert"].model(), args=args, train_dataset=data)

    trainer("equivalent").train()
    with pytest.raises(ValueError, match="does not exist"):
        trainer("equivalent").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-9"))
    with pytest.raises(
        ValueError, match="trained with `lr_rule='equivalent'`, and the arguments give `lr_rule='umup'`"
    ):
        trainer("umup").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))


@pytest.mark.parametrize(("saved", "resumed"), [(None, True), (True, None)], ids=["rms-to-pow2", "pow2-to-rms"])
def test_resume_refuses_a_checkpoint_converted_with_other_options(tmp_path, saved, resumed):
    """Loading restores the checkpoint's Ŵ and s, but the model's `unit_scaling` block, which the run saves, records
    the trainer's conversion options: they must be the checkpoint's, as the lr rule must."""
    data = _dataset("bert", rows=8)

    def trainer(power_of_two_scales):
        args = _args(tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1)
        config = UnitScaleConfig(power_of_two_scales=power_of_two_scales)
        model = CASES_BY_ID["bert"].model()
        return UnitScaleTrainer(model=model, args=args, train_dataset=data, unit_scale_config=config)

    trainer(saved).train()
    message = (
        rf"converted with `power_of_two_scales={saved}`, and the trainer's model with `power_of_two_scales={resumed}`"
        rf".*UnitScaleConfig\(power_of_two_scales={saved}\)"
    )
    with pytest.raises(ValueError, match=message):
        trainer(resumed).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    trainer(saved).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))  # its own options resume
    # the same conversion spelled otherwise resumes too: None means power-of-two scales for weights narrower than fp32
    trainer({None: False, True: True}[saved]).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))


def test_load_best_model_at_end_reads_the_unit_scaled_checkpoint(tmp_path, monkeypatch):
    import hf_unitscale.trainer as trainer_module

    loaded = []
    original = trainer_module.load_checkpoint_into
    monkeypatch.setattr(trainer_module, "load_checkpoint_into", lambda m, d: (loaded.append(str(d)), original(m, d)))
    case = CASES_BY_ID["bert"]
    data = _dataset("bert", rows=16)
    args = _args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    trainer = UnitScaleTrainer(model=case.model(), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert loaded == [trainer.state.best_model_checkpoint]
    from hf_unitscale.checkpoint import read_safetensors

    best = read_safetensors(os.path.join(trainer.state.best_model_checkpoint, UNIT_SCALED_WEIGHTS_NAME))
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(tensor, best[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("save_format", ["merged", "unit-scaled"])
def test_save_model_writes_args_save_format_and_checkpoints_stay_exact(save_format, tmp_path):
    case = CASES_BY_ID["bert"]
    args = _args(
        tmp_path,
        cls=UnitScaleTrainingArguments,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        save_format=save_format,
    )
    trainer = UnitScaleTrainer(model=case.model(), args=args, train_dataset=_dataset("bert", rows=8))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert UNIT_SCALED_WEIGHTS_NAME in os.listdir(tmp_path / "checkpoint-2")
    final = set(os.listdir(tmp_path / "final"))
    batch = case.batch()
    with torch.no_grad():
        expected = trainer.model.eval()(**batch).logits
    if save_format == "merged":  # a plain transformers checkpoint
        assert "model.safetensors" in final and UNIT_SCALED_WEIGHTS_NAME not in final
        plain = type(trainer.model).from_pretrained(tmp_path / "final").eval()
        assert not is_unit_scaled(plain)
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-6)
    else:
        assert UNIT_SCALED_WEIGHTS_NAME in final and "model.safetensors" not in final


def test_resume_refuses_plain_checkpoint(tmp_path):
    case = CASES_BY_ID["gpt2"]
    plain_model = case.model()
    plain_model.save_pretrained(tmp_path / "plain")
    trainer = UnitScaleTrainer(model=case.model(), args=_args(tmp_path / "out", max_steps=1))
    with pytest.raises(ValueError, match="not a UnitScaleTrainer checkpoint"):
        trainer._load_from_checkpoint(str(tmp_path / "plain"))
    # a merged save of a model converted with other options holds W: the reason is the same, not the options
    hf_unitscale.save_pretrained(unit_scale(case.model(), {"power_of_two_scales": True}), tmp_path / "merged")
    with pytest.raises(ValueError, match="not a UnitScaleTrainer checkpoint"):
        trainer._load_from_checkpoint(str(tmp_path / "merged"))


@pytest.mark.parametrize("rule", ["equivalent", "umup", "mup"])
def test_every_group_lr_is_logged(rule, tmp_path):
    case = CASES_BY_ID["bert"]
    args = _args(tmp_path, cls=UnitScaleTrainingArguments, max_steps=3, warmup_steps=1, lr_rule=rule, mup_base_width=16)
    trainer = UnitScaleTrainer(model=case.model(), args=args, train_dataset=_dataset("bert"))
    trainer.train()
    groups = trainer.optimizer.param_groups
    for log in _train_logs(trainer):
        factor = log["learning_rate"] / args.learning_rate
        if rule == "equivalent":  # per role: the lr on W = s·Ŵ, which is the plain schedule's lr
            roles = {g["role"] for g in groups}
            assert {k for k in log if k.startswith("lr/")} == {f"lr/{r}" for r in roles}
            for role in roles:
                assert log[f"lr/{role}"] == pytest.approx(log["learning_rate"], rel=1e-9, abs=1e-15)
        else:
            assert {k for k in log if k.startswith("lr/")} == {f"lr/{g['name']}" for g in groups}
            for group in groups:
                assert log[f"lr/{group['name']}"] == pytest.approx(group["base_lr"] * factor, rel=1e-9, abs=1e-15)
    assert trainer.model.config.unit_scaling["lr_rule"] == rule


def test_schedules_dividing_by_the_base_lr_stay_per_group(tmp_path):
    """`cosine_with_min_lr` computes min_lr / optimizer.defaults["lr"]: every group must end at its lr × min_lr/η."""
    case = CASES_BY_ID["bert"]
    for scheduler, kwargs, end_factor in (
        ("cosine_with_min_lr", {"min_lr": 1e-4}, 0.1),
        ("polynomial", {"lr_end": 2e-4}, 0.2),
        ("warmup_stable_decay", {"min_lr_ratio": 0.3, "num_decay_steps": 4}, 0.3),
    ):
        args = _args(tmp_path, learning_rate=1e-3, lr_scheduler_type=scheduler, lr_scheduler_kwargs=kwargs)
        trainer = UnitScaleTrainer(model=case.model(), args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
        assert trainer.optimizer.defaults["lr"] == 1e-3
        for _ in range(10):
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        for group in trainer.optimizer.param_groups:
            assert group["lr"] == pytest.approx(group["base_lr"] * end_factor, rel=1e-6), (scheduler, group["name"])
            assert group["lr"] * group["weight_scale"] == pytest.approx(1e-3 * end_factor, rel=1e-6)


@pytest.mark.parametrize("min_lr", [None, 3e-9], ids=["eps", "min_lr"])
def test_reduce_lr_on_plateau_stops_reducing_where_plain_trainer_does(min_lr, tmp_path):
    """torch's ReduceLROnPlateau decides each group on its own lr: it skips a reduction when old - new ≤ eps (1e-8,
    absolute) and bounds the lr by `min_lr`. Groups of converted weights hold η/s, so they kept being reduced after
    plain Trainer's η·f had stopped (13 of the tiny GPT-2's 29 tensors differed), and `min_lr` was refused. Decided
    and bounded on η·f, power-of-two scales give plain Trainer's run bit for bit."""
    case = CASES_BY_ID["gpt2"]
    kwargs = {"factor": 0.1, "patience": 0, "threshold": 0.5}  # every evaluation after the first is a plateau
    if min_lr is not None:
        kwargs["min_lr"] = min_lr
    settings = dict(
        max_steps=8, learning_rate=2e-5, warmup_steps=0, lr_scheduler_type="reduce_lr_on_plateau",
        lr_scheduler_kwargs=kwargs, eval_strategy="steps", eval_steps=1,
    )  # fmt: skip
    data = dict(train_dataset=_dataset("gpt2"), eval_dataset=_dataset("gpt2", rows=8))
    plain = Trainer(model=case.model(), args=_args(tmp_path / "plain", **settings), **data)
    plain.train()
    converted = unit_scale(case.model(), UnitScaleConfig(power_of_two_scales=True))
    ours = UnitScaleTrainer(model=converted, args=_args(tmp_path / "ours", **settings), **data)
    ours.train()
    lrs = [log["learning_rate"] for log in _train_logs(plain)]
    assert lrs[-3] == lrs[-1] == (min_lr or pytest.approx(2e-9)), lrs  # plain's reductions stopped (eps or min_lr)
    _assert_bit_identical_run(plain, ours, max_grad_norm=0.5)


@pytest.mark.parametrize("rule", ["equivalent", "umup"])
def test_reduce_lr_on_plateau_min_lr_bounds_the_schedule_lr_every_group_follows(rule, tmp_path):
    """`min_lr` bounds η·f, as `cosine_with_min_lr`'s does: every group ends at its own lr × min_lr/η."""
    bert, data = CASES_BY_ID["bert"], _dataset("bert", rows=8)
    plateau = dict(cls=UnitScaleTrainingArguments, lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps")
    kwargs = {"factor": 0.5, "patience": 0, "min_lr": 1e-4}
    args = _args(
        tmp_path, **plateau, lr_scheduler_kwargs=kwargs, lr_rule=rule, learning_rate=1e-3,
        lr_multipliers={"classifier": 10.0},
    )  # fmt: skip
    trainer = UnitScaleTrainer(model=bert.model(), args=args, eval_dataset=data)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    for _ in range(8):  # the same metric: 7 plateaus, ×0.5 until η·f = 1e-4
        trainer.lr_scheduler.step(1.0)
    assert trainer._get_learning_rate() == pytest.approx(1e-4, rel=1e-12)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["base_lr"] * 0.1, rel=1e-12), group["name"]
    args = _args(tmp_path, **plateau, lr_scheduler_kwargs={"min_lr": [0.0, 1e-5]})
    trainer = UnitScaleTrainer(model=bert.model(), args=args, eval_dataset=data)
    with pytest.raises(ValueError, match=r"`min_lr` of `reduce_lr_on_plateau` should be one number.*got a list of 2"):
        trainer.create_optimizer_and_scheduler(num_training_steps=10)


def _unit_scale_args(output_dir, **overrides):
    return _args(output_dir, cls=UnitScaleTrainingArguments, **overrides)


@pytest.mark.parametrize(
    ("refused", "message"),
    [
        (
            lambda m, out: {"args": _unit_scale_args(out, lr_multipliers={"clasifier": 10.0})},
            "'clasifier' matches no trainable",
        ),
        (  # a valid regex, refused by `set_precision` on the converted model's matmul layers
            lambda m, out: {"args": _unit_scale_args(out, fp8=True, fp8_full_precision_modules=["clasifier"])},
            "'clasifier' matches no converted matmul layer",
        ),
    ],
    ids=["lr_multipliers", "fp8_full_precision_modules"],
)
def test_a_refused_trainer_leaves_the_callers_model_unconverted(tmp_path, monkeypatch, refused, message):
    """The trainer converts the model, then checks what needs a converted model: a refusal merges it back, so the
    caller's model (for plain `Trainer`, as the error may suggest) is the plain model, W = s·Ŵ. (`optimizers` is
    refused before conversion: `test_refusals`.)"""
    merged_back = []

    def merge_recorded(model):
        merged_back.append(model)
        return merge_unit_scale(model)

    monkeypatch.setattr(hf_unitscale.trainer, "merge_unit_scale", merge_recorded)
    model = CASES_BY_ID["bert"].model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        UnitScaleTrainer(model=model, **refused(model, tmp_path))
    assert len(merged_back) == 1 and merged_back[0] is model  # converted, refused, merged back
    assert not is_unit_scaled(model) and not hasattr(model.config, "unit_scaling")
    assert type(model.classifier) is torch.nn.Linear
    torch.testing.assert_close(model.state_dict(), before, rtol=1e-6, atol=0)
    converted = unit_scale(CASES_BY_ID["bert"].model())  # a model that came converted stays so
    with pytest.raises(ValueError, match=message):
        UnitScaleTrainer(model=converted, **refused(converted, tmp_path))
    assert is_unit_scaled(converted) and len(merged_back) == 1


def test_refusals(tmp_path):
    case = CASES_BY_ID["bert"]
    with pytest.raises(ValueError, match="DeepSpeed config defines its own `optimizer`"):
        _args(tmp_path, cls=UnitScaleTrainingArguments, deepspeed={"optimizer": {"type": "AdamW"}})
    model = case.model()  # refused before conversion: the model and the optimizer's hold on it stay as they were
    parameters = dict(model.named_parameters())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="builds its own optimizer groups"):
        UnitScaleTrainer(model=model, args=_unit_scale_args(tmp_path), optimizers=(optimizer, None))
    assert not is_unit_scaled(model) and not hasattr(model.config, "unit_scaling")
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in parameters.items()]
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    model = case.model()  # refused when the trainer is built, before a baseline evaluation or conversion
    with pytest.raises(ValueError, match="`optim='sgd'` is not supported"):
        UnitScaleTrainer(model=model, args=_args(tmp_path, optim="sgd"))
    assert not is_unit_scaled(model)
    sgd_ignored = dict(args=_args(tmp_path, optim="sgd"), optimizer_cls_and_kwargs=(torch.optim.AdamW, {}))
    UnitScaleTrainer(model=case.model(), **sgd_ignored).create_optimizer()  # as in Trainer, `optim` is not read
    for key in ("params", "model"):
        optimizer = (torch.optim.AdamW, {key: []})
        trainer = UnitScaleTrainer(model=case.model(), args=_args(tmp_path), optimizer_cls_and_kwargs=optimizer)
        with pytest.raises(ValueError, match=f"brings its own `{key}`"):
            trainer.create_optimizer()
    args = _args(tmp_path, lr_scheduler_type="greedy", eval_strategy="steps")
    with pytest.raises(ValueError, match="absolute lr bounds"):
        UnitScaleTrainer(model=case.model(), args=args)
    with pytest.raises(ValueError, match="mup_base_width"):
        _args(tmp_path, cls=UnitScaleTrainingArguments, lr_rule="mup")
    # DeepSpeed clips inside its engine, on g_Ŵ: checked before any DeepSpeed import (not installed here)
    deepspeed_args = SimpleNamespace(
        deepspeed={}, max_grad_norm=1.0, lr_scheduler_type="linear", lr_scheduler_kwargs={}
    )
    with pytest.raises(ValueError, match="Set `max_grad_norm=0` with DeepSpeed"):
        _check_arguments(deepspeed_args)


@pytest.mark.parametrize(
    ("refused", "message"),
    [
        (
            lambda out: {"args": _args(out), "optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 1e-3})},
            r"`optimizer_cls_and_kwargs` gives <class 'torch\.optim\.sgd\.SGD'>.*Use `torch\.optim\.AdamW`",
        ),
        (
            lambda out: {"args": _args(out), "optimizer_cls_and_kwargs": (torch.optim.Adam, {})},
            r"gives <class 'torch\.optim\.adam\.Adam'>",
        ),
        (
            lambda out: {"args": _args(out), "optimizer_cls_and_kwargs": (torch.optim.Adagrad, {})},
            r"gives <class 'torch\.optim\.adagrad\.Adagrad'>",
        ),
        (
            lambda out: {"args": _args(out, use_liger_kernel=True)},
            r"`use_liger_kernel=True` is not supported.*read weight tensors directly.*Set `use_liger_kernel=False`",
        ),
    ],
    ids=["sgd-class", "adam-class", "adagrad-class", "liger"],
)
def test_arguments_refused_before_conversion_leave_the_model_as_it_was(tmp_path, refused, message):
    """An optimizer class other than AdamW, and Liger's kernels (which read `lm_head.weight`, Ŵ once converted, in
    the fused linear cross-entropy that `train()` would patch in), are refused when the trainer is built, before the
    model is converted: the caller's model is not touched."""
    model = CASES_BY_ID["llama-untied"].model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        UnitScaleTrainer(model=model, train_dataset=_dataset("llama-untied", rows=8), **refused(tmp_path))
    assert not is_unit_scaled(model) and not hasattr(model.config, "unit_scaling")
    assert type(model.lm_head) is torch.nn.Linear
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_option_types_list_the_values_the_checks_take(tmp_path):
    """The `Literal` types (the command line's choices) are the tuples `__post_init__` checks against, and every
    `save_format` is a checkpoint format `save_pretrained` writes."""
    hints = typing.get_type_hints(UnitScaleTrainingArguments)
    assert typing.get_args(hints["lr_rule"]) == LR_RULES
    assert typing.get_args(hints["save_format"]) == SAVE_FORMATS
    assert set(SAVE_FORMATS) <= set(CHECKPOINT_FORMATS)
    for option in ("lr_rule", "save_format", "fp8_backend"):
        with pytest.raises(ValueError, match=f"`{option}` must be one of"):
            _args(tmp_path, cls=UnitScaleTrainingArguments, **{option: "nope"})


def test_a_subclass_optimizer_with_plain_groups_is_refused_before_training(tmp_path):
    """A `create_optimizer` override (e.g. a head at 10× lr) builds groups that give Ŵ a plain lr: W would move by
    s·lr. train() refuses them before the first step; groups from `build_param_groups` pass."""

    class HeadAtTenTimes(UnitScaleTrainer):
        def create_optimizer(self, model=None):
            head = [p for n, p in self.model.named_parameters() if n.startswith("classifier")]
            body = [p for n, p in self.model.named_parameters() if not n.startswith("classifier")]
            lr = self.args.learning_rate
            self.optimizer = torch.optim.AdamW([{"params": body}, {"params": head, "lr": 10 * lr}], lr=lr)
            return self.optimizer

    case = CASES_BY_ID["bert"]
    trainer = HeadAtTenTimes(model=case.model(), args=_args(tmp_path, max_steps=2), train_dataset=_dataset("bert"))
    with pytest.raises(ValueError, match=r"Optimizer group 0 holds \d+ unit-scaled weight.*`bert\.embeddings"):
        trainer.train()
    assert trainer.state.global_step == 0

    class HeadAtTenTimesScaled(UnitScaleTrainer):
        def create_optimizer(self, model=None):
            groups = build_param_groups(
                self.model, lr=self.args.learning_rate, eps=1e-8, weight_decay=0.0, lr_multipliers={"^classifier": 10}
            )
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate)
            return self.optimizer

    args = _args(tmp_path, max_steps=2)
    HeadAtTenTimesScaled(model=case.model(), args=args, train_dataset=_dataset("bert")).train()


def test_model_init_and_optimizer_kwargs_reproduce_plain_trainer_on_every_train(tmp_path):
    """`optimizer_cls_and_kwargs` as Trainer reads it (the class's default lr and eps, the groups' weight decay from
    `args.weight_decay`), and `model_init` rebuilding the model on each `train()`: clipping must follow it."""
    case = CASES_BY_ID["gpt2"]
    data = _dataset("gpt2")
    optimizer = (torch.optim.AdamW, {"weight_decay": 0.5, "betas": (0.9, 0.99)})
    plain = Trainer(
        model_init=lambda: case.model(),
        args=_args(tmp_path / "plain"),
        train_dataset=data,
        optimizer_cls_and_kwargs=optimizer,
    )
    ours = UnitScaleTrainer(
        model_init=lambda: case.model(),
        args=_args(tmp_path / "ours"),
        train_dataset=data,
        optimizer_cls_and_kwargs=optimizer,
        unit_scale_config=UnitScaleConfig(power_of_two_scales=True),
    )
    for run in range(2):
        plain.train()
        ours.train()
        _assert_bit_identical_run(plain, ours, max_grad_norm=0.5)
        our_lrs = [log["learning_rate"] for log in _train_logs(ours)]
        assert our_lrs == pytest.approx([log["learning_rate"] for log in _train_logs(plain)], rel=1e-9), f"run {run}"
        assert max(our_lrs) == pytest.approx(1e-3)  # AdamW's default, not args.learning_rate


def test_an_optimizer_with_quantized_moments_is_said_to_follow_plain_adamw_only_approximately(tmp_path, caplog):
    trainer = UnitScaleTrainer(model=CASES_BY_ID["bert"].model(), args=_args(tmp_path, optim="adamw_torch_8bit"))
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        trainer.create_optimizer()
    assert "`optim='adamw_torch_8bit'` quantizes Adam's moments" in caplog.text and "approximately" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        UnitScaleTrainer(model=CASES_BY_ID["bert"].model(), args=_args(tmp_path)).create_optimizer()
    assert "quantizes" not in caplog.text


def test_peft_adapters_are_refused_in_either_order(tmp_path):
    """peft merges ΔW into the stored weight, Ŵ = W/s after conversion: LoRA on a converted model (or a LoRA model
    converted) would merge into W + s·ΔW. Both orders are refused, naming an adapter layer."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    adapted = get_peft_model(CASES_BY_ID["llama-untied"].model(), lora)
    with pytest.raises(ValueError, match=r"has PEFT adapter layers \(`.*q_proj`.*merge_and_unload"):
        unit_scale(adapted)
    assert not is_unit_scaled(adapted)
    with pytest.raises(ValueError, match="PEFT adapter layers"):
        UnitScaleTrainer(model=adapted, args=_args(tmp_path))
    adapted_after = get_peft_model(unit_scale(CASES_BY_ID["llama-untied"].model()), lora)
    with pytest.raises(ValueError, match="PEFT adapter layers"):
        UnitScaleTrainer(model=adapted_after, args=_args(tmp_path))
    merged = adapted.merge_and_unload()  # the way out the message gives
    assert is_unit_scaled(unit_scale(merged))
    folder = tmp_path / "with-adapter"  # an adapter beside the weights: transformers' from_pretrained loads it
    base = CASES_BY_ID["llama-untied"].model()
    base.save_pretrained(folder)
    base.config.name_or_path = str(folder)
    get_peft_model(base, lora).save_pretrained(folder)
    with pytest.raises(ValueError, match="PEFT adapter layers"):
        hf_unitscale.from_pretrained(folder)


def test_fp16_weights_are_refused_with_the_way_out(tmp_path):
    """Adam's moments follow the weights' dtype: Ŵ's second moment s²·v_W underflows fp16 (a reviewer's tiny BERT
    went to nan at step 4 where plain Trainer trained). `fp16_full_eval` leaves a model in fp16 after evaluate()."""
    trainer = UnitScaleTrainer(model=CASES_BY_ID["bert"].model().half(), args=_args(tmp_path))
    with pytest.raises(ValueError, match=r"unit-scaled weights are fp16 .*Train fp32 weights"):
        trainer.create_optimizer()
    UnitScaleTrainer(model=CASES_BY_ID["bert"].model().bfloat16(), args=_args(tmp_path)).create_optimizer()


class KwargsAdamW(torch.optim.AdamW):
    """An AdamW subclass whose signature hides AdamW's defaults behind **kwargs."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)


def test_optimizer_kwargs_of_a_kwargs_subclass_take_the_class_defaults(tmp_path):
    """Trainer gives an `optimizer_cls_and_kwargs` class its own default lr and eps (AdamW's 1e-3, 1e-8), not
    `learning_rate`/`adam_epsilon`: so must the groups, whose lr·s and eps/s are what W sees."""
    args = _args(tmp_path, learning_rate=3e-3, adam_epsilon=1e-3)
    trainer = UnitScaleTrainer(model=CASES_BY_ID["bert"].model(), args=args, optimizer_cls_and_kwargs=(KwargsAdamW, {}))
    trainer.create_optimizer()
    scaled = [g for g in trainer.optimizer.param_groups if "weight_scale" in g]
    assert scaled and isinstance(trainer.optimizer, KwargsAdamW)
    for group in scaled:
        assert group["lr"] * group["weight_scale"] == pytest.approx(1e-3, rel=1e-6), group["name"]
        assert group["eps"] / group["weight_scale"] == pytest.approx(1e-8, rel=1e-6), group["name"]


def test_converts_model_init_and_accepts_converted_models(tmp_path):
    case = CASES_BY_ID["gpt2"]
    trainer = UnitScaleTrainer(
        model_init=lambda: case.model(), args=_args(tmp_path, max_steps=2), train_dataset=_dataset("gpt2")
    )
    trainer.train()
    assert is_unit_scaled(trainer.model) and trainer.model.config.unit_scaling["lr_rule"] == "equivalent"
    converted = unit_scale(case.model())
    scales = {n: b.clone() for n, b in converted.named_buffers() if n.endswith("weight_scale")}
    trainer = UnitScaleTrainer(model=converted, args=_args(tmp_path, max_steps=1))
    assert all(torch.equal(b, scales[n]) for n, b in trainer.model.named_buffers() if n in scales)


def test_a_converted_model_takes_only_the_unit_scale_config_it_was_converted_with(tmp_path):
    """Another `unit_scale_config` cannot apply to a converted model: dropping it would train another model."""
    case, excluded = CASES_BY_ID["bert"], UnitScaleConfig(exclude_modules=["classifier"])
    trainer = UnitScaleTrainer(
        model=unit_scale(case.model(), excluded), args=_args(tmp_path), unit_scale_config=excluded
    )
    assert type(trainer.model.classifier) is torch.nn.Linear
    message = r"other options than `unit_scale_config` \(`exclude_modules`: \[\] in the model, \['classifier'\] in"
    with pytest.raises(ValueError, match=message + r".*merge_unit_scale"):
        UnitScaleTrainer(model=unit_scale(case.model()), args=_args(tmp_path), unit_scale_config=excluded)
    with pytest.raises(ValueError, match=message):
        UnitScaleTrainer(model_init=lambda: unit_scale(case.model()), args=_args(tmp_path), unit_scale_config=excluded)
    merged = merge_unit_scale(unit_scale(case.model()))
    trainer = UnitScaleTrainer(model=merged, args=_args(tmp_path), unit_scale_config=excluded)
    assert type(trainer.model.classifier) is torch.nn.Linear and is_unit_scaled(trainer.model)


def test_arguments_parse_from_yaml_json_and_command_line(tmp_path):
    values = {
        "output_dir": str(tmp_path),
        "learning_rate": 2e-4,
        "lr_rule": "umup",
        "umup_depth_scaling": True,
        "lr_multipliers": {r"^classifier\.": 10.0, r"\.bias$": 0.5},
        "role_overrides": {r"classifier\.bias": "norm"},
        "fp8": True,
        "fp8_format": "E4M3",
        "calibration_batches": 2,
        "recalibrate_every": 100,
        "calibration_headroom": 2.0,
        "calibration_grad_underflow_budget": 1e-4,
        "calibration_input_rounding_search": True,
        "use_cpu": True,
        "report_to": [],
    }
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(values))
    parser = HfArgumentParser(UnitScaleTrainingArguments)
    (from_yaml,) = parser.parse_yaml_file(str(tmp_path / "args.yaml"))
    for key, value in values.items():
        assert getattr(from_yaml, key) == value, key

    # round trip: the parsed arguments, dumped and parsed again
    ours = {k: from_yaml.to_dict()[k] for k in values}
    (tmp_path / "again.json").write_text(json.dumps(ours))
    (from_json,) = parser.parse_json_file(str(tmp_path / "again.json"))
    assert {k: getattr(from_json, k) for k in values} == {k: getattr(from_yaml, k) for k in values}

    (from_cli,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--lr-rule",
            "mup",
            "--mup_base_width",
            "64",
            "--lr_multipliers",
            json.dumps({"classifier": 10}),
            "--role_overrides",
            json.dumps({r"classifier\.bias": "norm"}),
            "--use_cpu",
            "--report_to",
            "none",
        ]
    )
    assert from_cli.lr_rule == "mup" and from_cli.mup_base_width == 64
    assert from_cli.lr_multipliers == {"classifier": 10.0}
    assert from_cli.role_overrides == {r"classifier\.bias": "norm"}
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--lr_rule", "sgd"])
    with pytest.raises(ValueError, match="JSON object"):
        UnitScaleTrainingArguments(output_dir=str(tmp_path), lr_multipliers="classifier=10", use_cpu=True)
    for bad in ({"x": "gain"}, {"(": "norm"}, '{"x": norm}', ["x"]):
        with pytest.raises(ValueError, match="`role_overrides"):
            UnitScaleTrainingArguments(output_dir=str(tmp_path), role_overrides=bad, use_cpu=True)
    with pytest.raises(ValueError, match="calibration_headroom"):
        UnitScaleTrainingArguments(output_dir=str(tmp_path), calibration_headroom=0.5, use_cpu=True)
    with pytest.raises(ValueError, match=r"`fp8=True` with `fp16=True`.*Use `bf16=True`"):
        UnitScaleTrainingArguments(output_dir=str(tmp_path), fp8=True, fp16=True, use_cpu=True)
    with pytest.raises(ValueError, match="calibration_grad_underflow_budget"):
        UnitScaleTrainingArguments(output_dir=str(tmp_path), calibration_grad_underflow_budget=1.5, use_cpu=True)
    with pytest.raises(ValueError, match=r"`fp8_format` must be one of \['E4M3', 'HYBRID'\], got 'E5M2'"):
        UnitScaleTrainingArguments(output_dir=str(tmp_path), fp8_format="e5m2", use_cpu=True)
    assert UnitScaleTrainingArguments(output_dir=str(tmp_path), fp8_format="e4m3", use_cpu=True).fp8_format == "E4M3"


def test_fp8_options_without_fp8_are_named_in_a_warning(tmp_path, caplog):
    """Options only `fp8=True` reads, given with `fp8=False` (a forgotten `fp8=True`), are named; defaults are not."""
    options = dict(calibration_headroom=2.0, recalibrate_every=10, fp8_full_precision_modules=[], fp8_eval=False)
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        UnitScaleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **options)
    assert "`fp8=False` ignores the FP8 option(s) " in caplog.text
    for name, value in options.items():
        assert f"{name}={value!r}" in caplog.text
    assert "calibration_batches" not in caplog.text and "fp8_format" not in caplog.text
    for fp8 in (False, True):  # nothing set, or FP8 on: nothing to say
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
            UnitScaleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, fp8=fp8, **(options if fp8 else {}))
        assert "ignores the FP8 option" not in caplog.text


def test_role_overrides_come_from_the_arguments_or_the_trainer(tmp_path):
    """A recipe or command line reaches `role_overrides` through the arguments; Python code may pass it to the
    trainer instead, never both."""
    case = CASES_BY_ID["bert"]
    overrides = {r"classifier\.bias": "norm"}

    def role_of_classifier_bias(trainer) -> str:
        bias = trainer.model.classifier.bias
        return next(g["role"] for g in trainer.create_optimizer().param_groups if any(p is bias for p in g["params"]))

    args = _args(tmp_path, cls=UnitScaleTrainingArguments, lr_rule="umup", role_overrides=overrides)
    assert role_of_classifier_bias(UnitScaleTrainer(model=case.model(), args=args)) == "norm"
    plain_args = _args(tmp_path, cls=UnitScaleTrainingArguments, lr_rule="umup")
    assert role_of_classifier_bias(UnitScaleTrainer(model=case.model(), args=plain_args)) == "bias"
    trainer = UnitScaleTrainer(model=case.model(), args=plain_args, role_overrides=overrides)
    assert role_of_classifier_bias(trainer) == "norm"
    with pytest.raises(ValueError, match="`role_overrides` is given twice"):
        UnitScaleTrainer(model=case.model(), args=args, role_overrides=overrides)


def test_lr_options_that_do_not_fit_the_model_are_errors_when_the_trainer_is_built(tmp_path):
    """Not when the optimizer is built at the first step, after a recipe's baseline evaluation has run."""
    case = CASES_BY_ID["bert"]
    for options, error in (
        ({"lr_multipliers": {"clasifier": 10.0}}, r"`lr_multipliers` key 'clasifier' matches no trainable parameter"),
        ({"role_overrides": {"pooler": "readout"}}, r"`role_overrides` key 'pooler' matches no trainable parameter"),
        ({"lr_rule": "umup", "umup_depth_scaling": True}, r"`umup_depth_scaling=True` needs the model's repeated"),
    ):
        args = _args(tmp_path, cls=UnitScaleTrainingArguments, **options)
        model = case.model()
        if "umup_depth_scaling" in options:
            model.config.num_hidden_layers = 3  # no ModuleList of 3 blocks
        with pytest.raises(ValueError, match=error):
            UnitScaleTrainer(model=model, args=args)
    args = _args(tmp_path, cls=UnitScaleTrainingArguments, lr_multipliers={"clasifier": 10.0})
    with pytest.raises(ValueError, match="'clasifier' matches no trainable parameter"):
        UnitScaleTrainer(model_init=lambda: case.model(), args=args)
    model = case.model()
    model.bert.encoder.layer[0].layer_scale = torch.nn.Parameter(torch.ones(32))
    with pytest.raises(ValueError, match=r"`bert\.encoder\.layer\.0\.layer_scale`.*no learning-rate role"):
        UnitScaleTrainer(model=model, args=_args(tmp_path, cls=UnitScaleTrainingArguments, lr_rule="umup"))


def test_lr_options_are_named_once_and_checked_on_the_model_the_optimizer_trains(tmp_path, caplog):
    """An option of another rule is named once, when the optimizer is built, also when set after the arguments;
    `create_optimizer` checks the model as it then is: a layer frozen since the trainer was built gets no group,
    and a pattern changed in place since is checked."""
    args = _args(tmp_path, cls=UnitScaleTrainingArguments, lr_rule="umup", lr_multipliers={"classifier": 2.0})
    args.mup_base_width = 16
    trainer = UnitScaleTrainer(model=CASES_BY_ID["bert"].model(), args=args)
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        trainer.create_optimizer()
    assert caplog.text.count("`mup_base_width=16` applies to `lr_rule='mup'` only") == 1
    frozen = trainer.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    trainer.optimizer = None
    groups = trainer.create_optimizer().param_groups
    assert not any(p is frozen for g in groups for p in g["params"])
    trainer.optimizer = None
    trainer.unit_scale_options["lr_multipliers"]["no_such_parameter"] = 2.0
    with pytest.raises(ValueError, match="no_such_parameter"):
        trainer.create_optimizer()


def test_fp8_calibrates_and_trains(tmp_path):
    from hf_unitscale.convert import matmul_layers

    case = CASES_BY_ID["bert"]
    args = _args(
        tmp_path,
        cls=UnitScaleTrainingArguments,
        max_steps=4,
        fp8=True,
        calibration_batches=2,
        recalibrate_every=2,
        calibration_headroom=2.0,
        calibration_grad_underflow_budget=1e-4,
        calibration_input_rounding_search=True,
    )
    seen = []

    class LogRecorder(TrainerCallback):  # what the printer and report_to integrations receive
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = UnitScaleTrainer(model=case.model(), args=args, train_dataset=_dataset("bert"), callbacks=[LogRecorder()])
    trainer.train()
    assert all("fp8/grad_output_underflow_fraction" in logs for logs in seen if "loss" in logs), seen
    record = trainer.model.config.unit_scaling["calibration"]
    # reached `calibrate`
    assert record["headroom"] == 2.0 and record["grad_underflow_budget"] == 1e-4 and record["input_rounding_search"]
    layers = matmul_layers(trainer.model)
    assert layers["classifier"].precision is None  # the readout stays in full precision by default
    cast = [layer.precision for name, layer in layers.items() if name != "classifier"]
    assert all((p.forward.name, p.backward.name) == ("e4m3", "e5m2") for p in cast)  # fp8_format="HYBRID"
    assert any(float(layer.grad_scale) != 1.0 for layer in layers.values()), "no layer was calibrated"
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in _train_logs(trainer))

    args = _args(tmp_path, cls=UnitScaleTrainingArguments, fp8=True, fp8_format="E4M3", fp8_full_precision_modules=[])
    every_layer = UnitScaleTrainer(model=case.model(), args=args, train_dataset=_dataset("bert")).model
    precisions = [layer.precision for layer in matmul_layers(every_layer).values()]
    assert all((p.forward.name, p.backward.name) == ("e4m3", "e4m3") for p in precisions)
    assert every_layer.config.unit_scaling["backward_format"] == "e4m3"  # saved with the model


def test_fp8_arguments_choose_the_backend_and_say_what_they_change(tmp_path, caplog):
    """`fp8_backend` reaches every cast layer; precision set by hand before the trainer (here every layer cast,
    classifier included) is replaced by the arguments' with a warning naming a layer, not silently."""
    from hf_unitscale.convert import matmul_layers

    model = unit_scale(CASES_BY_ID["bert"].model())
    set_precision(model, "e4m3", "e5m2", "scaled_mm", full_precision_modules=[])
    args = _args(tmp_path, cls=UnitScaleTrainingArguments, fp8=True, fp8_backend="scaled_mm", log_level="warning")
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        trainer = UnitScaleTrainer(model=model, args=args)
    layers = matmul_layers(trainer.model)
    assert layers["classifier"].precision is None  # the default `fp8_full_precision_modules`: output heads
    assert {layer.precision.backend for name, layer in layers.items() if name != "classifier"} == {"scaled_mm"}
    assert "set the GEMM precision of 1 matmul layers that had another one (e.g. `classifier`" in caplog.text
    with pytest.raises(ValueError, match="`fp8_backend` must be one of"):
        _args(tmp_path, cls=UnitScaleTrainingArguments, fp8=True, fp8_backend="cuda")


def test_fp8_false_turns_off_the_low_precision_gemms_a_model_came_with(tmp_path, caplog):
    """A model with FP8 on (by hand, or restored from a checkpoint's `unit_scaling` block) would otherwise train
    with uncalibrated a = c = 1 under `fp8=False`: the trainer says so and trains it in full precision."""
    from hf_unitscale.convert import matmul_layers

    model = unit_scale(CASES_BY_ID["bert"].model())
    set_precision(model, "e4m3", "e5m2")
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        trainer = UnitScaleTrainer(
            model=model, args=_args(tmp_path, cls=UnitScaleTrainingArguments, log_level="warning")
        )
    assert all(layer.precision is None for layer in matmul_layers(trainer.model).values())
    block = trainer.model.config.unit_scaling
    assert block["forward_format"] is None and block["backward_format"] is None  # what a checkpoint will record
    assert "but `fp8` is False" in caplog.text


def test_fp8_calibration_differentiates_the_trainers_own_loss(tmp_path):
    """A `compute_loss` override reading `label_names=["target"]` trains the model's cross-entropy: calibration must
    measure c on that loss (the trainer's `compute_loss`), not on a proxy for the missing `labels` (~100× off)."""
    import torch.nn.functional as F

    class TargetLossTrainer(UnitScaleTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            target = inputs.pop("target")
            outputs = model(**inputs)
            loss = F.cross_entropy(outputs.logits, target)
            return (loss, outputs) if return_outputs else loss

    data = _dataset("bert")
    options = dict(cls=UnitScaleTrainingArguments, max_steps=1, fp8=True, calibration_batches=2)
    scales = []
    for trainer_class, dataset, extra in (
        (UnitScaleTrainer, data, {}),
        (TargetLossTrainer, data.rename_column("labels", "target"), {"label_names": ["target"]}),
    ):
        args = _args(tmp_path / trainer_class.__name__, **options, **extra)
        trainer = trainer_class(model=CASES_BY_ID["bert"].model(), args=args, train_dataset=dataset)
        trainer.train()
        scales.append({n: float(b) for n, b in trainer.model.named_buffers() if n.endswith("grad_scale")})
    assert trainer.model.config.unit_scaling["calibration"]["loss"] == "compute_loss"
    assert scales[1] == pytest.approx(scales[0], rel=1e-6)


def test_fp8_calibration_leaves_training_rng_alone_with_persistent_workers(tmp_path):
    """Calibration draws its batches from the training DataLoader under a forked RNG. With persistent workers,
    training then reused that iterator without drawing its workers' base seed, so every dropout mask differed from
    an uncalibrated run's."""
    states = {}

    class RngAtEachStep(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_step_begin(self, args, state, control, **kwargs):
            states.setdefault(self.key, []).append(torch.random.get_rng_state())

    for fp8 in (False, True):
        args = _args(
            tmp_path / str(fp8), cls=UnitScaleTrainingArguments, max_steps=3, fp8=fp8, calibration_batches=2,
            dataloader_num_workers=1, dataloader_persistent_workers=True,
        )  # fmt: skip
        trainer = UnitScaleTrainer(
            model=CASES_BY_ID["bert"].model(), args=args, train_dataset=_dataset("bert"), callbacks=[RngAtEachStep(fp8)]
        )
        trainer.train()
    assert len(states[True]) == 3
    assert all(torch.equal(a, b) for a, b in zip(states[False], states[True], strict=True))


def test_fp8_calibration_draws_the_batches_of_the_batch_size_auto_find_batch_size_retries_at(tmp_path):
    """`auto_find_batch_size` runs training again at a smaller batch size after an out-of-memory error (simulated for
    any forward of more than 4 rows, calibration's too, as real memory would). Calibration kept the first attempt's
    batches: every retry ran out of memory in calibration ("No executable batch size found"), and where only training
    ran out, c was measured on batches of the old size (8 rows for training's 4: c ~2× too small)."""
    forwards = []

    class OutOfMemoryAbove4Rows(UnitScaleTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            forwards.append(("training" if model.training else "calibration", inputs["input_ids"].shape[0]))
            if inputs["input_ids"].shape[0] > 4:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")  # what accelerate retries on
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = _args(
        tmp_path, cls=UnitScaleTrainingArguments, max_steps=1, fp8=True, calibration_batches=2,
        auto_find_batch_size=True, per_device_train_batch_size=5,
    )  # fmt: skip
    trainer = OutOfMemoryAbove4Rows(model=CASES_BY_ID["bert"].model(), args=args, train_dataset=_dataset("bert"))
    trainer.train()
    assert trainer.state.train_batch_size == 4
    assert forwards[0] == ("calibration", 5) and forwards[-3:] == [("calibration", 4)] * 2 + [("training", 4)], forwards


@pytest.mark.parametrize(("log_level", "shown"), [("info", True), ("passive", False)])
def test_log_level_reaches_the_packages_loggers(log_level, shown, tmp_path, caplog):
    """Trainer's `log_level` sets transformers' verbosity; UnitScaleTrainer gives it to `hf_unitscale.*` too, so its
    conversion (logged at INFO) shows with `log_level="info"`; `passive` leaves the application's logging as it is
    (an unconfigured one shows warnings only)."""
    args = _args(tmp_path, cls=UnitScaleTrainingArguments, log_level=log_level)
    UnitScaleTrainer(model=CASES_BY_ID["bert"].model(), args=args)
    converted = [r for r in caplog.records if r.name == "hf_unitscale.convert" and "Unit-scaled" in r.getMessage()]
    assert bool(converted) == shown, [r.getMessage() for r in caplog.records]


class _MeanLossTrainer(UnitScaleTrainer):
    """A `compute_loss` override returning a per-batch mean, flagged as transformers' docstring asks: Trainer divides
    it by the accumulation steps."""

    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


@pytest.mark.parametrize("loss_setup", ["model", "override_mean", "compute_loss_func"])
def test_fp8_grad_scale_is_the_rms_of_the_gradient_training_backpropagates(tmp_path, loss_setup):
    """With 4 accumulation steps, c = rms(g) of the output gradients the first training micro-batch backpropagates
    (the batch calibration measured), however the loss is scaled: a causal LM's by `num_items_in_batch`, a flagged
    mean override's by Trainer's ÷ 4, a `compute_loss_func` mean's not at all (was 4× and ¼× off)."""
    import torch.nn.functional as F

    from hf_unitscale.convert import matmul_layers

    model = CASES_BY_ID["gpt2"].model()
    trainer_class, extra = UnitScaleTrainer, {}
    if loss_setup == "override_mean":
        trainer_class = _MeanLossTrainer
    elif loss_setup == "compute_loss_func":
        model.accepts_loss_kwargs = False

        def mean_loss(outputs, labels, num_items_in_batch=None):
            logits, targets = outputs.logits[:, :-1], labels[:, 1:]
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

        extra["compute_loss_func"] = mean_loss
    seen: dict[str, torch.Tensor] = {}

    class FirstMicroBatchGradients(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step > 0:
                return
            for name, layer in matmul_layers(model).items():
                layer.register_full_backward_hook(self.record(name))

        @staticmethod
        def record(name):
            def hook(module, grad_input, grad_output):
                seen.setdefault(name, grad_output[0].detach())

            return hook

    args = _args(
        tmp_path, cls=UnitScaleTrainingArguments, max_steps=1, fp8=True, calibration_batches=1,
        gradient_accumulation_steps=4, fp8_full_precision_modules=[],
    )  # fmt: skip
    trainer = trainer_class(
        model=model, args=args, train_dataset=_dataset("gpt2"), callbacks=[FirstMicroBatchGradients()], **extra
    )
    trainer.train()
    assert set(seen) == set(matmul_layers(trainer.model))
    for name, layer in matmul_layers(trainer.model).items():
        nonzero = seen[name][seen[name] != 0]
        ratio = float(nonzero.square().mean().sqrt()) / float(layer.grad_scale)
        assert 0.7 < ratio < 1.4, (name, ratio)


def test_fp8_calibration_loss_counts_no_items_in_labels_that_are_no_tensor(tmp_path):
    """Labels of another kind (DETR's list of dicts) give no `num_items_in_batch`, as Trainer counts them: calibration
    used to fail at train begin with "'list' object has no attribute 'ne'"."""
    import torch.nn.functional as F

    seen = []

    class ListLabelsTrainer(UnitScaleTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(num_items_in_batch)
            inputs = dict(inputs)
            targets = torch.tensor([target["class"] for target in inputs.pop("labels")])
            return F.cross_entropy(model(**inputs).logits, targets)

    args = _args(tmp_path, cls=UnitScaleTrainingArguments, max_steps=1, fp8=True, gradient_accumulation_steps=2)
    trainer = ListLabelsTrainer(model=CASES_BY_ID["bert"].model(), args=args)
    ids = torch.randint(3, VOCAB, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": [{"class": 0}, {"class": 1}]}
    assert torch.isfinite(trainer._calibration_loss(trainer.model, batch)) and seen == [None]


def test_fp8_eval_false_evaluates_what_the_merged_export_computes(tmp_path):
    from hf_unitscale.convert import matmul_layers
    from hf_unitscale.precision import full_precision

    case = CASES_BY_ID["bert"]

    def trained(fp8_eval):
        args = _args(
            tmp_path, cls=UnitScaleTrainingArguments, max_steps=3, fp8=True, calibration_batches=2, fp8_eval=fp8_eval
        )
        trainer = UnitScaleTrainer(
            model=case.model(), args=args, train_dataset=_dataset("bert"), eval_dataset=_dataset("bert", rows=16)
        )
        trainer.train()
        return trainer

    in_fp8, in_full = trained(True), trained(False)
    for name, tensor in in_fp8.model.state_dict().items():  # the option changes evaluation only
        assert torch.equal(tensor, in_full.model.state_dict()[name]), name
    # an FP8 evaluation's casts are not counted (they would reach the next training log) nor reported as metrics
    # (hyperparameter search's default objective sums every metric)
    counts = {n: layer.cast_counters.input.counts.clone() for n, layer in matmul_layers(in_fp8.model).items()}
    metrics = in_fp8.evaluate()
    assert not [key for key in metrics if "fp8/" in key], metrics
    for name, layer in matmul_layers(in_fp8.model).items():
        assert torch.equal(layer.cast_counters.input.counts, counts[name]), name
    fp8_loss, full_loss = metrics["eval_loss"], in_full.evaluate()["eval_loss"]
    with full_precision(in_fp8.model):
        assert in_fp8.evaluate()["eval_loss"] == full_loss
    assert fp8_loss != full_loss  # same weights, bit for bit: only the GEMM precision can make them differ
    data = _dataset("bert", rows=16)
    with full_precision(in_fp8.model):
        expected = in_fp8.predict(data).predictions
    assert numpy.array_equal(in_full.predict(data).predictions, expected)  # predict goes through the same loop
    # evaluating in full precision leaves the model training in FP8
    assert all(layer.precision is not None for n, layer in matmul_layers(in_full.model).items() if n != "classifier")


def test_fp8_training_compiles_into_one_graph(tmp_path):
    """`torch_compile=True` with FP8: cast counters, calibration and recalibration cause no graph break, and the
    compiled run follows the eager one. At the first step (same weights, same batch) the logged cast fractions
    are eager's exactly, as test_compile.py checks on one batch. Later, FP8 rounding can turn on the last bit of
    a differently summed GEMM: losses stay within 1e-4, but a few tiny gradients flush in one run and not in the
    other. On an AVX-512 CPU the fractions were equal to step 4, and at step 6 they were 0.0071 against 0.0096."""
    case = CASES_BY_ID["llama-untied"]
    runs = {}
    for torch_compile in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        args = _args(
            tmp_path / str(torch_compile),
            cls=UnitScaleTrainingArguments,
            max_steps=6,
            fp8=True,
            calibration_batches=2,
            recalibrate_every=3,
            torch_compile=torch_compile,
        )
        trainer = UnitScaleTrainer(model=case.model(), args=args, train_dataset=_dataset("llama-untied"))
        trainer.train()
        runs[torch_compile] = _train_logs(trainer)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    first_eager, first_compiled = runs[False][0], runs[True][0]
    fractions = [key for key in first_eager if key.startswith("fp8/")]
    assert len(fractions) == 12 and first_eager["fp8/grad_output_underflow_fraction"] > 0, first_eager
    assert {key: first_compiled[key] for key in fractions} == {key: first_eager[key] for key in fractions}
    for eager, compiled in zip(runs[False], runs[True], strict=True):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
        assert compiled["fp8/grad_output_underflow_fraction"] > 0  # counted under compile at every log


def test_bool_options_refuse_other_types(tmp_path):
    """A string such as "no" or "false" is truthy: as `fp8` it would train in FP8. Like `UnitScaleConfig`'s bools, the
    arguments' bools take True or False only, and the error names the option."""
    for option, value in (("fp8", "no"), ("umup_depth_scaling", "false"), ("fp8_eval", 0), ("fp8", "True")):
        with pytest.raises(TypeError, match=f"`{option}` must be bool .*got {type(value).__name__} {value!r}"):
            UnitScaleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **{option: value})
    assert UnitScaleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, fp8=True).fp8 is True


def test_numeric_and_str_options_refuse_other_types(tmp_path):
    """A count is an int (2.5 steps is no schedule), a factor a number, a format name a str: each named when wrong."""
    for option, value, wanted in (
        ("recalibrate_every", 2.5, "int"),
        ("calibration_batches", "4", "int"),
        ("calibration_batches", True, "int"),
        ("mup_base_width", 64.0, "int or None"),
        ("calibration_headroom", "2", "float or int or None"),
        ("fp8_format", None, "str"),
        ("fp8_backend", 1, "str or None"),
    ):
        with pytest.raises(TypeError, match=f"`{option}` must be {wanted}, got {type(value).__name__} {value!r}"):
            UnitScaleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, fp8=True, **{option: value})


def test_fp8_backend_takes_any_case_like_fp8_format(tmp_path):
    args = UnitScaleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, fp8=True, fp8_backend="SIMULATE")
    assert args.fp8_backend == "simulate"


def test_fp8_full_precision_modules_checked_with_the_arguments_and_empty_on_the_command_line(tmp_path):
    """A bad regex is refused when the arguments are built, not when the trainer sets the precision; the command line
    writes the empty list (cast every layer) as '[]', which is no regex."""
    with pytest.raises(ValueError, match=r"`fp8_full_precision_modules` entry '\(' is not a regular expression"):
        UnitScaleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, fp8=True, fp8_full_precision_modules=["("])
    parser = HfArgumentParser(UnitScaleTrainingArguments)
    base = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--fp8", "true"]
    (args,) = parser.parse_args_into_dataclasses([*base, "--fp8_full_precision_modules", "[]"])
    assert args.fp8_full_precision_modules == []
    (args,) = parser.parse_args_into_dataclasses([*base, "--fp8_full_precision_modules", "lm_head", ".*pooler.*"])
    assert args.fp8_full_precision_modules == ["lm_head", ".*pooler.*"]
