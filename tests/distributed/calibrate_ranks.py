"""`calibrate` over gloo processes: every rank measures its own batch, and all end with the same scales.

    torchrun --standalone --nproc_per_node 2 tests/distributed/calibrate_ranks.py --out DIR

Every rank builds the same unit-scaled tiny Llama (same seed) and calibrates it on its own batch
(`batch(rank)`), plainly and with `SEARCH_OPTIONS`; then with rank 0's batch on rank 0 only, and with no
batch anywhere. Rank 0 writes `DIR/result.json`: each rank's calibration tables, rank 0's calibration record
and error, and the world size. The test compares them with single-process calibrations: the
pooled RMS is sqrt(mean over ranks' batches of their mean squares), the peak the max over ranks, and
the budgeted and searched scales those of one process calibrating on every rank's batch (exponent histograms
and cast errors summed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from hf_unitscale import unit_scale  # noqa: E402
from hf_unitscale.calibrate import calibrate  # noqa: E402

from tiny_models import CASES_BY_ID  # noqa: E402

CASE = "llama-untied"
# options whose statistics are summed over ranks: exponent histograms (budget), cast errors (search)
SEARCH_OPTIONS = {"grad_underflow_budget": 1e-3, "input_rounding_search": True}


def model():
    torch.manual_seed(0)
    return unit_scale(CASES_BY_ID[CASE].model())


def batch(rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s labelled batch (different data on every rank)."""
    rows = CASES_BY_ID[CASE].batch(batch_size=2, seq_len=16, seed=rank + 1)
    return {**rows, "labels": rows["input_ids"].masked_fill(rows["attention_mask"] == 0, -100)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world_size": world}
    for key, options in (("tables", {}), ("searched_tables", SEARCH_OPTIONS)):
        table = calibrate(model(), [batch(rank)], progress=False, **options)
        result[key] = [None] * world
        dist.all_gather_object(result[key], table)
    # uneven shares: only rank 0 has a batch, then no rank has one
    calibrated = model()
    result["uneven_tables"] = [None] * world
    table = calibrate(calibrated, [batch(0)] if rank == 0 else [], progress=False)
    dist.all_gather_object(result["uneven_tables"], table)
    result["uneven_record"] = calibrated.config.unit_scaling["calibration"]
    try:
        calibrate(model(), [], progress=False)
        result["none_error"] = None
    except ValueError as error:
        result["none_error"] = str(error)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
