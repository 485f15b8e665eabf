"""Tina's own reward functions on the parity cases (run with parity/.venv-tina: math-verify 0.5.2).

Imports ``tina/post_train_hf/rewards.py`` from the Tina checkout given on the command line (nothing of Tina is in
this repository) and calls each function the way Tina's trainer did: once per group of completions (one
prompt's group), completions as ``[[{"content": text}]]``, the gold as the ``solution`` list, with the
parameters Tina's recipes and launch scripts give (tina/config.py defaults, ``--cosine_max_len 3584``).

The L1 rewards are the exception. TRL 0.15.2 hands every dataset column to a reward function as a list, so
Tina's ``len_reward_l1_exact``/``len_reward_l1_max`` would compute ``length - [targets]`` and raise TypeError
(and ``l1_exact``/``l1_max`` are commented out of Tina's dataset map, so those recipes never started). Here they
get the group's one target length as a number, the evident intent; the raw call is recorded too.

    parity/.venv-tina/bin/python parity/rewards_tina.py --tina-dir PATH --cases cases.json --out tina.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

COSINE = dict(  # tina/config.py defaults, max_len from scripts/train/post_train_model_grpo*.sh
    min_value_wrong=0.0, max_value_wrong=-0.5, min_value_correct=0.5, max_value_correct=1.0, max_len=3584
)
REPETITION = dict(
    ngram_size=3, max_penalty=-1.0
)  # tina/config.py: repetition_n_grams, repetition_max_penalty


def load_rewards(tina_dir: Path) -> Any:
    """Tina's rewards module, imported from the checkout (its packages have no __init__.py)."""
    if not (tina_dir / "tina" / "post_train_hf" / "rewards.py").exists():
        raise SystemExit(f"--tina-dir {tina_dir}: no tina/post_train_hf/rewards.py there (a Tina checkout?)")
    sys.path.insert(0, str(tina_dir.resolve()))
    return importlib.import_module("tina.post_train_hf.rewards")


def functions(mod: Any) -> dict[str, Any]:
    """Tina's reward name (its grpo.py RL_POST_TRAIN_REWARD_MAP key) -> callable, as its recipes build them."""
    return {
        "accuracy": mod.accuracy_reward,
        "format": mod.format_reward,
        "tag_count": mod.tag_count_reward,
        "length": mod.len_reward,
        "length_l1_exact": mod.len_reward_l1_exact,
        "length_l1_max": mod.len_reward_l1_max,
        "reasoning_steps": mod.reasoning_steps_reward,
        "cosine": mod.get_cosine_scaled_reward(**COSINE),
        "repetition_penalty": mod.get_repetition_penalty_reward(**REPETITION),
    }


def run(mod: Any, cases: dict[str, Any]) -> dict[str, Any]:
    fns = functions(mod)
    values: dict[str, list[list[Any]]] = {name: [] for name in fns}
    l1_raw_errors: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {name: 0.0 for name in fns}
    for group in cases["groups"]:
        comps = [[{"role": "assistant", "content": c}] for c in group["completions"]]
        sol = [group["gold"]] * len(comps)
        for name, fn in fns.items():
            kwargs: dict[str, Any] = {"solution": sol}
            if name.startswith("length_l1"):
                kwargs["target_length"] = group["target_length"]  # the intent; see the module docstring
                try:  # the call as TRL 0.15.2 made it: every column a list
                    with contextlib.redirect_stdout(io.StringIO()):
                        fn(comps, solution=sol, target_length=[group["target_length"]] * len(comps))
                except Exception as e:
                    l1_raw_errors.setdefault(name, {"groups_raising": 0, "error": f"{type(e).__name__}: {e}"})
                    l1_raw_errors[name]["groups_raising"] += 1
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # Tina prints every unparsed gold
                out = fn(comps, **kwargs)
            seconds[name] += time.perf_counter() - t0
            values[name].append([None if v is None else float(v) for v in out])
    l1_raw_errors["groups"] = len(cases["groups"])  # type: ignore[assignment]
    return {"values": values, "l1_called_as_trl": l1_raw_errors, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tina-dir", type=Path, required=True, help="a checkout of shangshang-wang/Tina")
    p.add_argument("--cases", type=Path, required=True, help="from parity/rewards_cases.py")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    mod = load_rewards(a.tina_dir)
    result = run(mod, json.loads(a.cases.read_text()))
    from importlib.metadata import version

    result["versions"] = {n: version(n) for n in ("math-verify", "latex2sympy2_extended", "trl", "sympy")}
    a.out.write_text(json.dumps(result))
    print(f"tina rewards -> {a.out} ({result['versions']})")


if __name__ == "__main__":
    main()
