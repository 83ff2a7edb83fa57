"""Training-step throughput and peak memory of `UnitScaleTrainer` vs `transformers.Trainer`.

Same model (the real all-MiniLM-L6-v2 with a 2-label head), same data (VADER movie-review
snippets), fp32 (or bf16 autocast) on CPU, AdamW with clipping and a linear schedule. Throughput: both trainers in
one process, interleaved repeats (plain, unit-scaled, plain, …), each repeat a fresh trainer
timing its optimizer steps after the first; the ratio is of the medians. Peak memory: each
trainer in its own subprocess (peak RSS is a process-wide high-water mark), plus the bytes held
by parameters, optimizer state and buffers after training (gradients are freed each step).

    python benchmarks/trainer_overhead.py [--repeats 5] [--steps 6] [--batch-size 16] [--seq-len 64] [--threads N] \
        [--torch-compile] [--bf16] [--out DIR]

`--bf16` trains both under `TrainingArguments(bf16=True)` (autocast, fp32 weights): the converted layers then
multiply their 16-bit outputs by the fp32 s in fp32 and round once (`ops.apply_scale`), the cost this measures.
`--torch-compile` runs both trainers with `TrainingArguments(torch_compile=True)` (inductor). The first
step of each repeat, which compiles, is dropped as in eager runs.

Writes trainer_overhead.json and .md to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_unitscale.embedded import load_sentiment, minilm_path
from hf_unitscale.trainer import UnitScaleTrainer

RESULTS = Path(__file__).parent / "results"
TRAINERS = {"plain": Trainer, "unit_scaled": UnitScaleTrainer}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, clipping, optimizer, scheduler)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _dataset(batch_size: int, steps: int, seq_len: int):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    rows = load_sentiment("train").select(range(batch_size * steps))
    return rows.map(
        lambda b: tokenizer(b["text"], padding="max_length", truncation=True, max_length=seq_len),
        batched=True,
        remove_columns=["text", "score"],
    ).rename_column("label", "labels")


def _trainer(kind: str, data, steps: int, batch_size: int, output_dir: str, torch_compile: bool, bf16: bool):
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    args = TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        log_level="error",
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=5e-5,
        weight_decay=0.01,
        warmup_steps=1,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        torch_compile=torch_compile,
        bf16=bf16,
    )
    timer = StepTimer()
    trainer = TRAINERS[kind](model=model, args=args, train_dataset=data, callbacks=[timer])
    return trainer, timer


def _state_bytes(trainer) -> int:
    model, optimizer = trainer.model, trainer.optimizer
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def memory_run(kind: str, steps: int, batch_size: int, seq_len: int, torch_compile: bool, bf16: bool) -> dict:
    """Train in this process; report peak RSS and the bytes of the training state."""
    data = _dataset(batch_size, steps, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = _trainer(kind, data, steps, batch_size, tmp, torch_compile, bf16)
        trainer.train()
        state = _state_bytes(trainer)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mib": peak_kib / 1024, "state_mib": state / 2**20}


def throughput(repeats: int, steps: int, batch_size: int, seq_len: int, torch_compile: bool, bf16: bool) -> dict:
    data = _dataset(batch_size, steps, seq_len)
    per_kind: dict[str, list[float]] = {kind: [] for kind in TRAINERS}
    losses: dict[str, list[float]] = {kind: [] for kind in TRAINERS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for kind in TRAINERS:  # interleaved: drifts in machine load hit both alike
                torch._dynamo.reset()  # each repeat compiles afresh, as a new run would
                trainer, timer = _trainer(kind, data, steps, batch_size, tmp, torch_compile, bf16)
                trainer.train()
                per_kind[kind].extend(timer.times[1:])  # the first step pays one-off setup
                losses[kind].append(trainer.state.log_history[-2]["loss"])
    median = {kind: statistics.median(times) for kind, times in per_kind.items()}
    return {
        "median_step_seconds": median,
        "step_samples": {kind: len(times) for kind, times in per_kind.items()},
        "samples_per_second": {kind: batch_size / t for kind, t in median.items()},
        "throughput_ratio": median["plain"] / median["unit_scaled"],
        "final_loss": {kind: values[-1] for kind, values in losses.items()},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", "--batch_size", type=int, default=16)
    parser.add_argument("--seq-len", "--seq_len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--torch-compile", "--torch_compile", action="store_true", help="torch_compile=True")
    parser.add_argument("--bf16", action="store_true", help="bf16=True (autocast; weights stay fp32)")
    parser.add_argument("--memory-only", "--memory_only", choices=sorted(TRAINERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for trainer_overhead.{json,md}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        memory = memory_run(args.memory_only, args.steps, args.batch_size, args.seq_len, args.torch_compile, args.bf16)
        print(json.dumps(memory))
        return

    speed = throughput(args.repeats, args.steps, args.batch_size, args.seq_len, args.torch_compile, args.bf16)
    memory = {}
    for kind in TRAINERS:
        command = [sys.executable, __file__, "--memory-only", kind, "--steps", str(args.steps)]
        command += [
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--threads",
            str(args.threads),
        ]
        command += ["--torch-compile"] if args.torch_compile else []
        command += ["--bf16"] if args.bf16 else []
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[kind] = json.loads(output.strip().splitlines()[-1])
    result = {
        "model": "all-MiniLM-L6-v2 + 2-label head (BertForSequenceClassification), "
        + ("bf16 autocast (fp32 weights)" if args.bf16 else "fp32")
        + ", CPU"
        + (", torch.compile (inductor)" if args.torch_compile else ", eager"),
        # the folder only when not the default, so the written command reruns into the same place
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"threads": torch.get_num_threads()}
        | ({} if args.out.resolve() == RESULTS.resolve() else {"out": str(args.out)}),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "throughput": speed,
        "memory": memory,
        "peak_rss_ratio": memory["unit_scaled"]["peak_rss_mib"] / memory["plain"]["peak_rss_mib"],
        "state_ratio": memory["unit_scaled"]["state_mib"] / memory["plain"]["state_mib"],
        "targets": {"throughput_ratio": ">= 0.95", "memory_ratio": "<= 1.05"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trainer_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "trainer_overhead.md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(r: dict) -> str:
    t, m = r["throughput"], r["memory"]
    s = r["settings"]
    return "\n".join(
        [
            "# UnitScaleTrainer overhead vs Trainer",
            "",
            f"{r['model']}; batch {s['batch_size']} × {s['seq_len']} tokens, {s['threads']} threads; "
            f"{s['repeats']} interleaved repeats of {s['steps']} steps (first step of each dropped). "
            f"torch {r['versions']['torch']}, transformers {r['versions']['transformers']}.",
            "",
            "| | Trainer | UnitScaleTrainer | ratio | target |",
            "|---|---|---|---|---|",
            f"| median step (s) | {t['median_step_seconds']['plain']:.4f} | {t['median_step_seconds']['unit_scaled']:.4f} "
            f"| throughput {t['throughput_ratio']:.3f} | ≥ 0.95 |",
            f"| peak RSS (MiB, own process) | {m['plain']['peak_rss_mib']:.0f} | {m['unit_scaled']['peak_rss_mib']:.0f} "
            f"| {r['peak_rss_ratio']:.3f} | ≤ 1.05 |",
            f"| params + Adam state + buffers (MiB) | {m['plain']['state_mib']:.1f} "
            f"| {m['unit_scaled']['state_mib']:.1f} | {r['state_ratio']:.3f} | |",
            "",
            f"Command: `python benchmarks/trainer_overhead.py --repeats {s['repeats']} --steps {s['steps']} "
            f"--batch-size {s['batch_size']} --seq-len {s['seq_len']} --threads {s['threads']}"
            f"{' --torch-compile' if s['torch_compile'] else ''}{' --bf16' if s.get('bf16') else ''}"
            f"{' --out ' + s['out'] if 'out' in s else ''}` "
            "(results: `trainer_overhead.json` beside this file).",
            "",
        ]
    )


if __name__ == "__main__":
    main()
