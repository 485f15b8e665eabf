"""Which grading is the better training signal: strict vs Tina's reward grading, on the parity cases (project .venv).

Each generated completion kind has an intended verdict (a right answer written some way, or a wrong one). This
grades every completion of the cases file with the checker's "strict" grader and with Tina's two reward
graders, and counts per kind how often each grader gives the intended verdict. Kinds whose right verdict is a
matter of taste (a percentage of the answer, several answers, a letter) are left out of the totals.

    .venv/bin/python parity/rewards_evidence.py --cases DIR/cases.json [--out DIR/evidence.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RIGHT = {
    "boxed_right", "bare_box_right", "unboxed_right", "dollar_right", "final_answer_colon", "shorthand_frac",
    "slash_frac", "equation_box", "chain_box", "display_box", "long_right", "dfrac_box", "units", "inline_paren",
    "answer_equals", "two_boxes", "boxes_repeated", "inline_boxes_repeated", "bare_boxes_gap", "unit_word",
}  # fmt: skip
WRONG = {"boxed_wrong", "bare_box_wrong", "dollar_wrong", "long_wrong", "no_answer", "repeated"}
GRADERS = ("strict", "tina_accuracy", "tina_length")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from lightning_tina.checker import check_many

    cases = json.loads(a.cases.read_text())
    comps, golds, kinds = [], [], []
    for g in cases["groups"]:
        if g["source"] == "math500_solution":
            continue  # keep one gold form per row; wrapped answers are what most Tina datasets feed
        for kind, c in zip(g["kinds"], g["completions"], strict=True):
            if kind in RIGHT or kind in WRONG:
                comps.append(c)
                golds.append(g["gold"])
                kinds.append(kind)
    hits: dict[str, dict[str, list[int]]] = {gr: defaultdict(lambda: [0, 0]) for gr in GRADERS}
    unparsed = {gr: 0 for gr in GRADERS}
    for gr in GRADERS:
        verdicts = check_many(comps, golds, "latex", grader=gr, timeout_s=10.0)  # type: ignore[arg-type]
        for kind, v in zip(kinds, verdicts, strict=True):
            unparsed[gr] += v.status == "gold_unparsed"
            intended = kind in RIGHT
            hits[gr][kind][0] += int(v.correct == intended)
            hits[gr][kind][1] += 1
    lines = [
        f"{len(comps)} completions with an intended verdict (golds: `$answer$`).",
        "",
        "| kind | intended | " + " | ".join(GRADERS) + " |",
        "|---|---|" + "---|" * len(GRADERS),
    ]
    for kind in sorted(hits["strict"]):
        row = [f"{hits[gr][kind][0]}/{hits[gr][kind][1]}" for gr in GRADERS]
        lines.append(f"| {kind} | {'right' if kind in RIGHT else 'wrong'} | " + " | ".join(row) + " |")
    for label, group in (("right answers credited", RIGHT), ("wrong answers refused", WRONG)):
        row = []
        for gr in GRADERS:
            ok = sum(v[0] for k, v in hits[gr].items() if k in group)
            n = sum(v[1] for k, v in hits[gr].items() if k in group)
            row.append(f"{ok}/{n} ({100 * ok / max(n, 1):.1f}%)")
        lines.append(f"| **{label}** | | " + " | ".join(row) + " |")
    lines += ["", f"gold unparsed (Tina: accuracy None, cosine 1.0, length 'correct'): {unparsed}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
