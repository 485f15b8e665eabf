"""The optimizer and learning-rate schedule: AdamW over the trainable (LoRA) parameters, warmup then cosine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_tina.checks import check_fields


@dataclass
class OptimSettings:
    """AdamW and its schedule. Defaults are Tina's (its recipes: lr 1e-6, warmup 10%, cosine to 10%)."""

    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.1
    """Fraction of all optimizer steps spent in linear warmup from 0."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last step (HF's cosine_with_min_lr)."""
    schedule_steps: int | None = None
    """Length of the warmup-cosine schedule in optimizer steps; None: trainer.max_steps. Tina's recipes schedule
    over N steps but were stopped at M < N (e.g. open_rs3: 1500 and 850); its configs set both."""

    def __post_init__(self) -> None:
        check_fields("model.optim", self, self._checks())

    def _checks(self) -> list[tuple[str, bool, str]]:
        """(field, valid, what it must be): one message per field."""
        return [
            ("lr", self.lr >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("betas", all(0 <= b < 1 for b in self.betas), "two values in [0, 1)"),
            ("eps", self.eps > 0, "> 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio <= 1, "in [0, 1]"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            (
                "schedule_steps",
                self.schedule_steps is None or self.schedule_steps >= 1,
                "at least 1, or null",
            ),
        ]


def warmup_cosine_factor(step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """The lr multiplier at optimizer step `step` (0-based), as Hugging Face's cosine_with_min_lr schedule.

    warmup W = ceil(warmup_ratio * total): factor = step / W for step < W;
    then with p = (step - W) / (total - W): factor = m + (1 - m) * (1 + cos(pi * p)) / 2, m = min_lr_ratio.
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    params: list[torch.nn.Parameter], settings: OptimSettings, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `params` (only trainable ones: frozen weights get no optimizer state) and its schedule."""
    if not params:
        raise ValueError("no trainable parameters: check model.lora.target_modules (or enable LoRA)")
    opt = torch.optim.AdamW(
        params, lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine_factor(s, total_steps, settings.warmup_ratio, settings.min_lr_ratio)
    )
    return opt, sched
