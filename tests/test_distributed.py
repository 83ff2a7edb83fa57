"""Multi-process runs on CPU (gloo): `UnitScaleTrainer` under DDP and FSDP2, unit-scaled models under FSDP2.

Eight launches, started together so their start-up (imports) overlaps on the 2 cores:

- `tests/distributed/ddp_train.py` under `torchrun --nproc_per_node 2` (per-device batch 2), and
  the same script in one process with per-device batch 4: the same global batches, 20 steps;
- the same script under `torchrun --nproc_per_node 2` with `--accelerate-fsdp2`: the trainer
  with `fsdp_version: 2`, through Accelerate's own FSDP2 path (forced on CPU), against the same
  single-process run. Both 2-process runs also resume from their step-10 checkpoint;
- `tests/distributed/fsdp2_train.py` under `torchrun --nproc_per_node 2`: GPT-2 (tied), Llama
  tied and untied, sharded with `fully_shard`, 10 steps each; its single-process reference is
  computed here, in this process, by the script's own `train_case`;
- `tests/distributed/calibrate_ranks.py` under `torchrun --nproc_per_node 2`: `calibrate` with a
  different batch on each rank, against single-process calibrations of each batch, and with no batch
  on one rank or on both;
- `ddp_train.py --fp8` (10 steps, calibrated at the start, recalibrated at step 5) under DDP, under
  Accelerate's FSDP2 path and in one process.

Weights are compared per tensor as max|a − b| / max(max|b|, 1): relative to the tensor, but never
to a scale below 1 — the unit scale every trained tensor has (Ŵ by construction; norm gains).
The floor matters for GPT-2's attention key bias: it starts at zero and its gradient is zero in
exact arithmetic (softmax ignores a shift of all scores), so Adam turns rounding noise into
≈1e-5 moves that differ between any two summation orders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_unitscale
from hf_unitscale.recipe import RECIPES_DIR

from tiny_models import CASES_BY_ID

pytestmark = pytest.mark.distributed

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / "distributed"
REPO = TESTS.parent
BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT = 240  # seconds per launch; a hung collective fails the test instead of the CI run
RTOL = 1e-4
FP8_RUN = ("--fp8", "--steps", "10")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_distributed_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fsdp2_train = _load_script("fsdp2_train")
calibrate_ranks = _load_script("calibrate_ranks")


class Launch:
    """One subprocess (torchrun with `nproc` > 1, plain python otherwise), started now, waited for on demand."""

    def __init__(self, script: str, out: Path, nproc: int, *args: str) -> None:
        self.out = out
        script_path = str(SCRIPTS / script)
        if nproc > 1:
            # --standalone: a rendezvous on a free localhost port, so concurrent runs never collide
            cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), script_path]
        else:
            cmd = [sys.executable, script_path]
        cmd += ["--out", str(out), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
        self.cmd = cmd
        self.start = time.perf_counter()
        self.log = open(out.parent / f"{out.name}.log", "w+")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.seconds: float | None = None

    def wait(self) -> Path:
        if self.seconds is None:
            try:
                self.process.wait(timeout=max(1.0, LAUNCH_TIMEOUT - (time.perf_counter() - self.start)))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.seconds = time.perf_counter() - self.start
            self.log.seek(0)
            self.output = self.log.read()
            self.log.close()
        if self.process.returncode != 0:
            pytest.fail(
                f"{' '.join(self.cmd)} exited with {self.process.returncode} after {self.seconds:.0f} s:\n"
                f"{self.output[-6000:]}"
            )
        return self.out


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    runs = {
        "ddp": Launch("ddp_train.py", root / "ddp", 2, "--per-device-batch", "2", "--steps", "20", "--resume-at", "10"),
        "single": Launch("ddp_train.py", root / "single", 1, "--per-device-batch", "4", "--steps", "20"),
        "fsdp2": Launch("fsdp2_train.py", root / "fsdp2", 2),
        "trainer_fsdp2": Launch(
            "ddp_train.py",
            root / "trainer_fsdp2",
            2,
            *("--per-device-batch", "2", "--steps", "20", "--accelerate-fsdp2", "--resume-at", "10"),
        ),
        "calibrate": Launch("calibrate_ranks.py", root / "calibrate", 2),
        "ddp_fp8": Launch("ddp_train.py", root / "ddp_fp8", 2, *FP8_RUN, "--per-device-batch", "2"),
        "trainer_fsdp2_fp8": Launch(
            "ddp_train.py", root / "trainer_fsdp2_fp8", 2, *FP8_RUN, "--per-device-batch", "2", "--accelerate-fsdp2"
        ),
        "single_fp8": Launch("ddp_train.py", root / "single_fp8", 1, *FP8_RUN, "--per-device-batch", "4"),
    }
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
        run.process.wait()


def _result(run: Launch, *parts: str) -> dict:
    return json.loads(run.wait().joinpath(*parts, "result.json").read_text())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max(max|b|, 1), in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def _compare_state_dicts(actual: dict, expected: dict, what: str) -> dict[str, float]:
    assert actual.keys() == expected.keys(), f"{what}: keys differ: {sorted(actual.keys() ^ expected.keys())}"
    differences = {k: _relative(actual[k], expected[k]) for k in expected}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= RTOL, f"{what}: `{worst}` differs by {differences[worst]:.3g} relative"
    return differences


def _assert_losses_match(actual: list[float], expected: list[float], what: str, rtol: float = RTOL) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} logged steps, expected {len(expected)}"
    worst = max(abs(a - b) / abs(b) for a, b in zip(actual, expected, strict=True))
    assert worst <= rtol, f"{what}: values differ by up to {worst:.3g} relative\n{actual}\n{expected}"


# ---- DDP through UnitScaleTrainer ----


def test_ddp_run_really_is_distributed(launches):
    result = _result(launches["ddp"])
    assert result["distributed_type"].endswith("MULTI_CPU"), result
    assert result["backend"] == "gloo", result
    assert result["wrapped_in_ddp"], f"model_wrapped is {result['wrapper']}, not DistributedDataParallel"
    assert result["world_size"] == result["num_processes"] == 2, result
    single = _result(launches["single"])
    assert single["distributed_type"].endswith(".NO") and single["world_size"] == 1, single
    assert result["global_batch"] == single["global_batch"] == 4


def test_ddp_losses_match_single_process(launches):
    ddp, single = _result(launches["ddp"]), _result(launches["single"])
    assert ddp["steps"] == single["steps"] == list(range(1, 21))
    _assert_losses_match(ddp["losses"], single["losses"], "DDP vs one process")
    _assert_losses_match(ddp["grad_norms"], single["grad_norms"], "plain gradient norms, DDP vs one process")
    assert max(ddp["grad_norms"]) > 0.5, "max_grad_norm=0.5 never clipped: the clipping path went untested"


@pytest.mark.parametrize("checkpoint", ["run/checkpoint-20", "final"])
def test_ddp_checkpoint_equals_single_process(launches, checkpoint):
    ddp_dir = launches["ddp"].wait() / checkpoint
    single_dir = launches["single"].wait() / checkpoint
    ddp = load_file(ddp_dir / "unit_scaled_model.safetensors")
    single = load_file(single_dir / "unit_scaled_model.safetensors")
    _compare_state_dicts(ddp, single, f"{checkpoint}, DDP vs one process")
    for name, tensor in ddp.items():
        if name.endswith(("_scale", "input_scale", "grad_scale")):  # s, a, c: set at conversion, never trained
            assert torch.equal(tensor, single[name]), name
    loaded = hf_unitscale.from_pretrained(ddp_dir)
    state = loaded.state_dict()
    for name, tensor in ddp.items():
        assert torch.equal(state[name], tensor), name


# ---- UnitScaleTrainer through Accelerate's FSDP2 path ----


def test_trainer_fsdp2_matches_single_process(launches):
    result, single = _result(launches["trainer_fsdp2"]), _result(launches["single"])
    assert result["distributed_type"].endswith(".FSDP"), result
    assert result["wrapper"] == "FSDPGPT2LMHeadModel" and result["world_size"] == 2, result
    assert result["parameter_types"] == ["DTensor"], result["parameter_types"]
    # built before sharding, re-pointed by Accelerate: the same groups and lrs, holding the DTensors
    assert result["optimizer_groups_cover_model"] is True, result["optimizer_groups_cover_model"]
    assert result["optimizer_groups"] == single["optimizer_groups"]
    _assert_losses_match(result["losses"], single["losses"], "Trainer FSDP2 vs one process")
    _assert_losses_match(result["grad_norms"], single["grad_norms"], "plain gradient norms, FSDP2 vs one process")


@pytest.mark.parametrize("checkpoint", ["run/checkpoint-20", "final"])
def test_trainer_fsdp2_checkpoint_weights_equal_single_process(launches, checkpoint):
    sharded = load_file(launches["trainer_fsdp2"].wait() / checkpoint / "unit_scaled_model.safetensors")
    single = load_file(launches["single"].wait() / checkpoint / "unit_scaled_model.safetensors")
    _compare_state_dicts({k: sharded[k] for k in single}, single, f"{checkpoint}, Trainer FSDP2 vs one process")


def test_trainer_fsdp2_checkpoint_names_the_architecture(launches):
    final = launches["trainer_fsdp2"].wait() / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    hf_unitscale.from_pretrained(final)


def test_trainer_fsdp2_checkpoint_stores_tied_weight_once(launches):
    final = launches["trainer_fsdp2"].wait() / "final"
    sharded = load_file(final / "unit_scaled_model.safetensors")
    single = load_file(launches["single"].wait() / "final" / "unit_scaled_model.safetensors")
    assert sharded.keys() == single.keys()
    assert "transformer.wte.weight" in sharded and "lm_head.weight" not in sharded  # GPT-2's tied Ŵ, once
    loaded = hf_unitscale.from_pretrained(final)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # and tied again on load


# ---- resuming a distributed run ----


@pytest.mark.parametrize("run", ["ddp", "trainer_fsdp2"])
def test_resume_continues_the_same_run(launches, run):
    """Resumed from the full checkpoint of step 10 (Ŵ, s, a, c; optimizer, scheduler, RNG) in fresh trainers on
    both ranks, steps 11–20 log the same losses and gradient norms and end at the same weights, bit for bit."""
    out = launches[run].wait()
    result = _result(launches[run])
    assert {"optimizer.bin", "optimizer.pt"} & set(os.listdir(out / "run" / "checkpoint-10")), "no optimizer state"
    resumed = result["resumed"]
    assert resumed["steps"] == list(range(11, 21)), resumed["steps"]
    assert resumed["losses"] == result["losses"][10:], f"{run}: resumed losses differ"
    assert resumed["grad_norms"] == result["grad_norms"][10:], f"{run}: resumed gradient norms differ"
    final = load_file(out / "final" / "unit_scaled_model.safetensors")
    final_resumed = load_file(out / "final_resumed" / "unit_scaled_model.safetensors")
    assert final.keys() == final_resumed.keys()
    different = [name for name in final if not torch.equal(final[name], final_resumed[name])]
    assert not different, f"{run}: resumed weights differ from the uninterrupted run in {different[:5]}"


# ---- FSDP2 with torch's fully_shard ----


@pytest.fixture(scope="module")
def fsdp2_reference():
    """{case: (model, losses, grad norms)} of the single-process run, computed while the launches run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the launches use the other core; OpenMP barriers crawl when oversubscribed
    try:
        return {case: fsdp2_train.train_case(case) for case in fsdp2_train.CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case_id", list(fsdp2_train.CASES))
def test_fsdp2_training_matches_single_process(launches, fsdp2_reference, case_id):
    result = _result(launches["fsdp2"], case_id)
    model, losses, grad_norms = fsdp2_reference[case_id]
    assert result["world_size"] == 2
    assert result["tied"] == CASES_BY_ID[case_id].tied
    # Trainer builds the optimizer before sharding: every group held stale tensors until re-pointed
    assert result["stale_groups_before_repoint"] == result["groups"] > 1
    _assert_losses_match(result["losses"], losses, f"{case_id}: FSDP2 vs one process")
    _assert_losses_match(result["grad_norms"], grad_norms, f"{case_id}: plain gradient norms")
    gathered = load_file(launches["fsdp2"].wait() / case_id / "gathered.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if k in gathered}
    tied_alias = {"lm_head.weight"} if CASES_BY_ID[case_id].tied else set()
    assert set(model.state_dict()) - set(gathered) == tied_alias
    _compare_state_dicts(gathered, expected, f"{case_id}: gathered FSDP2 weights vs one process")


@pytest.mark.parametrize("case_id", list(fsdp2_train.CASES))
def test_fsdp2_full_checkpoints_load(launches, fsdp2_reference, case_id):
    import transformers

    case_dir = launches["fsdp2"].wait() / case_id
    reference = fsdp2_reference[case_id][0].eval()
    batch = CASES_BY_ID[case_id].batch(batch_size=2, seq_len=12, seed=5)
    with torch.no_grad():
        expected = reference(**batch).logits

    unit_scaled = hf_unitscale.from_pretrained(case_dir / "unit-scaled")
    gathered = load_file(case_dir / "gathered.safetensors")
    state = unit_scaled.state_dict()
    for name, tensor in gathered.items():  # exactly the gathered Ŵ, s, a, c
        assert torch.equal(state[name], tensor), name
    architecture = type(reference).__name__
    for fmt in ("unit-scaled", "merged"):
        config = json.loads((case_dir / fmt / "config.json").read_text())
        assert config["architectures"] == [architecture], f"{fmt}: {config['architectures']}"

    merged = hf_unitscale.from_pretrained(case_dir / "merged")
    plain = getattr(transformers, architecture).from_pretrained(case_dir / "merged")
    assert not hf_unitscale.is_unit_scaled(plain)
    if CASES_BY_ID[case_id].tied:
        for model in (unit_scaled, merged, plain):
            assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    for name, model in (("unit-scaled", unit_scaled), ("merged", merged), ("plain transformers", plain)):
        with torch.no_grad():
            logits = model.eval()(**batch).logits
        assert _relative(logits, expected) <= RTOL, f"{case_id}, {name}: logits differ by {_relative(logits, expected)}"


# ---- calibration over ranks ----


def test_calibration_pools_every_ranks_batch_and_leaves_ranks_equal(launches):
    """Two ranks, each with its own batch, end with the scales of both batches calibrated in one process:
    a² = mean over batches of their mean squares (likewise c), peaks max|x| the max over batches; with an underflow
    budget and the input rounding search, the scales of one process calibrating on both batches."""
    result = _result(launches["calibrate"])
    assert result["world_size"] == 2
    first, second = result["tables"]
    assert first == second
    alone = [
        hf_unitscale.calibrate(calibrate_ranks.model(), [calibrate_ranks.batch(r)], progress=False) for r in (0, 1)
    ]
    assert alone[0] != alone[1]  # the ranks really saw different data
    for name, row in first.items():
        for operand, scale in (("input", "input_scale"), ("grad", "grad_scale")):
            expected = ((alone[0][name][f"{operand}_rms"] ** 2 + alone[1][name][f"{operand}_rms"] ** 2) / 2) ** 0.5
            assert row[scale] == pytest.approx(expected, rel=1e-6), (name, operand)
            raw_peaks = [table[name][f"{operand}_peak"] * table[name][scale] for table in alone]
            assert row[f"{operand}_peak"] * row[scale] == pytest.approx(max(raw_peaks), rel=1e-6), (name, operand)
    # with an underflow budget and the input rounding search the ranks' exponent histograms and cast errors are
    # summed: the scales of one process seeing both batches
    searched = result["searched_tables"]
    assert searched[0] == searched[1]
    both = hf_unitscale.calibrate(
        calibrate_ranks.model(),
        [calibrate_ranks.batch(0), calibrate_ranks.batch(1)],
        **calibrate_ranks.SEARCH_OPTIONS,
        progress=False,
    )
    lowered = [name for name in both if both[name]["grad_scale"] < first[name]["grad_scale"]]
    assert lowered, "the budget lowered no scale: the test would not see the histograms"
    moved = [name for name in both if both[name]["input_scale"] != pytest.approx(first[name]["input_scale"])]
    assert moved, "the search moved no input scale: the test would not see the cast errors"
    for name, row in searched[0].items():
        for scale in ("input_scale", "grad_scale"):
            assert row[scale] == pytest.approx(both[name][scale], rel=1e-6), (name, scale)


def test_calibration_with_a_rank_without_batches_takes_the_others(launches):
    """A rank whose share of the calibration batches is empty still joins the collectives: every rank ends with
    the scales of the batches that exist, and with none anywhere every rank raises (no rank hangs in gloo)."""
    result = _result(launches["calibrate"])
    first, second = result["uneven_tables"]
    assert first == second
    alone = hf_unitscale.calibrate(calibrate_ranks.model(), [calibrate_ranks.batch(0)], progress=False)
    for name, row in first.items():
        for scale in ("input_scale", "grad_scale"):
            assert row[scale] == pytest.approx(alone[name][scale], rel=1e-6), (name, scale)
    assert result["uneven_record"]["num_batches"] == 1
    assert "yielded no batch" in result["none_error"]


# ---- FP8 training under DDP and FSDP2 ----


@pytest.mark.parametrize("run", ["ddp_fp8", "trainer_fsdp2_fp8"])
def test_fp8_training_matches_single_process(launches, run):
    """FP8 matmuls with static scales (calibration pooled over ranks, kept identical on every rank: the script
    checks the buffers) train as one process does. The first step's gradient matches like fp32's; later steps
    drift a little more, because summing in another order now and then moves a value across an FP8 rounding
    boundary, and Adam's first steps turn that into a different update of the near-zero gradients."""
    result, single = _result(launches[run]), _result(launches["single_fp8"])
    sharded = run == "trainer_fsdp2_fp8"
    assert result["world_size"] == 2, result
    assert result["wrapper"] == ("FSDPGPT2LMHeadModel" if sharded else "DistributedDataParallel"), result["wrapper"]
    assert result["parameter_types"] == (["DTensor"] if sharded else ["Parameter"]), result["parameter_types"]
    _assert_losses_match(result["grad_norms"][:1], single["grad_norms"][:1], f"{run}: first gradient norm")
    _assert_losses_match(result["losses"], single["losses"], f"{run}: FP8 losses", rtol=1e-3)
    # c is what training's gradients meet on each rank: calibration counts `num_items_in_batch` over the
    # processes and scales the loss by them as Trainer's `compute_loss` does
    for name, ratio in {**result["first_step_grad_to_scale"], **single["first_step_grad_to_scale"]}.items():
        assert 0.7 < ratio < 1.4, (run, name, ratio)
    assert len(result["first_step_grad_to_scale"]) == len(single["first_step_grad_to_scale"]) > 0


@pytest.mark.parametrize("run", ["ddp_fp8", "trainer_fsdp2_fp8"])
def test_fp8_cast_fractions_count_every_rank(launches, run):
    """The logged saturation/underflow fractions count the casts of the global batch, summed over ranks: at the
    first step (same weights, same data) they equal one process's exactly. Rank 0's own counts alone gave
    fractions 3–15% off."""
    result, single = _result(launches[run]), _result(launches["single_fp8"])
    first, expected = result["cast_fractions"][0], single["cast_fractions"][0]
    assert expected.keys() == first.keys() and len(expected) == 12, sorted(expected)
    assert any(v > 0 for k, v in expected.items() if "grad_output" in k), "no gradient element flushed: nothing tested"
    assert first == expected


# ---- the Accelerate configs of hf_unitscale/recipes/accelerate ----


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_accelerate_config_is_what_accelerate_launch_reads(name, monkeypatch):
    """Each config goes through `accelerate launch`'s own validation and environment, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    config_file = RECIPES_DIR / "accelerate" / f"{name}.yaml"
    argv = ["--config_file", str(config_file), "-m", "hf_unitscale.cli", "train", "causal_lm"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    env = prepare_multi_gpu_env(args)
    assert args.num_processes == 2 and env["ACCELERATE_MIXED_PRECISION"] == "no"
    if name == "ddp":
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
        return
    assert args.use_fsdp and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # save_model gathers Ŵ and s for our formats
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert not plugin.cpu_ram_efficient_loading
