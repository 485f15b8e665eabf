"""Write tests/fixtures/test_tina_rewards_expected.json: hand-written cases with the values Tina's own code gives.

Run with Tina's environment (math-verify 0.5.2), importing Tina's reward functions from a checkout:

    parity/.venv-tina/bin/python parity/rewards_fixture.py --tina-dir PATH_TO_TINA_CHECKOUT

The cases are written here by hand (no benchmark rows): each one shows a quirk of Tina's grading that the
"tina" grading of ``lightning_tina.rewards`` must reproduce. tests/test_tina_rewards.py replays them in the default
test suite without Tina's environment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rewards_tina import COSINE, REPETITION, functions, load_rewards

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "test_tina_rewards_expected.json"
T = "<think>\nWe add the numbers carefully.\n</think>\n\n"
SOLUTION = (  # a worked solution, written for this fixture, whose last box holds the answer
    "Since $a + b = 7$ and $a - b = 1$, adding gives $2a = 8$, so $a = 4$ and $b = 3$. "
    "Hence $ab = \\boxed{12}$."
)
SOLUTION_TWO_BOXES = "First $\\boxed{3}$ is ruled out, so the answer is $\\boxed{5}$."
# (name, gold, completion): graded by accuracy, cosine, length (in a group of its own plus a short filler)
SINGLES: list[tuple[str, str, str]] = [
    ("boxed_in_dollars", "$40$", T + "The answer is $\\boxed{40}$."),
    ("bare_box", "$40$", T + "\\boxed{40}"),
    ("wrong_box", "$40$", T + "\\boxed{41}"),
    ("unboxed_answer_is", "$40$", T + "The answer is 40."),
    ("final_answer_colon", "$40$", T + "Final Answer: 40"),
    ("dollar_after_anchor", "$40$", T + "The final answer is $40$."),
    ("shorthand_frac", "$\\frac{1}{2}$", T + "$\\boxed{\\frac12}$"),
    ("dfrac", "$\\frac{1}{2}$", T + "\\boxed{\\dfrac{1}{2}}"),
    ("decimal_for_fraction", "$\\frac{1}{2}$", T + "\\boxed{0.5}"),
    ("percent_sign", "$5$", T + "$\\boxed{5\\%}$"),
    ("percent_word", "$5$", T + "$\\boxed{5 percent}$"),
    ("unit_word", "$5$", T + "\\boxed{5 meters}"),
    ("unit_text", "$5$", T + "\\boxed{5\\text{ cm}}"),
    ("and_in_gold", "$2, 3, \\text{ and } 4$", T + "The final answer is $\\boxed{2, 3, \\text{ and } 4}$."),
    ("bare_boxes_short_gap", "$5$", T + "\\boxed{3}. Wait, \\boxed{5}"),
    ("bare_boxes_repeated", "$5$", T + "\\boxed{5} \\boxed{5}"),
    ("inline_boxes_repeated", "$5$", T + "$\\boxed{5} = \\boxed{5}$"),
    ("equation_box", "$5$", T + "\\boxed{x = 5}"),
    ("chain_box", "$5$", T + "\\boxed{y = 2 + 3 = 5}"),
    ("answers_with_and", "$5$", T + "The final answer is $5$, and $7$."),
    ("worked_solution_gold_right", SOLUTION, T + "So $ab = \\boxed{12}$."),
    ("worked_solution_gold_wrong", SOLUTION, T + "So $ab = \\boxed{7}$."),
    ("two_boxes_in_gold", SOLUTION_TWO_BOXES, T + "\\boxed{5}"),
    ("gold_unparsed", "no math in this gold", T + "\\boxed{5}"),
    ("gold_empty", "", T + "\\boxed{5}"),
    ("truncated", "$40$", T + "The answer is $\\boxed{4"),
    ("tags_twice", "$40$", "<think>\nx\n</think>\ny\n</think>\n\\boxed{40}"),
    ("steps", "$40$", "Step 1: add.\nStep 2: multiply.\n1. check\nFirst, Next, Finally, \\boxed{40}"),
    ("repetition", "$40$", "the answer is 40 " * 12),
    ("symbol_case", "$AB$", T + "\\boxed{ab}"),
    ("text_case", "$\\text{east}$", T + "\\boxed{\\text{East}}"),
    ("float_against_root", "$\\sqrt{2}$", T + "\\boxed{1.41421356}"),
    ("unary_pm", "$\\{-2, 2\\}$", T + "\\boxed{x = \\pm 2}"),
    ("percent_against_decimal", "$0.05$", T + "\\boxed{5\\%}"),
    ("binary_pm", "$3 \\pm 1$", T + "\\boxed{\\{2, 4\\}}"),
]
FILLER = "x" * 400  # a longer second completion in each group: the single is the shortest (length: 0.5 or 0)
LONG = "word " * 1600  # 8000 characters: cosine progress past 2 (Tina does not clamp it)


def groups() -> list[dict[str, Any]]:
    """Groups as Tina's trainer called its rewards: one prompt's completions, one gold, one target length."""
    out = [
        {"name": name, "gold": gold, "target_length": 500, "completions": [completion, FILLER]}
        for name, gold, completion in SINGLES
    ]
    out += [
        {"name": "long_group", "gold": "$40$", "target_length": 3000,
         "completions": [T + LONG + "\\boxed{40}", T + LONG + "\\boxed{41}", "\\boxed{40}", T + "no answer"]},
        {"name": "equal_lengths", "gold": "$40$", "target_length": 100,
         "completions": ["\\boxed{40}", "\\boxed{41}", "\\boxed{42}", "\\boxed{43}"]},
    ]  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tina-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    from rewards_tina import run

    mod = load_rewards(a.tina_dir)
    cases = {"groups": groups()}
    result = run(mod, cases)
    from importlib.metadata import version

    fixture = {
        "about": "Tina's reward values (tina/post_train_hf/rewards.py at c6274cd, math-verify "
        f"{version('math-verify')}, latex2sympy2_extended {version('latex2sympy2_extended')}) "
        "for hand-written cases; regenerate with parity/rewards_fixture.py",
        "tina_parameters": {"cosine": COSINE, "repetition_penalty": REPETITION},
        "functions": sorted(functions(mod)),
        "groups": [{**g, "tina": {f: result["values"][f][i] for f in result["values"]}} for i, g in enumerate(cases["groups"])],
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{len(fixture['groups'])} groups -> {a.out}")


if __name__ == "__main__":
    main()
