"""`torch.compile` takes a unit-scaled model, FP8 casts and cast counters included, as one graph.

Fusing the casts and scale multiplies around the GEMMs takes `torch.compile`
(`TrainingArguments(torch_compile=True)`); a graph break at every layer would leave them as separate
kernels. So the test compiles with `fullgraph=True`, which raises on any break.
"""

import pytest
import torch

from hf_unitscale import calibrate, cast_statistics, set_precision, track_casts, unit_scale

from tiny_models import CASES_BY_ID


def _loss_grads_counts(model, batch, forward):
    """Loss of `forward(**batch)`, then `model`'s gradients and cast counts (counters reset)."""
    model.zero_grad(set_to_none=True)
    loss = forward(**batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, cast_statistics(model, reset=True)


@pytest.mark.parametrize("backend", [None, "simulate", "scaled_mm"])
@pytest.mark.parametrize("case_id", ["bert", "gpt2", "llama-tied"])
def test_compiled_training_step_matches_eager_in_one_graph(case_id, backend):
    """fullgraph compile of forward and backward; loss, every gradient and every cast count equal eager's."""
    case = CASES_BY_ID[case_id]
    model = unit_scale(case.model())
    batch = case.batch()
    batch["labels"] = torch.tensor([0, 1]) if case_id == "bert" else batch["input_ids"]
    # GPT2LMHeadModel sets no `loss_type`; transformers then logs a warning on every call, itself a graph break
    if case_id == "gpt2":
        model.loss_type = "ForCausalLM"
    if backend is not None:
        set_precision(model, "e4m3", "e5m2", backend)
        calibrate(model, [batch], progress=False)
    track_casts(model)
    model.train()
    eager = _loss_grads_counts(model, batch, model)

    torch._dynamo.reset()
    compiled = _loss_grads_counts(model, batch, torch.compile(model, fullgraph=True))

    assert compiled[0] == pytest.approx(eager[0], rel=1e-6)
    assert compiled[1].keys() == eager[1].keys()
    # relative to the largest gradient too: a key bias's gradient is exactly zero in exact arithmetic (softmax
    # ignores a shift shared by all keys), so it is rounding residue that any change of summation order moves
    largest = max(grad.norm() for grad in eager[1].values())
    for name, grad in eager[1].items():
        error = ((compiled[1][name] - grad).norm() / torch.maximum(grad.norm(), 1e-4 * largest)).item()
        assert error < 1e-5, f"{name}: compiled gradient differs from eager by {error:.2e}"
    assert compiled[2] == eager[2]
    if backend is not None:  # the counters really counted, in forward and backward
        first = next(iter(compiled[2].values()))
        assert first["input"]["seen"] > 0 and first["grad_output"]["seen"] > 0
