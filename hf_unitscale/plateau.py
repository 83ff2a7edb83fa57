"""`SharedFactorReduceLROnPlateau`: `ReduceLROnPlateau` for parameter groups whose lrs follow one schedule.

`build_param_groups` gives each group its own lr `base_lr` (η/s under `equivalent`), and a schedule multiplies
them all by the same factor f: group lr = base_lr·f, the lr on W = s·Ŵ is η·f, what plain Trainer's schedule
holds. torch's `ReduceLROnPlateau` decides on each group's own lr instead: it skips a reduction when
old - new ≤ `eps` (absolute, 1e-8), so a group with lr η/s > η (s < 1, most pretrained weights) keeps being
reduced after plain Trainer's η·f has stopped, one with s > 1 stops before it, and `min_lr` bounds η/s rather than
η·f. Here each group's lr is read as the schedule lr it stands for, L = lr / r with r = base_lr/η:

    L_new = max(factor·L, min_lr),   applied when L - L_new > eps,   lr_new = L_new·r

the decision and the bound of plain `ReduceLROnPlateau` on η·f. With power-of-two scales r = 1/s is a power of two,
so every L is plain's lr bit for bit. A group without `base_lr` (not built by `build_param_groups`) has r = 1, as in
torch; a group whose `base_lr` is 0 stays at 0.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = ["SharedFactorReduceLROnPlateau", "lr_ratio"]


def lr_ratio(group: dict, base: float) -> float:
    """r = base_lr/η, the factor between a group's lr and the schedule lr η·f it follows (1/s under `equivalent`);
    1 for a group without `base_lr`. L = lr/r is then plain Trainer's lr, bit for bit when r is a power of two."""
    return group["base_lr"] / base if "base_lr" in group else 1.0


class SharedFactorReduceLROnPlateau(ReduceLROnPlateau):
    """`ReduceLROnPlateau` whose `eps` and `min_lr` apply to the schedule lr η·f that every group's lr base_lr·f
    follows (η = `optimizer.defaults["lr"]`). Takes `ReduceLROnPlateau`'s arguments; `min_lr` is one number."""

    def __init__(self, optimizer: Optimizer, *, min_lr: float = 0.0, **kwargs) -> None:
        if isinstance(min_lr, list | tuple):
            raise ValueError(
                f"`min_lr` of `reduce_lr_on_plateau` should be one number, the floor of the schedule's lr η·f that "
                f"every parameter group follows (group lr = base_lr·f), got a list of {len(min_lr)}."
            )
        super().__init__(optimizer, min_lr=min_lr, **kwargs)

    def _reduce_lr(self, epoch) -> None:
        """One reduction of every group, decided on the schedule lr it stands for: L = lr/r (r = `lr_ratio`),
        L_new = max(factor·L, min_lr), applied when L - L_new > eps: lr_new = L_new·r. A group whose base_lr is 0
        stays at 0."""
        # Overrides torch's private `ReduceLROnPlateau._reduce_lr(self, epoch)`, which `step` calls after `patience`
        # steps without improvement and which applies that rule to each group's own lr (bound `min_lrs[i]`). Checked
        # against torch 2.13's source (attributes read here: `factor`, `eps`, `default_min_lr`). Were torch to rename
        # the method, its per-group rule would run instead: the plateau tests of tests/test_trainer.py would fail.
        base = self.optimizer.defaults["lr"]  # η
        min_lr = self.default_min_lr
        for group in self.optimizer.param_groups:
            if group.get("base_lr", 1.0) == 0:  # η = 0 or an `lr_multipliers` factor of 0: stays 0
                continue
            ratio = lr_ratio(group, base)
            schedule_lr = float(group["lr"]) / ratio  # L
            reduced = max(schedule_lr * self.factor, min_lr)
            if schedule_lr - reduced > self.eps:
                group["lr"] = reduced * ratio
