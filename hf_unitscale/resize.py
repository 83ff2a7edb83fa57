"""`model.resize_token_embeddings` for a unit-scaled model: new vocabulary rows in Ŵ units, the head still s·Ŵ.

transformers resizes the input embedding in place (the module keeps its class and its scale s) but copies an
untied output head into a new plain `nn.Linear`, which would compute with Ŵ as if it were W. The new head takes
the old head's class and buffers (s, a, c) and its precision. New rows are drawn either from the old rows' mean
and covariance (`mean_resizing=True`, transformers' default: already Ŵ units) or by `_init_weights` for W
(`mean_resizing=False`): those are divided by s, so the new W = s·Ŵ rows are what the plain model would draw.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .modules import UnitScaledModuleMixin
from .ops import apply_scale

__all__ = ["resize_token_embeddings"]


def _adopt_conversion(new: nn.Module, old: UnitScaledModuleMixin) -> None:
    """Give `new` (a plain copy transformers made of `old`) `old`'s unit-scaled class, scale buffers and precision."""
    for name, buffer in old._buffers.items():
        if buffer is not None:
            new.register_buffer(name, buffer.detach().clone().to(new.weight.device))
    for attribute in ("precision", "cast_counters"):
        if attribute in old.__dict__:
            setattr(new, attribute, old.__dict__[attribute])
    new.__class__ = type(old)


def resize_token_embeddings(
    model: PreTrainedModel,
    new_num_tokens: int | None = None,
    pad_to_multiple_of: int | None = None,
    mean_resizing: bool = True,
) -> nn.Embedding:
    """`PreTrainedModel.resize_token_embeddings`, keeping W = s·Ŵ for the embedding and the head (see above)."""
    old_rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    embeddings = PreTrainedModel.resize_token_embeddings(model, new_num_tokens, pad_to_multiple_of, mean_resizing)
    new_head = model.get_output_embeddings()
    if isinstance(head, UnitScaledModuleMixin) and new_head is not head and not isinstance(new_head, type(head)):
        _adopt_conversion(new_head, head)
    if not mean_resizing:
        resized = {id(m.weight): m for m in (embeddings, new_head) if isinstance(m, UnitScaledModuleMixin)}
        with torch.no_grad():
            for module in resized.values():
                module.weight[old_rows:] = apply_scale(module.weight[old_rows:], module.scale_of("weight"), divide=True)
    return embeddings
