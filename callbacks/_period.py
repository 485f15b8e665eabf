"""The one name of a callback's save/evaluation period: `every_n_train_steps`, as Lightning's ModelCheckpoint."""

from __future__ import annotations

import warnings


def train_step_period(
    owner: str, every_n_train_steps: int | None, every_n_steps: int | None, default: int
) -> int:
    """The period from `every_n_train_steps`, or from the old key `every_n_steps` with a warning naming the new one."""
    if every_n_steps is not None:
        if every_n_train_steps is not None:
            raise ValueError(
                f"{owner}: every_n_steps was renamed every_n_train_steps; set only every_n_train_steps"
            )
        warnings.warn(
            f"{owner}: every_n_steps is renamed every_n_train_steps (the old key still works)",
            FutureWarning,
            stacklevel=3,
        )
        every_n_train_steps = every_n_steps
    period = default if every_n_train_steps is None else every_n_train_steps
    if period < 0:
        raise ValueError(f"{owner}: every_n_train_steps={period} must be >= 0 (0: only at the end)")
    return period
