"""Persistent checker worker processes with a hard per-check time limit that works from any thread.

math-verify's own timeout uses ``signal.alarm``, which raises off the main thread (one RL codebase turned
that into "every math reward is 0"). Here every check runs in a worker process; the calling thread waits on
the worker's pipe with a deadline and, when the deadline passes, kills the worker (SIGKILL also stops C-level
loops such as big-integer powers) and starts a fresh one. A timed-out check is a verdict, never a hang.

Workers are started as plain scripts (``_worker.py``), kept between calls, and shared by all threads of
the process: a call takes up to ``workers`` idle ones, creating new ones while fewer than ``max_workers``
exist. A replacement worker's start-up (about one second of imports) is not counted against any check.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_S = 120.0  # a worker that cannot import math-verify in this time means a broken environment
MAX_START_FAILURES = 3  # consecutive start failures before check() gives up with an error
DEFAULT_MEMORY_LIMIT_MB = 2048  # address-space cap of one worker (an idle one maps ~140 MB)
_WORKER_SCRIPT = Path(__file__).with_name("_worker.py")

Job = tuple[str, str, str, "bool | str", str]  # (completion, gold, mode, strict or grader name, letters)
Result = tuple[bool, "str | None", str]  # (correct, extracted, status)


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Worker:
    """One worker process and the two pipe ends the parent holds."""

    def __init__(self, memory_limit_mb: int) -> None:
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, str(_WORKER_SCRIPT), str(job_r), str(res_w), str(memory_limit_mb)],
            pass_fds=(job_r, res_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        os.close(job_r)
        os.close(res_w)
        self.jobs = Connection(job_w, readable=False)
        self.results = Connection(res_r, writable=False)
        self.ready = False
        self.started = time.monotonic()

    def kill(self) -> None:
        """Stop the process now and release its pipes."""
        self.proc.kill()
        self.proc.wait()
        self.jobs.close()
        self.results.close()

    def close(self) -> None:
        """Ask the process to exit; kill it if it does not within a second."""
        try:
            self.jobs.send(None)
            self.proc.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class CheckerPool:
    """Worker processes that grade jobs with a wall-clock limit per job; safe to call from many threads."""

    def __init__(
        self, max_workers: int | None = None, memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB
    ) -> None:
        self.max_workers = max_workers or available_cores()
        self.memory_limit_mb = memory_limit_mb
        self._idle: list[_Worker] = []
        self._total = 0
        self._cond = threading.Condition()
        self._spare: _Worker | None = None  # started after the first restart, so later restarts cost nothing
        self.restarts = 0  # workers killed and replaced after a timeout or a crash
        self._start_failures = 0  # consecutive workers that died before saying "ready"
        self.pid = os.getpid()  # a forked child must not talk to its parent's workers

    def _acquire(self, wanted: int) -> list[_Worker]:
        """Between 1 and ``wanted`` workers for this caller (waits only while every worker is busy)."""
        with self._cond:
            while not self._idle and self._total >= self.max_workers:
                self._cond.wait()
            for w in self._idle:  # notice workers that finished starting while idle, and use them first
                if not w.ready and w.results.poll(0):
                    try:
                        w.ready = w.results.recv() == "ready"
                    except (EOFError, OSError):
                        pass  # died while starting: run() reports it
            self._idle.sort(key=lambda w: not w.ready)
            taken = self._idle[:wanted]
            del self._idle[: len(taken)]
            while len(taken) < wanted and self._total < self.max_workers:
                taken.append(_Worker(self.memory_limit_mb))
                self._total += 1
            return taken

    def _release(self, workers: list[_Worker]) -> None:
        with self._cond:
            self._idle.extend(workers)
            self._cond.notify_all()

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill ``worker``; return the warm spare (or a new worker) and start the next spare."""
        worker.kill()
        with self._cond:
            self.restarts += 1
            fresh, self._spare = self._spare, _Worker(self.memory_limit_mb)
        return fresh or _Worker(self.memory_limit_mb)

    def run(self, jobs: Sequence[Job], timeout_s: float, workers: int = 1) -> list[Result]:
        """Grade ``jobs`` on up to ``workers`` processes; a job over ``timeout_s`` seconds gets status "timeout"."""
        results: list[Any] = [None] * len(jobs)
        if not jobs:
            return results
        team = self._acquire(max(1, min(workers, len(jobs))))
        pending = deque(range(len(jobs)))
        busy: dict[int, tuple[int, float]] = {}  # team index -> (job index, deadline)
        try:
            while pending or busy:
                self._dispatch(team, jobs, pending, busy, timeout_s)
                waiting = [k for k, w in enumerate(team) if k in busy or not w.ready]
                deadlines = [
                    busy[k][1] if k in busy else team[k].started + STARTUP_TIMEOUT_S for k in waiting
                ]
                readable = set(
                    wait([team[k].results for k in waiting], max(0.0, min(deadlines) - time.monotonic()))
                )
                now = time.monotonic()
                for k, deadline in zip(waiting, deadlines, strict=True):
                    if team[k].results in readable:
                        self._receive(team, k, busy, results)
                    elif now >= deadline:
                        if k not in busy:
                            raise RuntimeError(
                                f"checker worker did not start within {STARTUP_TIMEOUT_S:.0f} s"
                            )
                        results[busy.pop(k)[0]] = (False, None, "timeout")
                        team[k] = self._replace(team[k])
        except BaseException:
            for w in team:  # workers in an unknown state (mid-job, half-read pipe) must not be reused
                w.kill()
            with self._cond:
                self._total -= len(team)
                self._cond.notify_all()
            raise
        self._release(team)
        return results

    def _dispatch(
        self,
        team: list[_Worker],
        jobs: Sequence[Job],
        pending: deque[int],
        busy: dict[int, tuple[int, float]],
        timeout_s: float,
    ) -> None:
        """Send the next pending job to every ready, free worker and start its clock."""
        for k, w in enumerate(team):
            if w.ready and k not in busy and pending:
                i = pending.popleft()
                try:
                    w.jobs.send(jobs[i])
                except OSError:  # it died while idle (OOM killer, a stray signal): replace it, retry the job
                    pending.appendleft(i)
                    team[k] = self._replace(w)
                    continue
                busy[k] = (i, time.monotonic() + timeout_s)

    def _receive(
        self, team: list[_Worker], k: int, busy: dict[int, tuple[int, float]], results: list[Any]
    ) -> None:
        """Handle what worker ``k`` sent: "ready", a result, or end-of-file because it died."""
        w = team[k]
        try:
            message = w.results.recv()
        except (EOFError, OSError):
            message = None
        if message == "ready":
            w.ready = True
            self._start_failures = 0
        elif message is not None:
            results[busy.pop(k)[0]] = message
        else:
            if k in busy:  # died mid-job (killed by the OS, crashed in C code): scored wrong
                results[busy.pop(k)[0]] = (False, None, "error")
            elif not w.ready:
                self._start_failures += 1
                if self._start_failures > MAX_START_FAILURES:
                    raise RuntimeError(f"checker workers keep dying at start (exit code {w.proc.poll()})")
            team[k] = self._replace(w)

    def close(self) -> None:
        """Stop all idle workers (busy ones are stopped by their callers)."""
        if os.getpid() != self.pid:  # a forked child inherited this pool: the workers belong to its parent
            return
        with self._cond:
            idle, self._idle = self._idle, []
            self._total -= len(idle)
            if self._spare is not None:
                idle.append(self._spare)
                self._spare = None
        for w in idle:
            w.close()


_POOL: CheckerPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool() -> CheckerPool:
    """The process-wide pool, created on first use and closed at interpreter exit."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = CheckerPool()
            atexit.register(_POOL.close)
        return _POOL
