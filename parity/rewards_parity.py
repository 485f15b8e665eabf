"""Reward parity, one command: Tina's reward functions (its own code, its pins) against lightning_tina's in Tina mode.

    python parity/rewards_parity.py --tina-dir PATH_TO_TINA_CHECKOUT --out DIR

Steps (each its own process, so each side runs in its own environment):
1. ``rewards_cases.py`` (any Python): case groups from ../shared/benchmarks rows plus generated completions;
2. ``rewards_tina.py`` with ``parity/.venv-tina/bin/python`` (math-verify 0.5.2, latex2sympy2_extended 1.0.6,
   trl 0.15.2; ``parity/setup_env.sh`` builds it): Tina's functions, called per group as Tina's trainer did;
3. ``rewards_ours.py`` with the project's ``.venv/bin/python``: ``lightning_tina.rewards`` with every Tina
   recipe's ``model.rewards`` kwargs;
4. here (stdlib only): per function and recipe entry, the share of completions whose values are equal (within
   1e-9; None equals None only). Exit status 1 if any entry is under ``--min-agreement`` (0.995).

Writes DIR/cases.json, tina.json, ours.json, report.json, report.md and disagreements.jsonl (every differing
completion with both values, for debugging). Needs no GPU and no network; a few minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOL = 1e-9


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= TOL


def compare(
    cases: dict[str, Any], tina: dict[str, Any], ours: dict[str, Any]
) -> tuple[list[dict], list[dict]]:
    """(one row per recipe entry with its agreement, every disagreeing completion)."""
    rows, diffs = [], []
    for key, entry in ours["entries"].items():
        name = entry["name"]
        if name not in tina["values"]:
            rows.append({"function": name, "kwargs": entry["kwargs"], "recipes": entry["recipes"], "cases": 0,
                         "agree": 0, "agreement": None, "note": "Tina has no function of this name"})  # fmt: skip
            continue
        agree = total = 0
        for g, group in enumerate(cases["groups"]):
            ref, got = tina["values"][name][g], ours["values"][key][g]
            for i, (a, b) in enumerate(zip(ref, got, strict=True)):
                total += 1
                if _same(a, b):
                    agree += 1
                else:
                    diffs.append({
                        "function": name, "kwargs": entry["kwargs"], "tina": a, "ours": b,
                        "source": group["source"], "id": group["id"], "group": g, "index": i,
                        "kind": group["kinds"][i], "gold": group["gold"][-300:],
                        "completion_tail": group["completions"][i][-300:],
                    })  # fmt: skip
        rows.append({"function": name, "kwargs": entry["kwargs"], "recipes": entry["recipes"], "cases": total,
                     "agree": agree, "agreement": agree / total if total else None})  # fmt: skip
    return rows, diffs


def markdown(rows: list[dict], tina: dict[str, Any], ours: dict[str, Any], groups: int) -> str:
    lines = [
        f"Tina side: {tina['versions']}; ours: {ours['versions']}; {groups} case groups.",
        "",
        "| function | kwargs (ours) | recipes | agree / cases | agreement |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["function"]):
        share = "n/a" if r["agreement"] is None else f"{100 * r['agreement']:.2f}%"
        lines.append(
            f"| {r['function']} | `{json.dumps(r['kwargs'], sort_keys=True)}` | {', '.join(r['recipes'])} | "
            f"{r['agree']} / {r['cases']} | {share} |"
        )
    lines += ["", f"Tina's L1 rewards called as TRL 0.15.2 calls them: {tina.get('l1_called_as_trl')}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tina-dir", type=Path, required=True, help="a checkout of shangshang-wang/Tina (read only)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--tina-python", type=Path, default=HERE / ".venv-tina" / "bin" / "python")
    p.add_argument("--python", type=Path, default=ROOT / ".venv" / "bin" / "python", help="the project's env")
    p.add_argument(
        "--bench-dir", type=Path, default=None, help="shared benchmarks (default ../shared/benchmarks)"
    )
    p.add_argument("--per-source", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-agreement", type=float, default=0.995)
    a = p.parse_args()
    for what, exe in (("--tina-python", a.tina_python), ("--python", a.python)):
        if not exe.exists():
            hint = " (build it with parity/setup_env.sh)" if what == "--tina-python" else ""
            raise SystemExit(f"{what} {exe} does not exist{hint}")
    a.out.mkdir(parents=True, exist_ok=True)
    cases_path, tina_path, ours_path = a.out / "cases.json", a.out / "tina.json", a.out / "ours.json"
    bench = ["--bench-dir", str(a.bench_dir)] if a.bench_dir else []
    steps = [
        [sys.executable, HERE / "rewards_cases.py", *bench, "--per-source", str(a.per_source),
         "--seed", str(a.seed), "--out", cases_path],
        [a.tina_python, HERE / "rewards_tina.py", "--tina-dir", a.tina_dir, "--cases", cases_path,
         "--out", tina_path],
        [a.python, HERE / "rewards_ours.py", "--cases", cases_path, "--out", ours_path],
    ]  # fmt: skip
    for cmd in steps:
        subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)
    cases, tina, ours = (json.loads(p.read_text()) for p in (cases_path, tina_path, ours_path))
    rows, diffs = compare(cases, tina, ours)
    (a.out / "report.json").write_text(
        json.dumps({"rows": rows, "tina": tina["versions"], "ours": ours["versions"]})
    )
    with (a.out / "disagreements.jsonl").open("w") as f:
        for d in diffs:
            f.write(json.dumps(d) + "\n")
    report = markdown(rows, tina, ours, len(cases["groups"]))
    (a.out / "report.md").write_text(report)
    print(report)
    low = [r for r in rows if r["agreement"] is not None and r["agreement"] < a.min_agreement]
    if low:
        print(
            f"below {a.min_agreement:.1%}: {[r['function'] for r in low]}; see {a.out / 'disagreements.jsonl'}"
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
