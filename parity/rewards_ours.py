"""lightning_tina's reward functions on the parity cases, with each Tina recipe's own reward kwargs (project .venv).

The kwargs come from the recipe files (configs/tina/*.yaml): a recipe's ``model.rewards`` (a dotted key, or
``model: {rewards: ...}``), else the one of the file it names with ``config:``, as the CLI resolves it. Each
distinct (reward name, kwargs) is scored once per case group, the way ``RewardSet`` calls it in training with
``scope: group``: one call per group, or, for a function with a ``group_size`` parameter, one call with
``group_size`` = the group's size.

    .venv/bin/python parity/rewards_ours.py --cases cases.json --out ours.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "tina"


def recipe_rewards(path: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The ``model.rewards`` list a recipe file resolves to (following ``config:`` parents)."""
    if path in seen:
        raise SystemExit(f"{path}: config: cycle through {[str(p) for p in seen]}")
    data = yaml.safe_load(path.read_text()) or {}
    if "model.rewards" in data:
        return data["model.rewards"]
    if isinstance(data.get("model"), dict) and "rewards" in data["model"]:
        return data["model"]["rewards"]
    parent = data.get("config")
    if not parent:
        raise SystemExit(f"{path}: no model.rewards and no config: parent")
    return recipe_rewards(path.parent / parent, (*seen, path))


def recipe_entries(recipes: Path) -> dict[str, dict[str, Any]]:
    """key "name|kwargs-json" -> {name, kwargs, recipes: [recipe names using it]} over every recipe but base.yaml."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(recipes.glob("*.yaml")):
        if path.name == "base.yaml":
            continue
        for spec in recipe_rewards(path):
            kwargs = spec.get("kwargs") or {}
            key = f"{spec['name']}|{json.dumps(kwargs, sort_keys=True)}"
            entry = entries.setdefault(key, {"name": spec["name"], "kwargs": kwargs, "recipes": []})
            entry["recipes"].append(path.stem)
    return entries


def run(cases: dict[str, Any], entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from lightning_tina.checker.scope import verdict_scope
    from lightning_tina.rewards import RewardSpec, _resolve, _takes_group_size

    values: dict[str, list[list[Any]]] = {key: [] for key in entries}
    seconds = {key: 0.0 for key in entries}
    for group in cases["groups"]:
        comps = list(group["completions"])
        n = len(comps)
        columns = {"solution": [group["gold"]] * n, "target_length": [group["target_length"]] * n}
        with verdict_scope():  # one training step: verdicts shared between the functions, as in RewardSet
            for key, entry in entries.items():
                spec = RewardSpec(entry["name"], kwargs=entry["kwargs"])
                fn = _resolve(spec.name, key)
                t0 = time.perf_counter()
                if _takes_group_size(fn):
                    out = fn(comps, **columns, **spec.kwargs, group_size=n)
                else:
                    out = fn(comps, **columns, **spec.kwargs)
                seconds[key] += time.perf_counter() - t0
                values[key].append([None if v is None else float(v) for v in out])
    return {"values": values, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=Path, required=True, help="from parity/rewards_cases.py")
    p.add_argument("--recipes", type=Path, default=RECIPES, help="folder of the Tina recipes (configs/tina)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    entries = recipe_entries(a.recipes)
    result = run(json.loads(a.cases.read_text()), entries)
    from importlib.metadata import version

    result["entries"] = entries
    result["versions"] = {n: version(n) for n in ("math-verify", "latex2sympy2_extended", "sympy")}
    a.out.write_text(json.dumps(result))
    print(f"lightning_tina rewards ({len(entries)} recipe entries) -> {a.out} ({result['versions']})")


if __name__ == "__main__":
    main()
