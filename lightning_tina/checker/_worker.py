"""Entry point of one checker worker process: ``python _worker.py READ_FD WRITE_FD``.

It is started as a plain script (not through ``multiprocessing``) so that it never re-imports the parent's
``__main__`` (a training script that loads torch and vLLM), and it registers a bare ``lightning_tina`` package so
that ``lightning_tina/__init__.py`` is not executed either: the worker only loads math-verify and sympy.

Protocol on the two pipes (``multiprocessing.connection`` framing, pickled objects): the worker sends
``"ready"`` once imports are done, then answers every job tuple ``(completion, gold, mode, grader, letters)``
with a ``grade.GradeResult``; ``None`` or a closed pipe ends it. The parent kills it on timeout.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from pathlib import Path


def _watch_parent(parent_pid: int) -> None:
    """Exit if the parent dies while we are stuck in a long computation (pipe EOF is not seen then)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _limit_memory(limit_mb: int) -> None:
    """Cap the address space so that a runaway sympy computation raises MemoryError instead of swapping."""
    if limit_mb <= 0:
        return
    import resource

    limit = limit_mb * 1024 * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main() -> None:
    """Serve grading jobs until the pipe closes."""
    read_fd, write_fd, limit_mb = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    package_dir = Path(__file__).resolve().parents[1]
    sys.path[0] = str(package_dir.parent)  # not the checker folder: its module names must not shadow others
    bare = types.ModuleType("lightning_tina")
    bare.__path__ = [str(package_dir)]  # type: ignore[attr-defined]
    sys.modules["lightning_tina"] = bare

    import warnings
    from multiprocessing.connection import Connection

    from lightning_tina.checker.grade import _mv, grade

    _mv()  # import math-verify and sympy before saying "ready", so job time excludes imports
    # Only now: importing sympy installs its own warning filters, and its deprecation chatter on odd inputs
    # would flood the trainer's stderr.
    warnings.simplefilter("ignore")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    _limit_memory(limit_mb)
    reader, writer = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    writer.send("ready")
    while True:
        try:
            job = reader.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            result = grade(*job)
        except MemoryError:
            result = (False, None, "error")
        writer.send(result)


if __name__ == "__main__":
    main()
