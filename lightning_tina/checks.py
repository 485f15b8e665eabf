"""Settings check themselves when built (`__post_init__`), one message per field that names its config key."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_fields(section: str, settings: Any, checks: Iterable[tuple[str, bool, str]]) -> None:
    """Raise a ValueError for the first failing (field, valid, requirement): `<section>.<field>=<value> must be ...`."""
    for key, ok, need in checks:
        if not ok:
            raise ValueError(f"{section}.{key}={getattr(settings, key)!r} must be {need}")
