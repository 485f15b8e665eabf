"""Model locations: a local directory or a hub id, told apart before any library tries to load them."""

from __future__ import annotations

from pathlib import Path


def looks_local(name: str) -> bool:
    """True for what can only be a path (starts with /, . or ~, or has more than one /): a hub id is owner/name."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_model_path(name: str, key: str) -> str:
    """`name` unchanged, or a one-line error naming `key` when it is a local path with no directory behind it (the
    hub client would otherwise answer "Repo id must be in the form ...")."""
    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(
            f"{key}: no such directory {name!r} (give a model directory or a hub id owner/name)"
        )
    return name
