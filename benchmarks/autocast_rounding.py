"""How far a unit-scaled MiniLM's last hidden state moves from the plain model's under bf16 autocast.

With s = rms(W) the converted model computes the original's function in fp32 up to rounding; under bf16 autocast
the GEMM takes bf16(Ŵ) and the product is multiplied by s, a different rounding from the plain model's bf16(W).
Measured on the real MiniLM over the first --sentences reviews of the embedded sentiment data's test split
(padded batches, positions with attention_mask = 1 only): the relative norm ‖a − b‖ / ‖b‖ of the last hidden
state for

  - converted under autocast vs plain under autocast,
  - plain under autocast vs plain in fp32, and converted under autocast vs plain in fp32,

over all sentences at once and per sentence (min, median, max), for `s = rms(W)` (the default) and
`power_of_two_scales=True` (where bf16(s) = s).

    python benchmarks/autocast_rounding.py [--sentences 64] [--batch-size 16] [--out DIR]

Writes autocast_rounding.{json,md} to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from hf_unitscale import UnitScaleConfig, unit_scale
from hf_unitscale.embedded import load_sentiment, minilm_path

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def hidden_states(model, batches, autocast: bool) -> list[torch.Tensor]:
    """The fp32 last hidden state of every real (unpadded) token, one [tokens, hidden] tensor per sentence."""
    states = []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = model(**batch).last_hidden_state.float()
        states += [h[mask.bool()] for h, mask in zip(hidden, batch["attention_mask"], strict=True)]
    return states


def relative_norms(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    """‖a − b‖ / ‖b‖ over all sentences together, and its min/median/max over the sentences one by one."""
    per_sentence = [float((x - y).norm() / y.norm()) for x, y in zip(a, b, strict=True)]
    total = float(torch.cat(a).sub(torch.cat(b)).norm() / torch.cat(b).norm())
    return {
        "all": total,
        "per_sentence_min": min(per_sentence),
        "per_sentence_median": statistics.median(per_sentence),
        "per_sentence_max": max(per_sentence),
    }


def measure(plain, batches, config: UnitScaleConfig, fp32, plain_autocast) -> dict:
    """The converted model under autocast against the plain one under autocast and against fp32."""
    converted_autocast = hidden_states(unit_scale(copy.deepcopy(plain), config), batches, autocast=True)
    return {
        "converted_autocast_vs_plain_autocast": relative_norms(converted_autocast, plain_autocast),
        "converted_autocast_vs_fp32": relative_norms(converted_autocast, fp32),
    }


def markdown(result: dict, command: str) -> str:
    lines = [
        "# MiniLM's last hidden state under bf16 autocast, converted vs plain",
        "",
        f"`{command}`",
        "",
        f"all-MiniLM-L6-v2 (embedded), the first {result['sentences']} reviews of the embedded sentiment data's "
        f"test split ({result['tokens']} tokens, padding excluded), batch {result['batch_size']}, CPU, "
        f"torch {result['torch']}. Relative norm ‖a − b‖ / ‖b‖ over all tokens; per sentence: min / median / max.",
        "",
        "| compared | all sentences | per sentence |",
        "|---|---|---|",
        row("plain autocast vs fp32", result["plain_autocast_vs_fp32"]),
    ]
    for scales, pairs in result["converted"].items():
        lines.append(
            row(f"converted (s = {scales}) autocast vs plain autocast", pairs["converted_autocast_vs_plain_autocast"])
        )
        lines.append(row(f"converted (s = {scales}) autocast vs fp32", pairs["converted_autocast_vs_fp32"]))
    return "\n".join(lines) + "\n"


def row(compared: str, r: dict) -> str:
    """One table row: the relative norm over all sentences, then per sentence min / median / max."""
    return (
        f"| {compared} | {r['all']:.3%} | {r['per_sentence_min']:.3%} / {r['per_sentence_median']:.3%} / "
        f"{r['per_sentence_max']:.3%} |"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=64, help="the first N reviews of the test split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for autocast_rounding.{json,md}")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = load_sentiment("test")["text"][: args.sentences]
    batches = [
        tokenizer(texts[i : i + args.batch_size], padding=True, return_tensors="pt")
        for i in range(0, len(texts), args.batch_size)
    ]
    plain = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    fp32 = hidden_states(plain, batches, autocast=False)
    plain_autocast = hidden_states(plain, batches, autocast=True)
    result = {
        "sentences": len(texts),
        "tokens": sum(len(h) for h in fp32),
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "plain_autocast_vs_fp32": relative_norms(plain_autocast, fp32),
        "converted": {
            name: measure(plain, batches, UnitScaleConfig(power_of_two_scales=power_of_two), fp32, plain_autocast)
            for name, power_of_two in (("rms(W)", False), ("2^round(log2 rms(W))", True))
        },
    }
    result["command"] = " ".join(["python benchmarks/autocast_rounding.py", *argv])
    table = markdown(result, result["command"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autocast_rounding.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "autocast_rounding.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
