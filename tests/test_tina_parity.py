"""The parity harness against Tina's own code (parity/run.py), on demand only: it needs Tina's environment
(`bash parity/setup_env.sh`) and a checkout of Tina named by TINA_DIR, and is marked slow.

    TINA_DIR=PATH_TO_TINA .venv/bin/python -m pytest -m slow tests/test_tina_parity.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINA_PYTHON = ROOT / "parity" / ".venv-tina" / "bin" / "python"


@pytest.mark.slow
def test_objective_and_prompts_match_tinas_code(tmp_path):
    tina_dir = os.environ.get("TINA_DIR")
    if not tina_dir or not TINA_PYTHON.exists():
        pytest.skip("needs TINA_DIR (a checkout of Tina) and parity/.venv-tina (bash parity/setup_env.sh)")
    cmd = [sys.executable, str(ROOT / "parity" / "run.py"), "--tina-dir", tina_dir, "--out", str(tmp_path),
           "--only", "objective,prompts"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for part in ("objective", "objective_checkpointing"):
        assert summary[part]["advantages_max_abs_diff"] == 0.0
        assert summary[part]["loss_rel_diff"] <= 1e-5 and summary[part]["grad_max_rel_diff"] <= 1e-5
    assert len(summary["prompts"]["formats"]) == 11 and summary["prompts"]["pass"]
