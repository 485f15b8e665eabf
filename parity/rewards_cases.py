"""Reward parity cases: real benchmark rows, each with one group of varied completions (stdlib only).

Both sides of the reward harness (Tina's code in parity/.venv-tina, ours in .venv) read the JSON this writes, so
they score exactly the same inputs. A case group is one prompt's group of completions, as Tina's trainer called
its reward functions (per_device_train_batch_size == num_generations: one call held one group).

Plus ``PROBES``: hand-written (gold, completion) pairs at the places where math-verify 0.5.2 and the newer
version this project installs differ (the Tina grading must follow 0.5.2 there).

Golds are fed as Tina's ``grpo.py`` fed them: a row's worked ``solution`` when it has one (MATH-500), else
``"$" + answer + "$"`` (AIME, AMC, LIMR). MATH-500 rows also appear in the wrapped-answer form, which is what
the datasets without a solution column (open-rs, DeepScaleR, II-Thought) give.

    python parity/rewards_cases.py --bench-dir ../shared/benchmarks --out cases.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

DEFAULT_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"
GROUP_SIZES = (4, 6, 8)  # Tina: 4 (most recipes), 6 (open-rs), 8 (open-r1, thoughts)
FILLER = (
    "We simplify the expression step by step and check each case carefully. ",
    "Let me reconsider the previous computation to make sure nothing was dropped. ",
    "Substituting back into the original equation confirms the value. ",
    "So the key quantity follows from the relation above. ",
    "Note that the constraint forces the variables to be integers. ",
)
STEP_STYLES = (
    "Step {i}: compute the next term.\n",
    "{i}. Expand and collect terms.\n",
    "\n- bullet {i}",
    "\n* star {i}",
)
TRANSITIONS = ("First, ", "Second, ", "Next, ", "Finally, ")

PROBES: list[tuple[str, str]] = [  # hand-written (gold, completion) pairs at known version differences
 ("$AB$", "\\boxed{ab}"), ("$ab$", "\\boxed{AB}"), ("$(3, \\infty)$", "\\boxed{x > 3}"), ("$x > 3$", "\\boxed{(3, \\infty)}"),
 ("$y = 2x + 3$", "\\boxed{y = 3 + 2x}"), ("$y = 2x + 3$", "\\boxed{2x + 3}"), ("$2x+3$", "\\boxed{y = 2x + 3}"),
 ("$x = 2$", "\\boxed{2}"), ("$2$", "\\boxed{x = 2}"), ("$x^2 - 4 = 0$", "\\boxed{x = 2, x = -2}"), ("$\\{-2, 2\\}$", "\\boxed{x = \\pm 2}"),
 ("$1,234$", "\\boxed{1234}"), ("$0,5$", "\\boxed{0.5}"), ("$10,000$", "\\boxed{10000}"), ("$1,000,000$", "\\boxed{10^6}"),
 ("$\\text{(C)}$", "\\boxed{C}"), ("$\\text{Evelyn}$", "\\boxed{\\text{Evelyn}}"), ("$\\text{east}$", "\\boxed{\\text{East}}"),
 ("$3 \\text{ m east}$", "\\boxed{3}"), ("$90^\\circ$", "\\boxed{90}"), ("$\\frac{\\pi}{2}$", "\\boxed{\\pi/2}"),
 ("$\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}$", "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}"), ("$[1, 2)$", "\\boxed{[1,2)}"),
 ("$5\\%$", "\\boxed{5}"), ("$5\\%$", "\\boxed{0.05}"), ("$0.05$", "\\boxed{5\\%}"), ("$50\\%$", "\\boxed{\\frac{1}{2}}"),
 ("$\\sqrt{2}$", "\\boxed{1.41421356}"), ("$1/3$", "\\boxed{0.333333}"), ("$e$", "\\boxed{e}"), ("$E$", "\\boxed{e}"),
 ("$a=1, b=2$", "\\boxed{a = 1, b = 2}"), ("$a=1, b=2$", "\\boxed{1, 2}"), ("$1, 2$", "\\boxed{a = 1, b = 2}"),
 ("$x \\in [2, 5]$", "\\boxed{[2,5]}"), ("$2 \\le x \\le 5$", "\\boxed{[2, 5]}"), ("$k = 7$", "\\boxed{k=7}"),
 ("$\\infty$", "\\boxed{\\infty}"), ("$-\\infty$", "\\boxed{-\\infty}"), ("$\\emptyset$", "\\boxed{\\varnothing}"),
 ("$\\frac{1}{2}$", "The final answer is $\\frac{1}{2}$, and $\\frac{1}{3}$."), ("$\\frac{1}{3}$", "The final answer is $\\frac{1}{2}$, and $\\frac{1}{3}$."),
 ("$3$", "The final answer is $3$ or $4$."), ("$4$", "The final answer is $3$, or $4$."),
 ("$1$", "The answer is $x = 1 = y$"), ("$\\$5$", "\\boxed{\\$5}"), ("$5$", "\\boxed{\\$5.00}"), ("$2\\sqrt{3}$", "\\boxed{\\sqrt{12}}"),
 ("$\\text{yes}$", "\\boxed{yes}"), ("$\\text{Yes}$", "\\boxed{\\text{yes}}"), ("$xy$", "\\boxed{yx}"), ("$Ab$", "\\boxed{aB}"),
 ("$\\sin x$", "\\boxed{\\sin(x)}"), ("$f(x) = x^2$", "\\boxed{x^2}"), ("$\\log_2 8$", "\\boxed{3}"), ("$3$", "\\boxed{3.0}"),
 ("$1e-3$", "\\boxed{0.001}"), ("$10^{-3}$", "\\boxed{0.001}"), ("$2+3i$", "\\boxed{3i+2}"), ("$i$", "\\boxed{\\sqrt{-1}}"),
    ("$3$", "The final answer is $3$, and $4$."), ("$\\{3, 4\\}$", "The final answer is $3$, and $4$."),
    ("$\\{3, 4\\}$", "The final answer is $3$ and $4$."), ("$1,234$", "\\boxed{1,234}"), ("$12,345.6$", "\\boxed{12345.6}"),
    ("$x = y = 3$", "\\boxed{3}"), ("$3$", "\\boxed{x = y = 3}"), ("$a = b + 1 = 4$", "\\boxed{a = 4}"),
    ("$x < 3$", "\\boxed{3 > x}"), ("$x \\le 3$", "\\boxed{(-\\infty, 3]}"), ("$(-\\infty, 3]$", "\\boxed{x \\le 3}"),
    ("$1 < x < 3$", "\\boxed{(1, 3)}"), ("$(1, 3)$", "\\boxed{1 < x < 3}"), ("$3 \\pm 1$", "\\boxed{\\{2, 4\\}}"),
    ("$x = 1, y = 2$", "\\boxed{(1, 2)}"), ("$(1, 2)$", "\\boxed{x = 1, y = 2}"), ("$\\text{C}$", "\\boxed{\\text{c}}"),
    ("$\\textbf{(B)}$", "\\boxed{B}"), ("$7$", "\\boxed{7 \\text{ percent}}"), ("$nan$", "\\boxed{nan}"),
]  # fmt: skip


def _rows(bench: Path, per_source: int, rng: random.Random) -> list[dict[str, Any]]:
    """Sampled rows as {source, id, gold, answer}: the gold string Tina's reward functions received."""
    out: list[dict[str, Any]] = []

    def load(name: str) -> list[dict[str, Any]]:
        path = bench / name
        if not path.exists():
            raise SystemExit(
                f"{path} not found: pass --bench-dir (the shared benchmarks folder, see its README)"
            )
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    math500 = load("math500.jsonl")
    picked = rng.sample(math500, min(2 * per_source, len(math500)))
    for r in picked[:per_source]:
        out.append(
            {"source": "math500_solution", "id": r["id"], "gold": r["solution"], "answer": r["answer"]}
        )
    for r in picked[per_source:]:
        out.append(
            {"source": "math500_answer", "id": r["id"], "gold": f"${r['answer']}$", "answer": r["answer"]}
        )
    for name, src in (("aime24.jsonl", "aime24"), ("aime25.jsonl", "aime25"), ("amc23.jsonl", "amc23")):
        rows = load(name)
        for r in rng.sample(rows, min(per_source // 2, len(rows))):
            out.append({"source": src, "id": r["id"], "gold": f"${r['answer']}$", "answer": str(r["answer"])})
    limr = load("train_samples/limr_math8k_rows_first300.jsonl")
    for r in rng.sample(limr, min(per_source, len(limr))):
        out.append({"source": "limr", "id": r["id"], "gold": f"${r['answer']}$", "answer": str(r["answer"])})
    return out


def _wrong(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: a changed number, or a changed expression."""
    nums = list(re.finditer(r"\d+", answer))
    if nums:
        m = rng.choice(nums)
        return answer[: m.start()] + str(int(m.group()) + rng.choice((1, 2, 7, 10))) + answer[m.end() :]
    return answer + "+1" if answer else "7"


def _shorthand(answer: str) -> str:
    """``\\frac{a}{b}`` with one-digit parts as ``\\frac ab`` / ``\\frac12`` (a common model shorthand)."""
    return re.sub(r"\\[dt]?frac\{(\d)\}\{(\d)\}", r"\\frac\1\2", answer)


def _slash(answer: str) -> str:
    return re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", answer)


def _reasoning(rng: random.Random, chars: int) -> str:
    text = ""
    while len(text) < chars:
        text += rng.choice(FILLER)
    return text[:chars]


def _completion(kind: str, answer: str, rng: random.Random, worked: str | None = None) -> str:
    """One completion of the given kind for a row whose answer is ``answer`` (``worked``: a worked solution)."""
    think = "<think>\n" if rng.random() < 0.7 else ""
    close = "\n</think>\n\n" if rng.random() < 0.85 else "\n\n"
    body = _reasoning(rng, rng.choice((40, 200, 800, 1500, 3000)))
    wrong = _wrong(answer, rng)
    if kind == "boxed_right":
        return f"{think}{body}{close}The final answer is $\\boxed{{{answer}}}$."
    if kind == "bare_box_right":
        return f"{think}{body}{close}Therefore \\boxed{{{answer}}}"
    if kind == "boxed_wrong":
        return f"{think}{body}{close}The final answer is $\\boxed{{{wrong}}}$."
    if kind == "bare_box_wrong":
        return f"{think}{body}{close}\\boxed{{{wrong}}}"
    if kind == "unboxed_right":
        return f"{think}{body}{close}The answer is {answer}."
    if kind == "dollar_right":
        return f"{think}{body}{close}So the answer is ${answer}$."
    if kind == "dollar_wrong":
        return f"{think}{body}{close}So the answer is ${wrong}$."
    if kind == "final_answer_colon":
        return f"{think}{body}{close}Final Answer: {answer}"
    if kind == "shorthand_frac":
        return f"{think}{body}{close}$\\boxed{{{_shorthand(answer)}}}$"
    if kind == "slash_frac":
        return f"{think}{body}{close}\\boxed{{{_slash(answer)}}}"
    if kind == "equation_box":
        return f"{think}{body}{close}\\boxed{{x = {answer}}}"
    if kind == "chain_box":
        return f"{think}{body}{close}\\boxed{{y = 2 + 3 = {answer}}}"
    if kind == "two_boxes":
        return f"{think}At first I get $\\boxed{{{wrong}}}$. {body}{close}Final: $\\boxed{{{answer}}}$"
    if kind == "display_box":
        return f"{think}{body}{close}\\[\n\\boxed{{{answer}}}\n\\]"
    if kind == "text_box":
        return f"{think}{body}{close}\\boxed{{\\text{{{answer}}}}}"
    if kind == "truncated":
        full = f"{think}{body}{close}The final answer is $\\boxed{{{answer}}}$."
        return full[: rng.randint(max(1, len(full) // 3), max(2, len(full) - 8))]
    if kind == "repeated":
        chunk = rng.choice(FILLER) + f"Maybe the answer is {wrong}. "
        return f"{think}{chunk * rng.randint(3, 40)}"
    if kind == "steps":
        style = rng.choice(STEP_STYLES)
        steps = "".join(style.format(i=i) for i in range(1, rng.randint(1, 6)))
        lead = "".join(rng.sample(TRANSITIONS, rng.randint(0, 3)))
        return f"{think}{lead}{steps}{body[:300]}{close}$\\boxed{{{answer}}}$"
    if kind == "long_right":
        return f"{think}{_reasoning(rng, rng.choice((3600, 5000, 7300, 9000)))}{close}$\\boxed{{{answer}}}$"
    if kind == "long_wrong":
        return f"{think}{_reasoning(rng, rng.choice((3600, 5000, 7300, 9000)))}{close}$\\boxed{{{wrong}}}$"
    if kind == "short":
        return rng.choice((f"\\boxed{{{answer}}}", f"{answer}", "", "<think>\n\n</think>\n", f"${answer}$"))
    if kind == "double_close":
        return f"<think>\n{body}\n</think>\nwait\n</think>\n\\boxed{{{answer}}}"
    if kind == "no_answer":
        return f"{think}{body}{close}I could not finish the computation."
    if kind == "decimal":
        return f"{think}{body}{close}$\\boxed{{{_as_decimal(answer)}}}$"
    if kind == "percent":
        return f"{think}{body}{close}$\\boxed{{{answer}\\%}}$"
    if kind == "units":
        unit = rng.choice(
            ("\\text{ cm}", "\\text{ dollars}", " \\mbox{ meters}", "^\\circ", "\\text{ units}^2")
        )
        return f"{think}{body}{close}\\boxed{{{answer}{unit}}}"
    if kind == "and_boxes":
        sep = rng.choice((" and ", ", and ", ", ", " or "))
        return f"{think}{body}{close}The answers are $\\boxed{{{answer}}}${sep}$\\boxed{{{wrong}}}$."
    if kind == "inline_paren":
        return f"{think}{body}{close}The answer is \\({answer}\\)."
    if kind == "answer_equals":
        return f"{think}{body}{close}Answer: $x = {answer}$"
    if kind == "boxed_relation":
        return f"{think}{body}{close}$\\boxed{{x \\geq {answer}}}$"
    if kind == "boxed_set":
        return f"{think}{body}{close}$\\boxed{{\\{{{answer}, {wrong}\\}}}}$"
    if kind == "boxed_tuple":
        return f"{think}{body}{close}$\\boxed{{({answer}, {wrong})}}$"
    if kind == "boxed_letter":
        return f"{think}{body}{close}$\\boxed{{\\text{{({rng.choice('ABCDE')})}}}}$"
    if kind == "boxed_symbolic":
        expr = rng.choice(
            ("\\pi", "2\\sqrt{3}", "\\frac{\\sqrt{2}}{2}", "e^{2}", "\\infty", "x^2+1", "ab", "AB")
        )
        return f"{think}{body}{close}$\\boxed{{{expr}}}$"
    if kind == "dfrac_box":
        dfrac = answer.replace("\\frac", "\\dfrac")
        return f"{think}{body}{close}$\\boxed{{{dfrac}}}$"
    if kind == "thousands":
        digits = re.sub(r"\D", "", answer) or "1234"
        grouped = f"{int(digits) * 1000 + 234:,}"
        return f"{think}{body}{close}$\\boxed{{{grouped}}}$"
    if kind == "bare_boxes_gap":
        return f"{think}{body}{close}\\boxed{{{wrong}}}. Wait, \\boxed{{{answer}}}"
    if kind == "boxes_repeated":
        return f"{think}{body}{close}\\boxed{{{answer}}} \\boxed{{{answer}}}"
    if kind == "inline_boxes_repeated":
        return f"{think}{body}{close}$\\boxed{{{answer}}} = \\boxed{{{answer}}}$"
    if kind == "dollar_and":
        sep = rng.choice((", and ", " and ", ", or ", ", "))
        return f"{think}{body}{close}The final answer is ${answer}${sep}${wrong}$."
    if kind == "percent_word":
        word = rng.choice((" percent", "\\text{ percent}", " percentage", " pct", "\\text{percent}"))
        return f"{think}{body}{close}$\\boxed{{{answer}{word}}}$"
    if kind == "unit_word":
        word = rng.choice((" meters", " m east", " cm", " degrees", " units", " dollars", " inches"))
        return f"{think}{body}{close}\\boxed{{{answer}{word}}}"
    if kind == "comma_equations":
        return f"{think}{body}{close}\\boxed{{x = 1, y = 2 = {answer}}}"
    if kind == "worked_solution":
        return f"{think}{body}{close}{worked}" if worked else f"{think}{body}{close}$\\boxed{{{answer}}}$"
    raise ValueError(kind)


def _as_decimal(answer: str) -> str:
    m = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", answer.strip())
    if m and int(m.group(2)):
        return f"{int(m.group(1)) / int(m.group(2)):.6f}"
    return answer + ".0" if answer.isdigit() else answer


KINDS = (
    "boxed_right", "bare_box_right", "boxed_wrong", "bare_box_wrong", "unboxed_right", "dollar_right",
    "dollar_wrong", "final_answer_colon", "shorthand_frac", "slash_frac", "equation_box", "chain_box",
    "two_boxes", "display_box", "text_box", "truncated", "repeated", "steps", "long_right", "long_wrong",
    "short", "double_close", "no_answer", "decimal", "percent", "units", "and_boxes", "inline_paren",
    "answer_equals", "boxed_relation", "boxed_set", "boxed_tuple", "boxed_letter", "boxed_symbolic", "dfrac_box",
    "thousands", "worked_solution", "worked_solution", "bare_boxes_gap", "boxes_repeated", "inline_boxes_repeated",
    "dollar_and", "percent_word", "unit_word", "comma_equations",
)  # fmt: skip


def _worked(row: dict[str, Any], solutions: list[str], rng: random.Random) -> str | None:
    if row["source"].startswith("math500") and rng.random() < 0.5:
        return row["gold"] if row["source"] == "math500_solution" else None
    return rng.choice(solutions) if solutions else None


def build(bench: Path, per_source: int, seed: int) -> dict[str, Any]:
    """All case groups: {"groups": [{source, id, gold, answer, target_length, kinds, completions}]}."""
    rng = random.Random(seed)
    groups = []
    rows = _rows(bench, per_source, rng)
    solutions = [r["gold"] for r in rows if r["source"] == "math500_solution"]
    for k, row in enumerate(rows):
        size = GROUP_SIZES[k % len(GROUP_SIZES)]
        kinds = [rng.choice(KINDS) for _ in range(size)]
        if k % 11 == 0:  # some groups of equal-length completions (Tina's length rewards: all 0.0)
            one = _completion(kinds[0], row["answer"], rng, rng.choice(solutions) if solutions else None)
            completions, kinds = [one] * size, [kinds[0]] * size
        else:
            completions = [
                # a worked MATH-500 solution: this row's own (when it has one) or another row's (wrong)
                _completion(kind, row["answer"], rng, _worked(row, solutions, rng))
                for kind in kinds
            ]
        groups.append(
            {**row, "target_length": rng.randint(100, 4000), "kinds": kinds, "completions": completions}
        )
    for k, (gold, completion) in enumerate(PROBES):  # each with a longer second completion (length rewards)
        groups.append({"source": "probe", "id": f"probe-{k}", "gold": gold, "answer": "",
                       "target_length": 1000, "kinds": ["probe", "filler"],
                       "completions": [completion, "Let me think. " * 30]})  # fmt: skip
    return {"seed": seed, "groups": groups}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--bench-dir", type=Path, default=DEFAULT_BENCH, help="shared benchmarks folder (its README)"
    )
    p.add_argument("--per-source", type=int, default=24, help="rows per source (AIME/AMC: half of it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    cases = build(a.bench_dir, a.per_source, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(cases))
    n = sum(len(g["completions"]) for g in cases["groups"])
    print(f"{len(cases['groups'])} groups, {n} completions -> {a.out}")


if __name__ == "__main__":
    main()
