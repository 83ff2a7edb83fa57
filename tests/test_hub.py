"""push_to_hub / from_pretrained by repo id against the local Hub server, with the real huggingface_hub client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from test_checkpoint import distinct_operand_scales

import hf_unitscale
import hf_unitscale.trainer
from hf_unitscale.checkpoint import UNIT_SCALED_WEIGHTS_NAME, operand_scales

import hub_server
from tiny_models import CASES_BY_ID


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    yield from hub_server.local_hub_fixture(monkeypatch, tmp_path)


def _converted(case_id: str):
    case = CASES_BY_ID[case_id]
    model = hf_unitscale.unit_scale(case.model())
    distinct_operand_scales(model)
    model.config.unit_scaling["lr_rule"] = "equivalent"
    model.config.unit_scaling["calibration"] = {"batches": 2}
    return model, case.batch()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _card(repo_id: str) -> str:
    return Path(hf_hub_download(repo_id, "README.md")).read_text()


@pytest.mark.parametrize(
    ("checkpoint_format", "weight_dtype", "weights_file"),
    [
        ("merged", None, "model.safetensors"),
        ("unit-scaled", "float32", UNIT_SCALED_WEIGHTS_NAME),
        ("unit-scaled", "e4m3", UNIT_SCALED_WEIGHTS_NAME),
    ],
)
def test_push_list_load_by_repo_id(local_hub, checkpoint_format, weight_dtype, weights_file):
    model, batch = _converted("llama-tied")
    repo_id = f"user/tiny-{checkpoint_format}-{weight_dtype}"
    model.push_to_hub(repo_id, checkpoint_format=checkpoint_format, weight_dtype=weight_dtype)

    files = HfApi().list_repo_files(repo_id)
    assert sorted(files) == sorted(
        [".gitattributes", "README.md", "config.json", "generation_config.json", weights_file]
    ), files
    loaded = hf_unitscale.from_pretrained(repo_id)
    assert operand_scales(loaded) == operand_scales(model)
    if weight_dtype == "e4m3":  # the push reloads exactly what a local e4m3 save reloads
        local = hf_unitscale.from_pretrained(_save_local(model, checkpoint_format, weight_dtype))
        torch.testing.assert_close(_logits(loaded, batch), _logits(local, batch), rtol=0, atol=0)
    elif checkpoint_format == "unit-scaled":
        torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)
    else:  # merged: s re-measured from W = s·Ŵ
        torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=1e-6, atol=1e-7)

    card = _card(repo_id)
    metadata = ModelCard(card).data
    assert "unit-scaling" in metadata.tags and "hf_unitscale" in metadata.tags
    assert metadata.library_name == "transformers"
    assert "**unit-scaled**" in card and f"`{checkpoint_format}` —" in card
    assert "**Learning-rate rule:** equivalent" in card and "Calibrated (batches: `2`)" in card
    assert "| `model.layers.1.mlp.down_proj` | Linear |" in card
    assert f'hf_unitscale.from_pretrained("{repo_id}")' in card
    assert local_hub.unhandled == []


def test_push_to_a_branch_or_a_pull_request_leaves_main_as_it_was(local_hub):
    """`revision` and `create_pr` reach the commit: the unit-scaled files, their card and the deletion of the merged
    weights land on the branch (or the pull request) under the commit message given, and main keeps its merged
    model."""
    model, batch = _converted("llama-tied")
    model.push_to_hub("user/branches")
    main = local_hub.head("user/branches")
    model.push_to_hub("user/branches", checkpoint_format="unit-scaled", revision="exact", commit_message="Ŵ, s, a, c")
    assert local_hub.head("user/branches") == main
    assert "model.safetensors" in local_hub.repo_files("user/branches")
    branch = local_hub.repo_files("user/branches", revision="exact")
    assert UNIT_SCALED_WEIGHTS_NAME in branch and "model.safetensors" not in branch, branch
    assert [c.title for c in HfApi().list_repo_commits("user/branches", revision="exact")][0] == "Ŵ, s, a, c"
    assert "`unit-scaled` —" in local_hub.read_file("user/branches", "README.md", revision="exact").decode()
    assert "`merged` —" in local_hub.read_file("user/branches", "README.md").decode()
    loaded = hf_unitscale.from_pretrained("user/branches", revision="exact")
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)

    pr = model.push_to_hub("user/branches", checkpoint_format="unit-scaled", weight_dtype="bfloat16", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and local_hub.head("user/branches") == main
    proposed = local_hub.repo_files("user/branches", revision="refs/pr/1")
    assert UNIT_SCALED_WEIGHTS_NAME in proposed and "model.safetensors" not in proposed, proposed
    assert "bfloat16" in local_hub.read_file("user/branches", "README.md", revision="refs/pr/1").decode()
    assert local_hub.commits("user/branches", revision="refs/pr/1")[1] == main  # proposed on top of main
    assert local_hub.unhandled == []


def test_sharded_unit_scaled_push_loads_by_repo_id(local_hub):
    model, batch = _converted("llama-tied")
    model.push_to_hub("user/sharded", checkpoint_format="unit-scaled", max_shard_size="20KB")

    weights = [f for f in HfApi().list_repo_files("user/sharded") if f.startswith("unit_scaled_model")]
    assert "unit_scaled_model.safetensors.index.json" in weights and len(weights) > 3, weights
    assert UNIT_SCALED_WEIGHTS_NAME not in weights
    loaded = hf_unitscale.from_pretrained("user/sharded")  # index, then every shard, through the Hub client
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)
    assert operand_scales(loaded) == operand_scales(model)
    assert local_hub.unhandled == []


def _save_local(model, checkpoint_format, weight_dtype):
    import tempfile

    folder = tempfile.mkdtemp(prefix="hf_unitscale_local_")
    model.save_pretrained(folder, checkpoint_format=checkpoint_format, weight_dtype=weight_dtype)
    return folder


def test_plain_transformers_loads_merged_push_and_refuses_unit_scaled(local_hub):
    model, batch = _converted("bert")
    model.push_to_hub("user/bert")
    plain = transformers.BertForSequenceClassification.from_pretrained("user/bert").eval()
    assert not hf_unitscale.is_unit_scaled(plain)
    torch.testing.assert_close(_logits(plain, batch), _logits(model, batch), rtol=1e-6, atol=1e-7)
    assert 'BertForSequenceClassification.from_pretrained("user/bert")' in _card("user/bert")

    # files a Trainer pushes beside the weights (`hub_strategy="checkpoint"`) are not ours to delete
    others = ["training_args.bin", "last-checkpoint/optimizer.pt", "last-checkpoint/model.safetensors"]
    for name in others:
        HfApi().upload_file(path_or_fileobj=b"kept", path_in_repo=name, repo_id="user/bert")
    # the same repo re-pushed unit-scaled: the stale merged weights are deleted in the same commit, so plain
    # transformers fails loudly instead of loading the old W
    model.push_to_hub("user/bert", checkpoint_format="unit-scaled", weight_dtype="bfloat16")
    assert "model.safetensors" not in local_hub.repo_files("user/bert")
    assert set(others) <= set(local_hub.repo_files("user/bert"))
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.BertForSequenceClassification.from_pretrained("user/bert", force_download=True)
    card = _card("user/bert")
    assert card.count("<!-- hf_unitscale:begin -->") == 1 and "`unit-scaled` —" in card and "bfloat16" in card


def test_compressed_tensors_push_loads_with_and_without_hf_unitscale(local_hub):
    model, batch = _converted("llama-untied")
    model.push_to_hub("user/llama-fp8", checkpoint_format="compressed-tensors")
    assert "model.safetensors" in local_hub.repo_files("user/llama-fp8")
    ours = hf_unitscale.from_pretrained("user/llama-fp8")
    plain = transformers.LlamaForCausalLM.from_pretrained("user/llama-fp8").eval()
    torch.testing.assert_close(_logits(ours, batch), _logits(plain, batch), rtol=1e-5, atol=1e-6)
    assert "compressed-tensors" in _card("user/llama-fp8")


def test_push_keeps_the_repos_own_card(local_hub):
    model, _ = _converted("gpt2")
    api = HfApi()
    api.create_repo("user/gpt2")
    text = "---\nlicense: apache-2.0\ntags:\n- poetry\n---\n# Tiny GPT-2\n\nTrained on sonnets.\n"
    api.upload_file(path_or_fileobj=text.encode(), path_in_repo="README.md", repo_id="user/gpt2")
    model.push_to_hub("user/gpt2", tags=["experiment"])
    card = _card("user/gpt2")
    data = ModelCard(card).data
    assert data.license == "apache-2.0" and {"poetry", "unit-scaling", "experiment"} <= set(data.tags)
    assert "Trained on sonnets." in card and "## Unit scaling" in card


def test_push_refuses_bad_arguments_before_creating_the_repo_and_takes_a_str_as_one_tag(local_hub):
    """A refused push leaves the Hub as it was (no empty repo); `tags="experiment"` is one tag, as in transformers."""
    model, _ = _converted("gpt2")
    for bad, match in (
        ({"checkpoint_format": "unit_scaled"}, "`checkpoint_format` must be one of"),
        ({"checkpoint_format": "unit-scaled", "weight_dtype": "fp8"}, "`weight_dtype` must be one of"),
        ({"embedding_dtype": "int8"}, "`embedding_dtype` applies to the unit-scaled format only"),
        ({"max_shard_size": "lots"}, "`max_shard_size='lots'`"),
    ):
        with pytest.raises(ValueError, match=match):
            model.push_to_hub("user/refused", **bad)
        assert not local_hub.repo_exists("user/refused")
    model.push_to_hub("user/tagged", tags="experiment")
    tags = ModelCard(_card("user/tagged")).data.tags
    assert "experiment" in tags and "e" not in tags


def test_save_pretrained_push_to_hub_flag(local_hub, tmp_path):
    model, batch = _converted("distilbert")
    model.save_pretrained(tmp_path / "out", checkpoint_format="unit-scaled", push_to_hub=True, repo_id="user/distil")
    assert UNIT_SCALED_WEIGHTS_NAME in local_hub.repo_files("user/distil")
    model.save_pretrained(tmp_path / "merged", push_to_hub=True, repo_id="user/distil", revision="merged")
    assert "model.safetensors" in local_hub.repo_files("user/distil", revision="merged")
    assert UNIT_SCALED_WEIGHTS_NAME in local_hub.repo_files("user/distil")  # main as it was
    torch.testing.assert_close(
        _logits(hf_unitscale.from_pretrained("user/distil"), batch), _logits(model, batch), rtol=0, atol=0
    )


def test_save_pretrained_push_uploads_only_what_the_save_wrote(local_hub, tmp_path):
    """As transformers: other files in the folder (notes, data, a Trainer checkpoint) stay local."""
    model, _ = _converted("distilbert")
    folder = tmp_path / "out"
    (folder / "checkpoint-500").mkdir(parents=True)
    (folder / "checkpoint-500" / "optimizer.pt").write_bytes(b"state")
    (folder / "private_notes.txt").write_text("not for the Hub")
    model.save_pretrained(folder, push_to_hub=True, repo_id="user/distil")  # merged, then unit-scaled on top
    model.save_pretrained(folder, checkpoint_format="unit-scaled", push_to_hub=True, repo_id="user/distil")
    files = set(local_hub.repo_files("user/distil"))
    assert files == {".gitattributes", "README.md", "config.json", UNIT_SCALED_WEIGHTS_NAME}, files


def test_merged_back_model_pushes_as_plain_transformers(local_hub):
    model, batch = _converted("bert")
    hf_unitscale.merge_unit_scale(model)
    model.push_to_hub("user/plain")
    assert "unit_scaling" not in Path(hf_hub_download("user/plain", "config.json")).read_text()
    assert "unit-scaling" not in _card("user/plain")
    plain = transformers.BertForSequenceClassification.from_pretrained("user/plain").eval()
    torch.testing.assert_close(_logits(plain, batch), _logits(model, batch), rtol=0, atol=0)


def _trained_llama(tmp_path, hub_model_id: str, **options):
    """A UnitScaleTrainer that trained the tiny Llama one step without saving, and a batch for its logits."""
    from hf_unitscale.arguments import UnitScaleTrainingArguments

    model, batch = _converted("llama-untied")
    rows = [{"input_ids": row, "labels": row} for row in CASES_BY_ID["llama-untied"].batch(4)["input_ids"]]
    model.config.unit_scaling["lr_rule"] = None  # the trainer records its own
    args = UnitScaleTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        hub_model_id=hub_model_id,
        save_strategy="no",
        use_cpu=True,
        **options,
    )
    trainer = hf_unitscale.trainer.UnitScaleTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return trainer, batch


def test_trainer_push_to_hub_card(local_hub, tmp_path):
    trainer, batch = _trained_llama(tmp_path, "user/trained", lr_rule="umup", save_format="unit-scaled")
    trainer.push_to_hub()
    assert UNIT_SCALED_WEIGHTS_NAME in local_hub.repo_files("user/trained")
    card = _card("user/trained")
    assert "unit-scaling" in ModelCard(card).data.tags
    # Trainer.push_to_hub: save_model (our card), create_model_card (Trainer's card, our section merged back in)
    assert "## Unit scaling" in card and "`unit-scaled` —" in card and "Training hyperparameters" in card
    assert card.count("<!-- hf_unitscale:begin -->") == 1 and "**Learning-rate rule:** umup" in card
    assert "**Weight dtype (Ŵ):** float32" in card
    loaded = hf_unitscale.from_pretrained("user/trained")
    torch.testing.assert_close(_logits(loaded, batch), _logits(trainer.model, batch), rtol=0, atol=0)


def test_trainer_push_reads_the_merged_weights_back_once(local_hub, tmp_path, monkeypatch):
    """The merged card lists the s a loader measures from the saved weights, read back from the file. Trainer's
    push saves the model, then writes its card over the save's: one read of model.safetensors, not one per card.
    The pushed card still lists the measured s."""
    from hf_unitscale import model_card

    trainer, _ = _trained_llama(tmp_path, "user/merged")
    opened = []

    def counting_safe_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return safe_open(path, *args, **kwargs)

    safe_open = model_card.safe_open
    monkeypatch.setattr(model_card, "safe_open", counting_safe_open)
    trainer.push_to_hub()
    assert opened == ["model.safetensors"]
    card = _card("user/merged")
    assert "`merged` —" in card and "s is what `hf_unitscale.from_pretrained` measures from the merged W" in card
    assert card.count("<!-- hf_unitscale:begin -->") == 1 and "Training hyperparameters" in card


def _trainer_pushing_every_save(tmp_path, hub_model_id: str):
    """A UnitScaleTrainer of the tiny BERT classifier that saves (and pushes) once, at its last step 2."""
    from hf_unitscale.arguments import UnitScaleTrainingArguments

    case = CASES_BY_ID["bert"]
    rows = [{"input_ids": row, "labels": i % 2} for i, row in enumerate(case.batch(8, seed=2)["input_ids"])]
    args = UnitScaleTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        push_to_hub=True,
        hub_model_id=hub_model_id,
        report_to=[],
        use_cpu=True,
    )
    return hf_unitscale.trainer.UnitScaleTrainer(model=case.model(seed=1), args=args, train_dataset=rows)


def test_trainer_pushes_during_training_carry_weights_and_leave_one_format(local_hub, tmp_path):
    """`hub_strategy="every_save"`: each mid-training commit holds the checkpoint's unit-scaled weights (Trainer
    copies only model.safetensors) with a card that describes them, and no stale merged weights or card of an
    earlier push; the final merged push deletes the unit-scaled file, so plain transformers loads the trained
    model. Every commit loads: the deletions are part of the uploads. The card names the namespaced repo."""
    from transformers import BertForSequenceClassification

    earlier, batch = _converted("bert")
    earlier.push_to_hub("user/run")  # merged: model.safetensors of another model
    trainer = _trainer_pushing_every_save(tmp_path, "run")  # the namespace comes from the token's user
    trainer.train()
    trainer.push_to_hub()

    files = {commit: local_hub.repo_files("user/run", revision=commit) for commit in local_hub.commits("user/run")}
    during = [commit for commit, names in files.items() if UNIT_SCALED_WEIGHTS_NAME in names]
    assert len(during) == 1 and "model.safetensors" not in files[during[0]]
    step_2 = hf_unitscale.from_pretrained(str(tmp_path / "run" / "checkpoint-2"))
    pushed_2 = hf_unitscale.from_pretrained("user/run", revision=during[0])
    torch.testing.assert_close(_logits(pushed_2, batch), _logits(step_2, batch), rtol=0, atol=0)
    card_2 = local_hub.read_file("user/run", "README.md", revision=during[0]).decode()
    assert "`unit-scaled` —" in card_2 and 'hf_unitscale.from_pretrained("user/run")' in card_2
    assert "BertForSequenceClassification.from_pretrained" not in card_2  # the merged card's plain-load snippet

    for commit in local_hub.commits("user/run")[:-1]:  # all but the repo's initial commit (.gitattributes)
        config = json.loads(local_hub.read_file("user/run", "config.json", revision=commit))
        checkpoint_format = config["unit_scaling"]["checkpoint_format"]
        weights = UNIT_SCALED_WEIGHTS_NAME if checkpoint_format == "unit-scaled" else "model.safetensors"
        assert {name for name in files[commit] if name.endswith(".safetensors")} == {weights}, files[commit]
        assert f"`{checkpoint_format}` —" in local_hub.read_file("user/run", "README.md", revision=commit).decode()
        hf_unitscale.from_pretrained("user/run", revision=commit)

    final = local_hub.repo_files("user/run")
    assert "model.safetensors" in final and UNIT_SCALED_WEIGHTS_NAME not in final
    plain = BertForSequenceClassification.from_pretrained("user/run")
    torch.testing.assert_close(_logits(plain, batch), _logits(trainer.model, batch), rtol=1e-5, atol=1e-6)
    assert 'from_pretrained("user/run")' in _card("user/run")


def test_a_save_during_a_running_upload_leaves_the_output_folder_and_the_hub_alone(local_hub, tmp_path):
    """Trainer skips a mid-training push while the previous upload still runs (`hub_always_push=False`): the
    output folder that upload may be reading keeps its files, and the Hub gets no commit."""
    from concurrent.futures import Future

    from transformers.utils.hub import PushInProgress

    trainer = _trainer_pushing_every_save(tmp_path, "user/busy")
    trainer.train()
    trainer._finish_current_push()
    pushed = (tmp_path / "run" / UNIT_SCALED_WEIGHTS_NAME).read_bytes()
    commits = local_hub.commits("user/busy")
    with torch.no_grad():
        trainer.model.classifier.weight.add_(1.0)
    newer = tmp_path / "run" / "checkpoint-3"
    hf_unitscale.save_pretrained(trainer.model, newer, checkpoint_format="unit-scaled")
    running = Future()
    trainer.push_in_progress = PushInProgress([running])
    try:
        trainer._push_from_checkpoint(str(newer))
    finally:
        running.set_result(None)
    assert (tmp_path / "run" / UNIT_SCALED_WEIGHTS_NAME).read_bytes() == pushed
    assert local_hub.commits("user/busy") == commits


def test_overlapping_trainer_pushes_leave_transformers_hf_api_as_it_was(tmp_path):
    """Trainers pushing in threads may end their pushes in any order: while any runs, Trainer's uploads of each running
    push's folder delete the other format's weights; when the last ends, `transformers.trainer.hf_api` is its own
    again (restoring what one push saw at its start left another's stand-in in place)."""
    import transformers.trainer as transformers_trainer

    from hf_unitscale.trainer_push import trainer_uploads_replacing_weights

    original = transformers_trainer.hf_api
    first, second = (trainer_uploads_replacing_weights(tmp_path / name) for name in ("a", "b"))
    first.__enter__()
    second.__enter__()
    assert transformers_trainer.hf_api()._folders == {str(tmp_path / "a"), str(tmp_path / "b")}
    first.__exit__(None, None, None)  # the push that started first ends first
    assert transformers_trainer.hf_api()._folders == {str(tmp_path / "b")}
    second.__exit__(None, None, None)
    assert transformers_trainer.hf_api is original
