"""Progress bars: converting and loading many weight values shows transformers' tqdm, which its switch turns off;
small models convert silently."""

import pytest
import torch.distributed as dist
from transformers.utils import logging

import hf_unitscale
import hf_unitscale.progress
from hf_unitscale import unit_scale

from tiny_models import CASES_BY_ID

BARS = ("Measuring weight scales", "Unit-scaling LlamaForCausalLM", "Loading unit-scaled weights")


def _convert_save_and_load(tmp_path) -> None:
    model = unit_scale(CASES_BY_ID["llama-untied"].model())
    model.save_pretrained(tmp_path, checkpoint_format="unit-scaled", weight_dtype="e4m3")
    hf_unitscale.from_pretrained(tmp_path)


def test_long_conversion_and_loading_show_progress_bars(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hf_unitscale.progress, "MIN_VALUES", 1)  # the tiny model's weights count as many
    _convert_save_and_load(tmp_path)
    shown = capsys.readouterr().err
    assert all(bar in shown for bar in BARS), shown


def test_small_models_and_disabled_progress_bars_show_none(tmp_path, capsys, monkeypatch):
    _convert_save_and_load(tmp_path / "small")
    monkeypatch.setattr(hf_unitscale.progress, "MIN_VALUES", 1)
    logging.disable_progress_bar()
    try:
        _convert_save_and_load(tmp_path / "disabled")
    finally:
        logging.enable_progress_bar()
    shown = capsys.readouterr().err
    assert not any(bar in shown for bar in BARS), shown


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_under_torch_distributed_only_a_nodes_first_process_shows_them(tmp_path, capsys, monkeypatch, local_rank):
    """As Trainer's bars: a torchrun process other than local rank 0 draws none (a one-process group standing in
    for a rank of many)."""
    monkeypatch.setattr(hf_unitscale.progress, "MIN_VALUES", 1)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _convert_save_and_load(tmp_path)
    finally:
        dist.destroy_process_group()
    shown = capsys.readouterr().err
    drawn = [bar for bar in BARS if bar in shown]
    assert drawn == (list(BARS) if local_rank == "0" else []), shown


@pytest.fixture(autouse=True)
def _progress_bars_on():
    """transformers' switch as the tests find it, whatever the environment sets."""
    was_on = logging.is_progress_bar_enabled()
    logging.enable_progress_bar()
    yield
    if not was_on:
        logging.disable_progress_bar()
