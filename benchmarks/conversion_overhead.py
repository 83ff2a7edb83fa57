"""Conversion time and forward+backward cost of a unit-scaled model vs the plain one (issue 2).

Measured in one run, fp32 on CPU: `unit_scale` on the real SmolLM2-135M, and median forward+backward
time of plain vs converted GPT-2-small-shaped (random weights, Conv1D) and SmolLM2 models, with
plain and converted steps interleaved so machine noise hits both alike.

    python benchmarks/conversion_overhead.py [--repeats 7] [--seq-len 128] [--out DIR]

Writes conversion_overhead.{json,md} to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_unitscale import unit_scale
from hf_unitscale.embedded import smollm2_path

RESULTS = Path(__file__).parent / "results"


def forward_backward_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def compare(name: str, plain: torch.nn.Module, batch_size: int, seq_len: int, repeats: int) -> dict:
    converted = unit_scale(copy.deepcopy(plain))
    ids = torch.randint(0, plain.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"plain": [], "unit_scaled": []}
    for model in (plain, converted):  # warm-up
        forward_backward_seconds(model.train(), ids)
    for _ in range(repeats):
        times["plain"].append(forward_backward_seconds(plain, ids))
        times["unit_scaled"].append(forward_backward_seconds(converted, ids))
    plain_s, converted_s = statistics.median(times["plain"]), statistics.median(times["unit_scaled"])
    return {
        "model": name,
        "tokens": batch_size * seq_len,
        "plain_s": plain_s,
        "unit_scaled_s": converted_s,
        "ratio": converted_s / plain_s,
        "times": times,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for conversion_overhead.{json,md}")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/conversion_overhead.py", *argv])
    torch.manual_seed(0)

    smollm2 = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    to_convert = copy.deepcopy(smollm2)
    start = time.perf_counter()
    unit_scale(to_convert)
    conversion_s = time.perf_counter() - start
    del to_convert

    gpt2_small = GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    rows = [
        compare("GPT-2-small shape (124M, random)", gpt2_small, 4, args.seq_len, args.repeats),
        compare("SmolLM2-135M", smollm2, 4, args.seq_len, args.repeats),
    ]
    result = {
        "command": command,
        "conversion_seconds_smollm2_135m": conversion_s,
        "forward_backward": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conversion_overhead.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Conversion of SmolLM2-135M (`unit_scale`, in memory): {conversion_s:.2f} s",
        "",
        "| model | tokens/step | plain fwd+bwd (s) | unit-scaled fwd+bwd (s) | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['tokens']} | {r['plain_s']:.3f} | {r['unit_scaled_s']:.3f} | {r['ratio']:.3f} |"
        for r in rows
    ]
    lines.append(
        f"\nfp32, CPU ({torch.get_num_threads()} threads, torch {torch.__version__}), median of {args.repeats} "
        f"interleaved steps.\n\nCommand: `{command}` (batch 4 × {args.seq_len} tokens)."
    )
    (args.out / "conversion_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
