"""Checkpoint formats: round trips over the tiny table, plain-transformers loads, loud failures, model cards."""

from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hf_unitscale
from hf_unitscale.checkpoint import UNIT_SCALED_WEIGHTS_NAME, merged_state_dict, operand_scales, stored_gain_names
from hf_unitscale.convert import matmul_layers
from hf_unitscale.formats import get_format
from hf_unitscale.modules import UnitScaledMatmulMixin
from hf_unitscale.precision import set_precision

from tiny_models import _BERT_SMALL, CASES_BY_ID, GAIN_NAMES, HEADS_CASES, SEQ2SEQ_CASES, TINY_CASES, tiny_gain_model

logger = logging.getLogger(__name__)

FORMATS = [  # (checkpoint_format, weight_dtype, embedding_dtype)
    ("merged", None, None),
    ("unit-scaled", "float32", None),
    ("unit-scaled", "bfloat16", None),
    ("unit-scaled", "e4m3", None),  # embedding tables default to int8 rows
    ("unit-scaled", "e4m3", "e4m3"),
    ("unit-scaled", "float32", "int8"),
    ("compressed-tensors", None, None),
]


@torch.no_grad()
def distinct_operand_scales(model) -> dict[str, list[float]]:
    """Give each converted matmul layer of `model` its own a = 0.5 + i/7 and c = 1e-5·(i + 1), written into its
    buffers directly: loading sets a, c through `set_operand_scales`, so a model calibrated through it would share
    its bugs with the reloaded one. Returns {layer: [a, c]} as computed (before the buffers' fp32 rounding)."""
    scales = {}
    for i, (name, layer) in enumerate(matmul_layers(model).items()):
        scales[name] = [0.5 + i / 7, 1e-5 * (i + 1)]
        layer.input_scale.fill_(scales[name][0])
        layer.grad_scale.fill_(scales[name][1])
    return scales


def _converted(case, calibrated: bool = True):
    """A converted tiny model; with `calibrated`, distinct a, c per matmul layer (identity casts: same function)."""
    model = hf_unitscale.unit_scale(case.model())
    if calibrated:
        distinct_operand_scales(model)
    return model


def _outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _rounded_reference(model, weight_dtype: str, embedding_dtype: str | None = None, only_linear_except=None):
    """A copy of `model` whose Ŵ went through the storage a low-precision file uses."""
    reference = copy.deepcopy(model)
    done: set[int] = set()
    with torch.no_grad():
        for name, module in hf_unitscale.unit_scaled_modules(reference).items():
            if only_linear_except is not None and (
                not isinstance(module, torch.nn.Linear) or name in only_linear_except
            ):
                continue
            dtype = (embedding_dtype or weight_dtype) if isinstance(module, torch.nn.Embedding) else weight_dtype
            for weight in module.unit_scaled_weights:
                w = getattr(module, weight)
                if id(w) not in done:  # a tied Ŵ is stored once, under its first name
                    done.add(id(w))
                    w.copy_(_stored(w, dtype))
    return reference


def _stored(w: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "int8":
        k = w.abs().amax(dim=1, keepdim=True) / 127
        k = torch.where(k > 0, k, torch.ones_like(k))  # a padding row is all zero
        return (w / k).round().clamp(-127, 127) * k
    if dtype == "e4m3":
        return w.float().clamp(-448, 448).to(get_format("e4m3").dtype).to(w.dtype)
    return w.to(getattr(torch, dtype)).to(w.dtype)


@pytest.mark.parametrize(("checkpoint_format", "weight_dtype", "embedding_dtype"), FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: c.id)
def test_round_trip(case, checkpoint_format, weight_dtype, embedding_dtype, tmp_path):
    model = _converted(case, calibrated=False)
    scales = distinct_operand_scales(model)
    batch = case.batch()
    options = {"embedding_dtype": embedding_dtype} if embedding_dtype else {}
    model.save_pretrained(tmp_path, checkpoint_format=checkpoint_format, weight_dtype=weight_dtype, **options)
    loaded = hf_unitscale.from_pretrained(tmp_path)

    assert hf_unitscale.is_unit_scaled(loaded)
    assert operand_scales(loaded) == operand_scales(model) != {}
    for name, (a, c) in scales.items():  # a, c as set, to fp32 rounding
        assert operand_scales(loaded)[name] == pytest.approx([a, c], rel=1e-7), name
    assert (tmp_path / "README.md").exists()
    if checkpoint_format == "unit-scaled" and weight_dtype == "float32" and embedding_dtype is None:
        # exact: Ŵ, s, a, c bit for bit
        expected, actual = model.state_dict(), loaded.state_dict()
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.equal(expected[name], actual[name]), name
        torch.testing.assert_close(_outputs(loaded, batch), _outputs(model, batch), rtol=0, atol=0)
        return
    if checkpoint_format == "merged":
        reference = model  # s re-measured from W = s·Ŵ: equal up to fp32 rounding
    elif checkpoint_format == "unit-scaled":
        default = "int8" if weight_dtype == "e4m3" else weight_dtype
        reference = _rounded_reference(model, weight_dtype, embedding_dtype or default)
    else:
        ignore = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
        reference = _rounded_reference(model, "e4m3", only_linear_except=ignore)
    torch.testing.assert_close(_outputs(loaded, batch), _outputs(reference, batch), rtol=1e-5, atol=1e-6)


_PLAIN_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch, transformers

    jobs = json.loads(sys.argv[1])
    for job in jobs:
        model = getattr(transformers, job["architecture"]).from_pretrained(job["folder"]).eval()
        batch = torch.load(job["batch"])
        with torch.no_grad():
            torch.save(model(**batch).logits, job["out"])
    assert "hf_unitscale" not in sys.modules, "the plain load imported hf_unitscale"
    print("plain-ok", len(jobs))
    """
)


def test_plain_transformers_loads_merged_and_compressed_tensors_without_hf_unitscale(tmp_path):
    """In a fresh interpreter that never imports hf_unitscale: same outputs as the converted model."""
    jobs, expected = [], {}
    for case in TINY_CASES:
        model = _converted(case)
        batch = case.batch()
        for checkpoint_format in ("merged", "compressed-tensors"):
            folder = tmp_path / f"{case.id}-{checkpoint_format}"
            model.save_pretrained(folder, checkpoint_format=checkpoint_format)
            torch.save(batch, folder / "batch.pt")
            reference = model
            if checkpoint_format == "compressed-tensors":
                ignore = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
                reference = _rounded_reference(model, "e4m3", only_linear_except=ignore)
            expected[folder] = _outputs(reference, batch)
            architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
            jobs.append(
                {
                    "architecture": architecture,
                    "folder": str(folder),
                    "batch": str(folder / "batch.pt"),
                    "out": str(folder / "out.pt"),
                }
            )
    result = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOAD, json.dumps(jobs)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"plain-ok {len(jobs)}" in result.stdout
    for folder, reference in expected.items():
        torch.testing.assert_close(torch.load(folder / "out.pt"), reference, rtol=1e-5, atol=1e-6, msg=str(folder))


def test_a_compressed_tensors_checkpoint_without_the_package_names_the_format_and_the_extra(tmp_path):
    """Saving needs no compressed-tensors; loading does, and says how to install it."""
    _converted(TINY_CASES[0]).save_pretrained(tmp_path, checkpoint_format="compressed-tensors")
    script = (
        "import sys\n"
        "sys.modules['compressed_tensors'] = None  # not installed\n"
        "import hf_unitscale\n"
        f"hf_unitscale.from_pretrained({str(tmp_path)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and f"{tmp_path} is a compressed-tensors checkpoint" in last, last
    assert "pip install 'hf_unitscale[compressed-tensors]'" in last, last


@pytest.mark.parametrize("checkpoint_format", ["merged", "unit-scaled"])
def test_a_classifier_checkpoint_loads_with_another_number_of_labels(checkpoint_format, tmp_path):
    """As in transformers: a head of another size is an error that names `ignore_mismatched_sizes`, and with it the
    head is drawn anew while the body loads as saved (a Trainer checkpoint is unit-scaled)."""
    classifier = _converted(CASES_BY_ID["bert"])
    with torch.no_grad():  # as after training: rms(Ŵ) ≠ 1, so measuring s again would change it
        classifier.bert.encoder.layer[0].attention.self.query.weight.mul_(1.5)
    classifier.save_pretrained(tmp_path, checkpoint_format=checkpoint_format)
    with pytest.raises((ValueError, RuntimeError), match="ignore_mismatched_sizes"):
        hf_unitscale.from_pretrained(tmp_path, num_labels=3)
    loaded = hf_unitscale.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    assert loaded.classifier.out_features == 3 and loaded.config.num_labels == 3
    batch = CASES_BY_ID["bert"].batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.bert(**batch)[0], classifier.bert(**batch)[0], rtol=1e-5, atol=1e-6)
    if checkpoint_format == "unit-scaled":  # nothing resized: Ŵ and s load exactly as saved, not re-measured
        same = hf_unitscale.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
        assert all(torch.equal(t, classifier.state_dict()[k]) for k, t in same.state_dict().items())


@pytest.mark.parametrize("checkpoint_format", ["merged", "unit-scaled"])
def test_a_checkpoint_loads_into_another_head_class_as_in_transformers(checkpoint_format, tmp_path):
    """The base model of a converted classifier saves W (merged) or Ŵ, s (not Ŵ as W) under its own layer names;
    it loads into a classifier with a new head, `num_labels` and `id2label` reaching the config as in
    transformers, the body's a, c following the `bert.` prefix; the classifier's checkpoint loads into the base
    model, its head's a, c dropped with its weights."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    classifier = _converted(CASES_BY_ID["bert"])
    classifier.bert.save_pretrained(tmp_path / "base", checkpoint_format=checkpoint_format)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    loaded = hf_unitscale.from_pretrained(
        tmp_path / "base", model_class=AutoModelForSequenceClassification, num_labels=3, id2label=labels
    )
    assert loaded.config.id2label == labels and loaded.classifier.out_features == 3
    bodies = [loaded.bert]
    if checkpoint_format == "merged":
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3, id2label=labels)
        assert plain.config.id2label == labels
        bodies.append(plain.bert)
    batch = CASES_BY_ID["bert"].batch()
    with torch.no_grad():  # the body is the saved one
        for body in bodies:
            torch.testing.assert_close(body(**batch)[0], classifier.bert(**batch)[0], rtol=1e-5, atol=1e-6)
    body_scales = {n: v for n, v in operand_scales(classifier).items() if n.startswith("bert.")}
    assert operand_scales(loaded) == body_scales

    classifier.save_pretrained(tmp_path / "classifier", checkpoint_format=checkpoint_format)
    base = hf_unitscale.from_pretrained(tmp_path / "classifier", model_class=AutoModel)
    assert operand_scales(base) == {n.removeprefix("bert."): v for n, v in body_scales.items()}
    with torch.no_grad():
        torch.testing.assert_close(base(**batch)[0], classifier.bert(**batch)[0], rtol=1e-5, atol=1e-6)
    # another head class, without a pooler: the pooler's scales are dropped with its weights; its `classifier`
    # (same name and shape) gets the saved one's weights from transformers, and so its a, c
    tagger = hf_unitscale.from_pretrained(tmp_path / "classifier", model_class=AutoModelForTokenClassification)
    expected = {n: v for n, v in operand_scales(classifier).items() if ".pooler." not in n}
    assert operand_scales(tagger) == expected and "classifier" in expected


def test_a_unit_scaled_checkpoint_loads_through_an_auto_class_mapping_several_classes(tmp_path):
    """AutoModelForImageClassification maps a DeiT config to two classes; transformers picks the saved one."""
    from transformers import AutoModelForImageClassification, DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    config = DeiTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    model = hf_unitscale.unit_scale(DeiTForImageClassification(config).eval())
    model.save_pretrained(tmp_path, checkpoint_format="unit-scaled")
    loaded = hf_unitscale.from_pretrained(tmp_path, model_class=AutoModelForImageClassification)
    assert type(loaded) is DeiTForImageClassification
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_a_unit_scaled_checkpoint_loaded_into_another_class_keeps_its_generation_config(tmp_path):
    model = hf_unitscale.unit_scale(
        transformers.GPT2DoubleHeadsModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    )
    model.generation_config.max_new_tokens, model.generation_config.top_k = 7, 5
    model.generation_config.do_sample = True
    model.save_pretrained(tmp_path, checkpoint_format="unit-scaled")
    loaded = hf_unitscale.from_pretrained(tmp_path, model_class=transformers.GPT2LMHeadModel)
    assert (loaded.generation_config.max_new_tokens, loaded.generation_config.top_k) == (7, 5)


@pytest.mark.parametrize("case", [CASES_BY_ID["bert"], CASES_BY_ID["llama-tied"]], ids=lambda c: c.id)
def test_plain_transformers_refuses_unit_scaled_folder(case, tmp_path):
    model = _converted(case)
    model.save_pretrained(tmp_path, checkpoint_format="unit-scaled", weight_dtype="e4m3")
    assert not (tmp_path / "model.safetensors").exists()
    auto = transformers.AutoModel if case.id == "bert" else transformers.AutoModelForCausalLM
    for loader in (auto, type(model)):
        with pytest.raises(OSError, match="model.safetensors"):
            loader.from_pretrained(tmp_path)


# ---- loud failures: never a silently different model ----


@pytest.fixture
def unit_scaled_folder(tmp_path):
    model = _converted(CASES_BY_ID["llama-untied"])
    model.save_pretrained(tmp_path, checkpoint_format="unit-scaled", weight_dtype="e4m3")
    return tmp_path


def test_truncated_weights_file_names_the_file(unit_scaled_folder):
    path = unit_scaled_folder / UNIT_SCALED_WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{UNIT_SCALED_WEIGHTS_NAME}.*corrupt or truncated"):
        hf_unitscale.from_pretrained(unit_scaled_folder)


def test_garbage_weights_file_names_the_file(unit_scaled_folder):
    (unit_scaled_folder / UNIT_SCALED_WEIGHTS_NAME).write_bytes(b"\x00\x01 not a safetensors file" * 10)
    with pytest.raises(ValueError, match=f"{UNIT_SCALED_WEIGHTS_NAME}.*corrupt or truncated"):
        hf_unitscale.from_pretrained(unit_scaled_folder)


def test_corrupt_weight_bytes_name_the_tensor(unit_scaled_folder):
    path = unit_scaled_folder / UNIT_SCALED_WEIGHTS_NAME
    tensors = load_file(path)
    name = "model.layers.1.mlp.up_proj.weight"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    offsets = json.loads(data[8 : 8 + header_len])[name]["data_offsets"]
    start = 8 + header_len + offsets[0]
    data[start : start + 4] = b"\xff\xff\xff\xff"  # 0xff is NaN in e4m3fn
    path.write_bytes(bytes(data))
    assert tensors[name].dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match=f"`{name}` has non-finite values.*corrupt"):
        hf_unitscale.from_pretrained(unit_scaled_folder)


def test_truncated_merged_weights_name_the_file(tmp_path):
    _converted(CASES_BY_ID["bert"]).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*corrupt or truncated"):
        hf_unitscale.from_pretrained(tmp_path)


def test_missing_scale_names_it(unit_scaled_folder):
    path = unit_scaled_folder / UNIT_SCALED_WEIGHTS_NAME
    tensors = load_file(path)
    del tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"missing the scale.*model\.layers\.0\.self_attn\.q_proj\.weight_scale"):
        hf_unitscale.from_pretrained(unit_scaled_folder)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("operand", ["input_scale", "grad_scale"])
def test_an_operand_scale_that_is_not_positive_and_finite_names_it(unit_scaled_folder, operand, value):
    """a = 0 made the FP8 forward nan and c = -3 flipped every gradient, loaded without a word."""
    path = unit_scaled_folder / UNIT_SCALED_WEIGHTS_NAME
    tensors = load_file(path)
    name = f"model.layers.0.self_attn.q_proj.{operand}"
    tensors[name] = torch.tensor(value)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"scale `{re.escape(name)}` = {value} is not a positive finite number"):
        hf_unitscale.from_pretrained(unit_scaled_folder)


def _edit_block(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["unit_scaling"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"exclude_modules": ["lm_head"]}, r"unexpected \[.*'lm_head.weight_scale'.*disagrees with the saved weights"),
        ({"weight_dtype": "bfloat16"}, r"is stored as e4m3.*weight_dtype='bfloat16'.*disagrees"),
        ({"embedding_dtype": "e4m3"}, r"`model.embed_tokens.weight` is stored as int8.*embedding_dtype='e4m3'"),
        ({"checkpoint_format": "fp4-magic"}, r"checkpoint_format.*fp4-magic"),
    ],
    ids=["exclusions", "weight_dtype", "embedding_dtype", "unknown_format"],
)
def test_block_that_disagrees_with_the_weights_is_refused(unit_scaled_folder, changes, error):
    _edit_block(unit_scaled_folder, **changes)
    with pytest.raises(ValueError, match=error):
        hf_unitscale.from_pretrained(unit_scaled_folder)


# the gains of ≥2 dimensions in the models of `tiny_gain_model`: SwiftFormer's layer scales, GRN's γ, weight_norm's g
_BROADCAST_SHAPED_GAINS = re.compile(r".*\.(layer_scale(_[12])?|grn\.weight|original0)")


def _gains_stored_as_earlier_versions_did(folder, weight_dtype):
    """Rewrite the unit-scaled checkpoint in `folder` as hf_unitscale did when it converted gains stored broadcast
    shaped: each gain W as Ŵ = W/s in `weight_dtype` and `<name>_scale` s = rms(W). Returns {name: (Ŵ, s)}."""
    path = folder / UNIT_SCALED_WEIGHTS_NAME
    tensors = load_file(path)
    dtype = {"float32": torch.float32, "e4m3": torch.float8_e4m3fn}[weight_dtype]
    stored = {}
    for name in [n for n in tensors if _BROADCAST_SHAPED_GAINS.fullmatch(n)]:
        scale = tensors[name].double().square().mean().sqrt().float()
        stored[name] = ((tensors[name] / scale).to(dtype), scale)
        tensors[name], tensors[name + "_scale"] = stored[name]
    save_file(tensors, str(path), metadata={"format": "pt", "hf_unitscale": "unit-scaled"})
    return stored


@pytest.mark.parametrize(
    ("model_id", "weight_dtype"),
    [("swiftformer", "float32"), ("convnextv2", "float32"), ("wav2vec2", "float32"), ("swiftformer", "e4m3")],
)
def test_a_checkpoint_storing_gains_as_scaled_weights_loads_them_as_w(model_id, weight_dtype, tmp_path, caplog):
    """A unit-scaled checkpoint saved when broadcast-shaped gains were converted (Ŵ and `<name>_scale` s) loads
    into today's model, which keeps them as W: W = s·Ŵ (Ŵ as stored, e4m3 too), no scale, the saved function."""
    model, inputs = tiny_gain_model(model_id)
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    hf_unitscale.unit_scale(model).save_pretrained(tmp_path, checkpoint_format="unit-scaled", weight_dtype=weight_dtype)
    stored = _gains_stored_as_earlier_versions_did(tmp_path, weight_dtype)
    assert set(GAIN_NAMES[model_id]) <= set(stored)
    with caplog.at_level(logging.INFO, logger="hf_unitscale"):
        loaded = hf_unitscale.from_pretrained(tmp_path)
    assert f"stores {len(stored)} gain(s) as Ŵ and s" in caplog.text
    converted = {f"{n}.{w}" for n, m in hf_unitscale.unit_scaled_modules(loaded).items() for w in m.unit_scaled_weights}
    parameters = dict(loaded.named_parameters())
    for name, (weight, scale) in stored.items():
        assert name not in converted, name
        assert torch.equal(parameters[name], weight.float() * scale), name
    if weight_dtype == "float32":
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).last_hidden_state, expected, rtol=1e-6, atol=1e-6)


def test_resuming_from_a_checkpoint_storing_gains_as_scaled_weights_is_refused(tmp_path):
    """Its optimizer state holds Adam moments of the gains' Ŵ (off by s, s² from W's; under `equivalent` also one
    group per gain): resuming would not continue the run, so the trainer names the gains and the way on."""
    model, _ = tiny_gain_model("convnextv2")
    hf_unitscale.unit_scale(model).save_pretrained(tmp_path / "ckpt", checkpoint_format="unit-scaled")
    assert stored_gain_names(model, tmp_path / "ckpt") == []
    stored = _gains_stored_as_earlier_versions_did(tmp_path / "ckpt", "float32")
    assert stored_gain_names(model, tmp_path / "ckpt") == sorted(stored)
    args = hf_unitscale.UnitScaleTrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[])
    trainer = hf_unitscale.UnitScaleTrainer(model=model, args=args)
    with pytest.raises(ValueError, match=rf"unit-scaled gains stored in broadcast shape \({len(stored)}: .*new run"):
        trainer._check_resumable(str(tmp_path / "ckpt"))


def test_merged_block_naming_an_unknown_layer(tmp_path):
    _converted(CASES_BY_ID["bert"]).save_pretrained(tmp_path)
    _edit_block(tmp_path, operand_scales={"bert.encoder.layer.7.output.dense": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.7\.output\.dense.*disagrees"):
        hf_unitscale.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "entry", [[float("nan"), 1.0], [-1.0, 0.5], [0.0, 0.0], [1.0], [1.0, 2.0, 3.0], "1, 2", [True, 1.0]], ids=str
)
def test_merged_block_operand_scales_that_are_not_positive_pairs_name_the_layer(tmp_path, entry):
    """[nan, 1], [-1, 0] and [0, 0] loaded silently (non-finite logits and gradients in FP8); [1.0] failed with
    "not enough values to unpack"."""
    model = _converted(CASES_BY_ID["bert"])
    model.save_pretrained(tmp_path)
    layer = "bert.encoder.layer.0.attention.output.dense"
    scales = {**operand_scales(model), layer: entry}
    _edit_block(tmp_path, operand_scales=scales)
    with pytest.raises(ValueError, match=rf"operand_scales` holds .* for layer `{re.escape(layer)}`: each entry is"):
        hf_unitscale.from_pretrained(tmp_path)
    _edit_block(tmp_path, operand_scales="x")
    with pytest.raises(ValueError, match=r"operand_scales` must map each layer name to \[a, c\], got str 'x'"):
        hf_unitscale.from_pretrained(tmp_path)


@pytest.mark.parametrize("checkpoint_format", ["merged", "unit-scaled"])
def test_a_unit_scale_config_that_disagrees_with_the_checkpoint_is_blamed(checkpoint_format, tmp_path):
    """The caller's options leave the classifier unconverted, whose a, c (and Ŵ, s) the checkpoint holds: the error
    named the checkpoint's block as the cause."""
    _converted(CASES_BY_ID["bert"]).save_pretrained(tmp_path, checkpoint_format=checkpoint_format)
    with pytest.raises(ValueError, match=r"classifier.*converted with `unit_scale_config`.*load it without") as error:
        hf_unitscale.from_pretrained(tmp_path, unit_scale_config={"exclude_modules": ["classifier"]})
    assert "block of config.json disagrees" not in str(error.value)


@pytest.mark.parametrize("checkpoint_format", ["merged", "unit-scaled"])
def test_a_malformed_block_names_the_key_and_what_is_wrong(checkpoint_format, tmp_path):
    """Each raised a bare Python error: "'str' object has no attribute 'get'", an unknown option without saying
    it came from config.json, "Unknown low-precision format" without naming the option."""
    _converted(CASES_BY_ID["bert"]).save_pretrained(tmp_path, checkpoint_format=checkpoint_format)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "unit_scaling": "yes"}))
    with pytest.raises(ValueError, match=r"config\.json's `unit_scaling` must be a dict .*got str 'yes'"):
        hf_unitscale.from_pretrained(tmp_path)
    for changes, error in [
        ({"foo": 1}, r"config\.json's `unit_scaling` block: Unknown UnitScaleConfig option\(s\) \['foo'\]"),
        ({"forward_format": "e9m9"}, r"config\.json's `unit_scaling` block: `forward_format`: .*'e9m9'"),
        ({"convert_other_modules": "yes"}, r"config\.json's `unit_scaling` block: `convert_other_modules` must be"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        _edit_block(tmp_path, **changes)
        with pytest.raises(ValueError, match=error):
            hf_unitscale.from_pretrained(tmp_path)


@pytest.mark.parametrize("checkpoint_format", ["merged", "unit-scaled", "compressed-tensors"])
def test_a_state_dict_whose_keys_are_not_the_models_is_refused_before_writing(checkpoint_format, tmp_path):
    """A torch.compile'd model's state dict (`_orig_mod.` keys) saved unit-scaled without a word, as a checkpoint
    no loader reads; merged raised a bare KeyError."""
    model = _converted(CASES_BY_ID["llama-tied"])
    folder = tmp_path / "out"
    compiled = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # as torch.compile(model).state_dict()
    with pytest.raises(ValueError, match=r"keys start with `_orig_mod\.`.*removeprefix\('_orig_mod\.'\)"):
        hf_unitscale.save_pretrained(model, folder, checkpoint_format=checkpoint_format, state_dict=compiled)
    typo = {("lm_head.wieght" if k == "model.norm.weight" else k): v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing 1 key\(s\) \['model\.norm\.weight'\], unexpected 1 \['lm_h"):
        hf_unitscale.save_pretrained(model, folder, checkpoint_format=checkpoint_format, state_dict=typo)
    assert not folder.exists()
    # a tied weight (or its scale) under one of its names only, as transformers' de-duplicated state dicts keep it
    batch = CASES_BY_ID["llama-tied"].batch()
    for left_out in ("lm_head.weight", "model.embed_tokens.weight", "lm_head.weight_scale"):
        assert left_out in model.state_dict()
        one_name = {k: v for k, v in model.state_dict().items() if k != left_out}
        hf_unitscale.save_pretrained(model, folder, checkpoint_format=checkpoint_format, state_dict=one_name)
        loaded = hf_unitscale.from_pretrained(folder)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight, left_out
        if checkpoint_format != "compressed-tensors":  # E4M3 weights: not the same function
            torch.testing.assert_close(_outputs(loaded, batch), _outputs(model, batch), msg=left_out)


def test_weight_dtype_outside_unit_scaled_format_is_refused(tmp_path):
    model = _converted(CASES_BY_ID["bert"])
    with pytest.raises(ValueError, match="weight_dtype='e4m3'.*merged"):
        model.save_pretrained(tmp_path, weight_dtype="e4m3")
    with pytest.raises(ValueError, match="weight_dtype='bfloat16'.*compressed-tensors"):
        model.save_pretrained(tmp_path, checkpoint_format="compressed-tensors", weight_dtype="bfloat16")
    with pytest.raises(ValueError, match="weight_dtype"):
        model.save_pretrained(tmp_path, checkpoint_format="unit-scaled", weight_dtype="int3")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_merged_weight_dtype_is_written_or_refused(model_dtype, weight_dtype, tmp_path):
    """A merged checkpoint is written in the model's dtype: a `weight_dtype` naming it is honoured, another one is
    refused before anything is written, with the fix; never a checkpoint in another dtype than asked for."""
    model = _converted(CASES_BY_ID["bert"]).to(getattr(torch, model_dtype))
    if weight_dtype != model_dtype:
        with pytest.raises(ValueError, match=rf"weight_dtype='{weight_dtype}'.*model's dtype \({model_dtype}\)"):
            model.save_pretrained(tmp_path, weight_dtype=weight_dtype)
        assert not tmp_path.exists() or not any(tmp_path.iterdir())
        return
    model.save_pretrained(tmp_path, weight_dtype=weight_dtype)
    stored = {t.dtype for t in load_file(tmp_path / "model.safetensors").values() if t.is_floating_point()}
    assert stored == {getattr(torch, weight_dtype)}


def _tiny_deepseek_v3() -> transformers.DeepseekV3ForCausalLM:
    """A tiny DeepSeek-V3, whose MoE router (`gate.weight`, `e_score_correction_bias`) is kept in float32 strictly."""
    config = transformers.DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    return transformers.DeepseekV3ForCausalLM(config)


@pytest.mark.parametrize(
    "build, dtype, kept",
    [
        (SEQ2SEQ_CASES["t5"].model, torch.float16, ".wo."),  # `_keep_in_fp32_modules`: under float16 only
        (_tiny_deepseek_v3, torch.bfloat16, ".mlp.gate."),  # `_keep_in_fp32_modules_strict`: float16 and bfloat16
    ],
    ids=["t5-float16", "deepseek_v3-bfloat16"],
)
def test_merged_save_writes_the_weights_transformers_keeps_in_float32_as_they_are(build, dtype, kept, tmp_path):
    """`from_pretrained(..., dtype=dtype)` keeps some weights in float32 (T5's `wo` in float16, DeepSeek-V3's
    router in bfloat16 too). The merged save of that mixed-dtype model writes each weight in its own dtype, also
    when `weight_dtype` names the model's dtype, and plain transformers loads it back as it was."""
    build().save_pretrained(tmp_path / "plain")
    model = hf_unitscale.unit_scale(type(build()).from_pretrained(tmp_path / "plain", dtype=dtype))
    for weight_dtype in (None, str(dtype).removeprefix("torch.")):
        folder = tmp_path / f"merged-{weight_dtype}"
        model.save_pretrained(folder, weight_dtype=weight_dtype)
        stored = load_file(folder / "model.safetensors")
        in_float32 = {name for name, tensor in stored.items() if tensor.dtype == torch.float32}
        assert in_float32 and all(kept in name for name in in_float32), in_float32
        assert {t.dtype for name, t in stored.items() if name not in in_float32 and t.is_floating_point()} == {dtype}
        loaded = type(model).from_pretrained(folder, dtype=dtype).state_dict()
        for name, tensor in merged_state_dict(model).items():  # W = s·Ŵ, under the model's (fused experts') names
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_merged_weight_dtype_refusal_does_not_cast_what_transformers_keeps_in_float32(tmp_path):
    """A float32 T5 asked for float16 is refused with a fix that keeps `wo` in float32 (loading it in float16), not
    `model.to(torch.float16)`; for bfloat16, in which transformers casts `wo` on load too, that cast is the fix."""
    model = hf_unitscale.unit_scale(SEQ2SEQ_CASES["t5"].model())
    with pytest.raises(ValueError, match=r"float16.*keeps T5ForConditionalGeneration's \['wo'\] in float32") as error:
        model.save_pretrained(tmp_path, weight_dtype="float16")
    assert "cast the model first" not in str(error.value)
    with pytest.raises(ValueError, match=r"cast the model first \(`model.to\(torch.bfloat16\)`\)"):
        model.save_pretrained(tmp_path, weight_dtype="bfloat16")
    assert not any(tmp_path.iterdir())


# ---- model card ----


@pytest.mark.parametrize("checkpoint_format", ["merged", "unit-scaled", "compressed-tensors"])
def test_model_card_states_what_it_must(checkpoint_format, tmp_path):
    model = _converted(CASES_BY_ID["llama-tied"])
    model.config.unit_scaling["lr_rule"] = "umup"
    model.config.unit_scaling["calibration"] = {"batches": 4, "dataset": "austen"}
    set_precision(model, "e4m3", "e5m2")
    model.save_pretrained(tmp_path, checkpoint_format=checkpoint_format, repo_id="user/tiny-llama")
    card = (tmp_path / "README.md").read_text()
    assert "forward_format: `e4m3`, backward_format: `e5m2`" in card and "full precision: the output heads" in card
    assert card.startswith("---\n") and "- unit-scaling" in card and "- hf_unitscale" in card
    assert "library_name: transformers" in card
    assert "**unit-scaled**" in card and f"`{checkpoint_format}`" in card
    assert "umup" in card and "batches: `4`" in card and "15 of 15 matmul layers" in card
    assert "| `model.layers.0.self_attn.q_proj` | Linear |" in card  # per-layer scale table
    assert 'hf_unitscale.from_pretrained("user/tiny-llama")' in card
    if checkpoint_format != "unit-scaled":
        assert 'LlamaForCausalLM.from_pretrained("user/tiny-llama")' in card
    assert "s = rms(W), so rms(Ŵ) = 1" in card


def test_model_card_states_what_calibration_made_the_operand_scales(tmp_path):
    """Unit RMS is claimed only for a = rms(x), c = rms(g); a budget and headroom move them, and the card says how."""
    case = CASES_BY_ID["llama-untied"]
    model = _converted(case, calibrated=False)
    batch = case.batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def calibration_line(**options):
        table = hf_unitscale.calibrate(model, [batch], progress=False, **options)
        model.save_pretrained(tmp_path, checkpoint_format="unit-scaled")
        card = (tmp_path / "README.md").read_text()
        return next(line for line in card.splitlines() if "**Calibration:**" in line), table

    budgeted, table = calibration_line(headroom=4, grad_underflow_budget=1e-4)
    assert any(row["grad_scale"] < row["grad_rms"] / 2 for row in table.values())  # c is far from rms(g) here
    assert "unit RMS" not in budgeted and "its operand's RMS is not 1: above 1 where c was lowered" in budgeted
    assert "c lowered where needed so that at most a fraction 0.0001" in budgeted and "at least 4x below" in budgeted
    plain, _ = calibration_line()
    assert "a = rms(input) and c = rms(output gradient)" in plain and "had unit RMS on them" in plain


@pytest.mark.parametrize("checkpoint_format", ["unit-scaled", "compressed-tensors", "merged"])
def test_model_card_names_the_class_saved_not_the_one_loaded_from(checkpoint_format, tmp_path):
    transformers.BertModel(transformers.BertConfig(**_BERT_SMALL)).save_pretrained(tmp_path / "base")
    model = hf_unitscale.from_pretrained(
        tmp_path / "base", model_class=transformers.BertForSequenceClassification, num_labels=3
    )
    model.save_pretrained(tmp_path / "out", checkpoint_format=checkpoint_format, repo_id="user/tiny-bert")
    card = (tmp_path / "out" / "README.md").read_text()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]
    assert "BertForSequenceClassification" in card and "BertModel" not in card, card


@pytest.mark.parametrize(
    ("model_dtype", "checkpoint_format", "weight_dtype", "exact"),
    [
        (torch.float32, "unit-scaled", "float32", True),
        (torch.bfloat16, "unit-scaled", "bfloat16", True),
        (torch.float32, "unit-scaled", "bfloat16", False),
        (torch.float32, "unit-scaled", "e4m3", False),
        (torch.float32, "compressed-tensors", None, False),
    ],
)
def test_model_card_claims_the_same_function_only_for_exact_storage(
    model_dtype, checkpoint_format, weight_dtype, exact, tmp_path
):
    """Storage that rounds Ŵ is named instead of "the same function"; where the card claims it, the reload has
    every weight and scale of the model (a bf16 model's logits still move: transformers rebuilds RoPE's inv_freq
    in fp32, as in a plain round trip)."""
    model = hf_unitscale.unit_scale(CASES_BY_ID["llama-tied"].model().to(model_dtype))
    model.save_pretrained(tmp_path, checkpoint_format=checkpoint_format, weight_dtype=weight_dtype)
    card = (tmp_path / "README.md").read_text()
    saved, loaded = model.state_dict(), hf_unitscale.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items() if "rotary" not in name) == exact
    assert ("The model computes the same function as before conversion." in card) == exact
    assert ("an approximation of that function, not the same one" in card) == (not exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_card_lists_the_scales_a_loader_measures(dtype, tmp_path):
    """Training moves rms(Ŵ) off 1; the merged file holds only W = s·Ŵ and a loader measures s anew (rms(W), a power
    of two for bf16): the card lists that s, read from the saved shards (GPT-2's tied head is stored once)."""
    model = _converted(CASES_BY_ID["gpt2"]).to(dtype)
    with torch.no_grad():
        for i, layer in enumerate(hf_unitscale.unit_scaled_modules(model).values()):
            layer.weight.mul_(1 + i / 3)  # as training moves Ŵ
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    card = (tmp_path / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| \w+ \| ([^|]+) \|", card, flags=re.M))
    loaded = hf_unitscale.unit_scaled_modules(hf_unitscale.from_pretrained(tmp_path))
    assert rows.keys() == loaded.keys()
    for name, layer in loaded.items():
        assert float(rows[name]) == pytest.approx(float(layer.weight_scale), rel=1e-3), name
    assert "measures from the merged W stored here" in card


def test_merged_save_of_non_finite_weights_completes_and_the_card_says_so(tmp_path, caplog, monkeypatch):
    """A diverged run saves, as plain Trainer's would: the card lists the nan/inf weight's s as non-finite, with a
    warning (a loader would refuse to convert it), grouped or not."""
    model = _converted(CASES_BY_ID["bert"])
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    logging.getLogger("hf_unitscale").propagate = True
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        model.save_pretrained(tmp_path)
    assert "have nan/inf values (e.g. `bert.encoder.layer.0.attention.self.query.weight`)" in caplog.text
    card = (tmp_path / "README.md").read_text()
    assert "| `bert.encoder.layer.0.attention.self.query` | Linear | non-finite |" in card
    assert (tmp_path / "model.safetensors").is_file()
    import hf_unitscale.model_card as model_card

    monkeypatch.setattr(model_card, "MAX_LAYER_ROWS", 4)
    grouped = model_card.model_card_section(model, checkpoint_format="merged")
    assert re.search(
        r"^\| `bert\.encoder\.layer\.N\.attention\.self\.query` \| Linear \| 2 \| [^|]+; 1 non-finite \|", grouped, re.M
    )


def test_model_card_says_when_scales_are_powers_of_two(tmp_path):
    model = hf_unitscale.unit_scale(CASES_BY_ID["bert"].model().to(torch.bfloat16))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "s a power of two, so Ŵ = W/s is exact" in card and "s = rms(W)" not in card


def test_model_card_merges_into_existing_readme_and_is_refreshed(tmp_path):
    model = _converted(CASES_BY_ID["bert"])
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- sentiment\n---\n# My model\n\nMy own words.\n")
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, checkpoint_format="unit-scaled")  # refreshes the section, once
    card = (tmp_path / "README.md").read_text()
    assert "license: mit" in card and "- sentiment" in card and "- unit-scaling" in card
    assert "# My model" in card and "My own words." in card
    assert card.count("<!-- hf_unitscale:begin -->") == 1 and "`unit-scaled` —" in card and "`merged` —" not in card


def test_model_card_groups_layers_of_big_models(tmp_path, monkeypatch):
    import hf_unitscale.model_card as model_card

    monkeypatch.setattr(model_card, "MAX_LAYER_ROWS", 4)
    text = model_card.model_card_section(_converted(CASES_BY_ID["llama-untied"]), checkpoint_format="merged")
    assert "| `model.layers.N.mlp.down_proj` | Linear | 2 |" in text
    assert "model.layers.0." not in text


# ---- FP8 storage of the real models: size and eval loss on real data ----


def _safetensors_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _assert_fp8_storage_is_compact_and_close(model, loss, tmp_path, what: str) -> None:
    """Save `model` merged (fp32) and unit-scaled with Ŵ in E4M3, load the latter back, and assert that its
    file is ≤ 0.3× the merged one and that `loss(model)` moves by ≤ 0.5% relative (logged with its sign)."""
    reference = loss(model)
    hf_unitscale.unit_scale(model)
    model.save_pretrained(tmp_path / "merged")
    model.save_pretrained(tmp_path / "fp8", checkpoint_format="unit-scaled", weight_dtype="e4m3")
    merged_bytes, fp8_bytes = _safetensors_bytes(tmp_path / "merged"), _safetensors_bytes(tmp_path / "fp8")
    stored = loss(hf_unitscale.from_pretrained(tmp_path / "fp8"))
    change = (stored - reference) / reference
    logger.info(
        f"fp32 {what} {reference:.5f}, e4m3 {stored:.5f}, relative change {change:+.4%}, "
        f"size ratio {fp8_bytes / merged_bytes:.4f}"
    )
    assert fp8_bytes <= 0.3 * merged_bytes, f"e4m3 file is {fp8_bytes / merged_bytes:.3f}× the fp32 merged file"
    assert abs(change) <= 0.005, f"{what} changed by {change:+.2%} (fp32 {reference:.4f})"


@pytest.mark.slow
def test_fp8_storage_smollm2_size_and_austen_loss(tmp_path):
    """Causal-LM loss of SmolLM2-135M on held-out Austen text (4 × 256 tokens), fp32 vs the e4m3 checkpoint."""
    from hf_unitscale.embedded import load_austen, smollm2_path

    path = smollm2_path()
    tokens = transformers.AutoTokenizer.from_pretrained(path)("\n\n".join(load_austen("test")["text"])).input_ids
    batch = torch.tensor(tokens[: 4 * 256]).reshape(4, 256)

    def loss(model) -> float:
        with torch.no_grad():
            return model(input_ids=batch, labels=batch).loss.item()

    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    _assert_fp8_storage_is_compact_and_close(model, loss, tmp_path, "eval loss")


@pytest.mark.slow
def test_fp8_storage_minilm_size_and_probe_loss(tmp_path):
    """MiniLM is a sentence-embedding model with no LM head, so its "eval loss" is the cross-entropy of a
    fixed logistic-regression probe, fitted once on fp32 mean-pooled embeddings of training reviews, on
    held-out reviews: a real loss on real data whose only moving part is the embeddings being compared."""
    from hf_unitscale.embedded import load_sentiment, minilm_path

    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    train, test = load_sentiment("train").select(range(300)), load_sentiment("test").select(range(300))

    def embed(model, texts) -> torch.Tensor:
        encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    model = transformers.AutoModel.from_pretrained(path).eval()
    features, labels = embed(model, train["text"]), torch.tensor(train["label"])
    torch.manual_seed(0)
    probe = torch.nn.Linear(features.shape[1], 2)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200)

    def closure():
        optimizer.zero_grad()
        objective = torch.nn.functional.cross_entropy(probe(features), labels) + 1e-3 * probe.weight.square().sum()
        objective.backward()
        return objective

    optimizer.step(closure)
    test_labels = torch.tensor(test["label"])

    def loss(model) -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(probe(embed(model, test["text"])), test_labels).item()

    _assert_fp8_storage_is_compact_and_close(model, loss, tmp_path, "probe loss")


def test_saving_another_format_into_a_folder_removes_stale_weights(tmp_path):
    model = _converted(CASES_BY_ID["llama-tied"])
    # what a Trainer checkpoint or an adapter keeps beside the weights: not ours to delete
    others = ["optimizer.pt", "scheduler.pt", "training_args.bin", "adapter_model.safetensors", "run/model.safetensors"]
    for name in others:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"kept")
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded merged: model-0000x-of-0000y.safetensors
    assert (tmp_path / "model.safetensors.index.json").exists()
    model.save_pretrained(tmp_path, checkpoint_format="unit-scaled")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*") if p.name not in others) == [UNIT_SCALED_WEIGHTS_NAME]
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    weights = sorted(p.name for p in tmp_path.glob("*.safetensors*") if p.name not in others)
    assert weights == ["model.safetensors"]
    assert all((tmp_path / name).read_bytes() == b"kept" for name in others)


@pytest.mark.parametrize(
    "bad_option",
    [
        {"weight_dtype": "float16"},
        {"embedding_dtype": "int4"},
        {"max_shard_size": "12XB"},
        {"max_shard_size": 0},  # would write one file per tensor
        {"max_shard_size": -1},
    ],
)
def test_a_save_refused_for_a_bad_storage_option_leaves_the_earlier_checkpoint(bad_option, tmp_path):
    case = CASES_BY_ID["llama-tied"]
    model = _converted(case)
    model.save_pretrained(tmp_path, checkpoint_format="unit-scaled")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=next(iter(bad_option))):
        model.save_pretrained(tmp_path, checkpoint_format="unit-scaled", **bad_option)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    reloaded = hf_unitscale.from_pretrained(tmp_path)
    torch.testing.assert_close(_outputs(reloaded, case.batch()), _outputs(model, case.batch()), rtol=0, atol=0)


@pytest.mark.parametrize("checkpoint_format", ["unit-scaled", "merged", "compressed-tensors"])
@pytest.mark.parametrize("case_id", ["bert-pretraining", "t5-question-answering", "electra-mlm"])
def test_a_resized_model_with_tied_scales_round_trips(case_id, checkpoint_format, tmp_path):
    """`resize_token_embeddings` re-ties: transformers 5 then ties every key its tied weight's name prefixes
    (BERT's `decoder.weight_scale` becomes the embedding's s) and T5 puts one embedding module under three
    names. Each shared tensor has several names; every format must write each name's tensor as it is (W = s·Ŵ
    under every name of a merged checkpoint, which plain transformers then loads)."""
    case = next(c for c in HEADS_CASES if c.id == case_id)
    model = hf_unitscale.unit_scale(case.model())
    model.resize_token_embeddings(model.config.vocab_size + 5)
    model.save_pretrained(tmp_path, checkpoint_format=checkpoint_format)
    reloaded = [hf_unitscale.from_pretrained(tmp_path)]
    if checkpoint_format == "merged":
        reloaded.append(getattr(transformers, type(model).__name__).from_pretrained(tmp_path))
    batch = CASES_BY_ID["llama-tied"].batch()
    if "t5" in case_id:
        batch["decoder_input_ids"] = batch["input_ids"][:, :4]
    with torch.no_grad():
        expected = model(**batch)
        first = next(k for k in ("prediction_logits", "start_logits", "logits") if k in expected)
        for loaded in reloaded:
            # unit-scaled stores Ŵ and s exactly, merged W = s·Ŵ rounded once, compressed-tensors e4m3 linears (tiny
            # T5: 0.098 off without a resize)
            tolerance = {"unit-scaled": 0, "merged": 1e-5, "compressed-tensors": 0.15}[checkpoint_format]
            tolerance = {"rtol": tolerance, "atol": tolerance}
            torch.testing.assert_close(loaded(**batch)[first], expected[first], **tolerance)


def test_e4m3_storage_of_an_entry_beyond_448_warns_or_moves_into_the_scale(tmp_path, caplog):
    """Unit RMS puts Ŵ's entries far below E4M3's 448, but not always: the unit-scaled format then names the
    tensor it clips; compressed-tensors moves the excess into its per-tensor scale and clips nothing."""
    case = CASES_BY_ID["llama-untied"]
    model = hf_unitscale.unit_scale(case.model())
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight[0, 0] = 1000.0
    big = float(layer.weight[0, 0] * layer.weight_scale)
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        model.save_pretrained(tmp_path / "unit", checkpoint_format="unit-scaled", weight_dtype="e4m3")
    assert "model.layers.0.mlp.down_proj.weight (max |Ŵ| 1000)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        model.save_pretrained(tmp_path / "ct", checkpoint_format="compressed-tensors")
    assert "saturates" not in caplog.text
    reloaded = hf_unitscale.from_pretrained(tmp_path / "ct").model.layers[0].mlp.down_proj
    assert float(reloaded.weight[0, 0] * reloaded.weight_scale) == pytest.approx(big, rel=1e-6)


@pytest.mark.parametrize("checkpoint_format", ["unit-scaled", "compressed-tensors"])
def test_a_model_that_is_not_unit_scaled_is_refused_by_the_scaled_formats(checkpoint_format, tmp_path):
    """Its weights are W, not Ŵ: written as Ŵ with s = 1 missing, no loader could read them back."""
    model = CASES_BY_ID["llama-tied"].model()
    with pytest.raises(ValueError, match="is not unit-scaled.*unit_scale\\(model\\)"):
        hf_unitscale.save_pretrained(model, tmp_path, checkpoint_format=checkpoint_format)
    assert not any(tmp_path.iterdir())


def test_a_model_that_is_not_unit_scaled_saves_merged_as_transformers_would(tmp_path, caplog):
    """A plain checkpoint, with a warning: no `unit_scaling` block and no card calling it unit-scaled (it had an
    empty scale table and backend None)."""
    model = CASES_BY_ID["llama-tied"].model()
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        hf_unitscale.save_pretrained(model, tmp_path / "ours")
    assert "LlamaForCausalLM is not unit-scaled: saving it as transformers would" in caplog.text
    model.save_pretrained(tmp_path / "transformers")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(
        p.name for p in (tmp_path / "transformers").iterdir()
    )
    assert not (tmp_path / "ours" / "README.md").exists()
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("ours", "transformers")]
    assert configs[0] == configs[1] and "unit_scaling" not in configs[0]
    assert not hasattr(model.config, "unit_scaling")
    ours, theirs = (load_file(tmp_path / name / "model.safetensors") for name in ("ours", "transformers"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("checkpoint_format", ["merged", "unit-scaled", "compressed-tensors"])
def test_saving_to_a_file_path_names_the_path(checkpoint_format, tmp_path):
    """Not transformers' logged 'should be a directory' followed by a raw NotADirectoryError / FileExistsError."""
    path = tmp_path / "a_file"
    path.write_text("kept")
    with pytest.raises(NotADirectoryError, match=f"`save_directory` '{re.escape(str(path))}' is a file"):
        _converted(CASES_BY_ID["bert"]).save_pretrained(path, checkpoint_format=checkpoint_format)
    assert path.read_text() == "kept"


# ---- sharding: past `max_shard_size` the weights are split as transformers splits them ----


@pytest.mark.parametrize(
    ("checkpoint_format", "stem"), [("unit-scaled", "unit_scaled_model"), ("compressed-tensors", "model")]
)
def test_sharded_save_loads_the_same_model(checkpoint_format, stem, tmp_path):
    case = CASES_BY_ID["llama-tied"]
    model = _converted(case)
    model.save_pretrained(tmp_path / "single", checkpoint_format=checkpoint_format)
    model.save_pretrained(tmp_path / "sharded", checkpoint_format=checkpoint_format, max_shard_size="20KB")

    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    index = json.loads((tmp_path / "sharded" / f"{stem}.safetensors.index.json").read_text())
    assert len(shards) > 1 and all(name.startswith(f"{stem}-0000") for name in shards), shards
    assert sorted(set(index["weight_map"].values())) == shards
    assert sorted(index["weight_map"]) == sorted(load_file(tmp_path / "single" / f"{stem}.safetensors"))
    single, sharded = (hf_unitscale.from_pretrained(tmp_path / name) for name in ("single", "sharded"))
    assert operand_scales(sharded) == operand_scales(model)
    torch.testing.assert_close(_outputs(sharded, case.batch()), _outputs(single, case.batch()), rtol=0, atol=0)
    if checkpoint_format == "unit-scaled":  # Trainer resume reads shards too, into an already converted model
        resumed = _converted(case, calibrated=False)
        hf_unitscale.checkpoint.load_checkpoint_into(resumed, tmp_path / "sharded")
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_missing_shard_is_named(tmp_path):
    _converted(CASES_BY_ID["llama-tied"]).save_pretrained(
        tmp_path, checkpoint_format="unit-scaled", max_shard_size="20KB"
    )
    lost = sorted(tmp_path.glob("unit_scaled_model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(ValueError, match=f"index.json names shard.*missing.*{lost.name}"):
        hf_unitscale.from_pretrained(tmp_path)


def test_unit_scaled_save_refuses_arguments_it_would_ignore(tmp_path):
    model = _converted(CASES_BY_ID["llama-tied"])
    with pytest.raises(TypeError, match=r"\['variant'\].*unit-scaled format does not use"):
        model.save_pretrained(tmp_path, checkpoint_format="unit-scaled", variant="ema")
    assert not list(tmp_path.glob("*.safetensors"))


def test_unit_scaled_load_keeps_dtype_attention_and_generation_config(tmp_path):
    model = _converted(CASES_BY_ID["llama-tied"])
    model.config.dtype = torch.bfloat16  # as after loading a bf16 checkpoint and calling .float()
    model.generation_config.max_new_tokens, model.generation_config.do_sample = 7, True
    model.save_pretrained(tmp_path, checkpoint_format="unit-scaled")
    for dtype in ({}, {"dtype": "auto"}):  # the dtype the model was saved in: fp32
        loaded = hf_unitscale.from_pretrained(tmp_path, **dtype)
        assert loaded.dtype == torch.float32
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert (loaded.generation_config.max_new_tokens, loaded.generation_config.do_sample) == (7, True)
    assert hf_unitscale.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    eager = hf_unitscale.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    with pytest.raises(
        TypeError, match=r"\['device_map'\] that a unit-scaled checkpoint does not take.*\.to\(device\)"
    ):
        hf_unitscale.from_pretrained(tmp_path, device_map="cpu")


def test_unit_scale_of_a_merged_fp8_checkpoint_loaded_by_plain_transformers_keeps_its_function(tmp_path, caplog):
    """Plain transformers keeps the checkpoint's `unit_scaling` block (a, c, formats). They may not fit the weights
    it now holds (trained on, or a config copied onto others), so `unit_scale` converts afresh, computes the loaded
    model's function, and says what it did not apply; `hf_unitscale.from_pretrained` applies them."""
    case = CASES_BY_ID["llama-untied"]
    model = _converted(case)
    set_precision(model, "e4m3", "e5m2")
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.config.unit_scaling["operand_scales"]  # what the block records
    expected = _outputs(plain, case.batch())
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        converted = hf_unitscale.unit_scale(plain)
    assert "records a, c of 15 layers, forward_format 'e4m3' (converting with None), backward_format 'e5m2'" in (
        caplog.text
    )
    assert "hf_unitscale.from_pretrained(path)" in caplog.text
    layers = [m for m in hf_unitscale.unit_scaled_modules(converted).values() if isinstance(m, UnitScaledMatmulMixin)]
    assert all(m.precision is None and float(m.input_scale) == 1 and float(m.grad_scale) == 1 for m in layers)
    torch.testing.assert_close(_outputs(converted, case.batch()), expected, rtol=1e-5, atol=1e-6)
    caplog.clear()
    excluded = hf_unitscale.unit_scale(CASES_BY_ID["bert"].model(), {"exclude_modules": ["classifier"]})
    excluded.save_pretrained(tmp_path / "bert")
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        hf_unitscale.unit_scale(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert"))
    assert "records exclude_modules ['classifier'] (converting with [])" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        loaded = hf_unitscale.from_pretrained(tmp_path)  # the checkpoint's own a, c and formats, without the warning
    assert "records" not in caplog.text
    assert operand_scales(loaded) == operand_scales(model) and all(
        m.precision is not None
        for n, m in hf_unitscale.unit_scaled_modules(loaded).items()
        if "lm_head" not in n
        if isinstance(m, UnitScaledMatmulMixin)
    )


def test_from_pretrained_takes_unit_scale_config_as_a_dict(tmp_path):
    """As `unit_scale` does: config.json's block is a dict, and so is a recipe's."""
    CASES_BY_ID["bert"].model().save_pretrained(tmp_path)  # a plain checkpoint
    loaded = hf_unitscale.from_pretrained(tmp_path, unit_scale_config={"exclude_modules": ["classifier"]})
    assert type(loaded.classifier) is torch.nn.Linear and hf_unitscale.is_unit_scaled(loaded)


@pytest.mark.parametrize("checkpoint_format", ["merged", "unit-scaled"])
def test_loading_a_saved_checkpoint_does_not_warn_again_about_the_layers_that_stay(tmp_path, caplog, checkpoint_format):
    """CLIP's vision embeddings read `position_embedding.weight`, so that layer stays W: `unit_scale` warns once.
    Every load of the checkpoint it saved converts the same way, which the user cannot change: info, not a warning."""
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    vision = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                  num_attention_heads=4)  # fmt: skip
    config = transformers.CLIPConfig(
        text_config={**text, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        vision_config=vision,
        projection_dim=16,
    )
    with caplog.at_level(logging.WARNING, logger="hf_unitscale"):
        model = hf_unitscale.unit_scale(transformers.CLIPModel(config))
    assert "`vision_model.embeddings.position_embedding` (CLIPVisionEmbeddings" in caplog.text
    hf_unitscale.save_pretrained(model, tmp_path, checkpoint_format=checkpoint_format)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_unitscale"):
        loaded = hf_unitscale.from_pretrained(tmp_path)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "`vision_model.embeddings.position_embedding` (CLIPVisionEmbeddings" in caplog.text  # at info level
    assert set(hf_unitscale.unit_scaled_modules(loaded)) == set(hf_unitscale.unit_scaled_modules(model))
