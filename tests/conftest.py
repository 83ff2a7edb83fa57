"""Test environment: no Hub access, a throw-away HF cache, deterministic torch on 2 cores."""

import logging
import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_unitscale_test_home_")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _package_log_level():
    """A UnitScaleTrainer's `log_level` sets the `hf_unitscale` loggers' level: each test starts from the one before."""
    package = logging.getLogger("hf_unitscale")
    level = package.level
    yield
    package.setLevel(level)


@pytest.fixture(scope="session")
def minilm_path():
    """The real all-MiniLM-L6-v2 folder, fetched by `python -m hf_unitscale.embedded` before the tests."""
    from hf_unitscale.embedded import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct, converted once from its GGUF to safetensors."""
    from hf_unitscale.embedded import smollm2_path

    return smollm2_path()
