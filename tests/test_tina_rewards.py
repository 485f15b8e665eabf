"""The "tina" grading of the reward functions reproduces Tina's own reward values (math-verify 0.5.2 quirks included).

The expected values in fixtures/test_tina_rewards_expected.json come from Tina's code itself, run in Tina's
environment by parity/rewards_fixture.py (hand-written cases, no benchmark rows); the full comparison on
benchmark rows is the on-demand harness parity/rewards_parity.py. No Tina environment is needed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_tina.checker import check
from lightning_tina.checker.mv_compat import boxed_contents_052, legacy_052
from lightning_tina.checker.scope import verdict_scope
from lightning_tina.rewards import RewardSet, RewardSpec, _resolve, _takes_group_size, accuracy_reward

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "test_tina_rewards_expected.json").read_text())
GRADED = {"accuracy", "cosine", "length", "length_l1_exact", "length_l1_max"}
# The kwargs the Tina recipes give (configs/tina/*.yaml), for Tina's parameters in the fixture
OURS_KWARGS: dict[str, dict[str, Any]] = {
    "cosine": {"max_len": FIXTURE["tina_parameters"]["cosine"]["max_len"]},
    "repetition_penalty": dict(FIXTURE["tina_parameters"]["repetition_penalty"]),
}


def _ours(name: str, group: dict[str, Any]) -> list[float | None]:
    """Our function ``name`` on one group, called as RewardSet calls it with scope: group."""
    kwargs = dict(OURS_KWARGS.get(name, {}))
    if name in GRADED:
        kwargs["grading"] = "tina"
    comps = group["completions"]
    columns = {
        "solution": [group["gold"]] * len(comps),
        "target_length": [group["target_length"]] * len(comps),
    }
    fn = _resolve(name, name)
    extra = {"group_size": len(comps)} if _takes_group_size(fn) else {}
    return list(fn(comps, **columns, **kwargs, **extra))


def _same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-9)


def test_every_tina_function_reproduces_tinas_values_on_the_fixture() -> None:
    wrong = []
    for group in FIXTURE["groups"]:
        with verdict_scope():
            for name, expected in group["tina"].items():
                got = _ours(name, group)
                if not all(_same(a, b) for a, b in zip(expected, got, strict=True)):
                    wrong.append(f"{group['name']}/{name}: Tina {expected}, ours {got}")
    assert not wrong, "\n".join(wrong)


def test_fixture_covers_the_quirks_the_tina_mode_exists_for() -> None:
    """The fixture must keep cases where Tina's grading differs from strict grading (else it tests little)."""
    by_name = {g["name"]: g for g in FIXTURE["groups"]}
    assert by_name["unboxed_answer_is"]["tina"]["accuracy"][0] == 0.0  # strict credits "The answer is 40."
    assert (
        by_name["shorthand_frac"]["tina"]["accuracy"][0] == 0.0
    )  # \frac12 not repaired (malformed_operators off)
    assert (
        by_name["percent_sign"]["tina"]["accuracy"][0] == 0.0
    )  # 5% is 0.05 in 0.5.2 (1.0 in math-verify 0.9)
    assert by_name["and_in_gold"]["tina"]["cosine"][0] < 0 < by_name["and_in_gold"]["tina"]["accuracy"][0]
    assert by_name["gold_unparsed"]["tina"]["accuracy"][0] is None
    assert (
        by_name["gold_unparsed"]["tina"]["cosine"][0] == 1.0
    )  # Tina's cosine: unparsed gold earns the maximum
    strict = accuracy_reward([by_name["unboxed_answer_is"]["completions"][0]], solution=["$40$"])
    assert strict == [1.0]


def _recipe_rewards(path: Path) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text()) or {}
    if "model.rewards" in data:
        return data["model.rewards"]
    if isinstance(data.get("model"), dict) and "rewards" in data["model"]:
        return data["model"]["rewards"]
    return _recipe_rewards(path.parent / data["config"])


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (ROOT / "configs" / "tina").glob("*.yaml")))
def test_every_tina_recipe_grades_as_tina(recipe: str) -> None:
    specs = _recipe_rewards(ROOT / "configs" / "tina" / f"{recipe}.yaml")
    graded = [s for s in specs if s["name"] in GRADED]
    assert all((s.get("kwargs") or {}).get("grading") == "tina" for s in graded), specs
    RewardSet([RewardSpec(**s) for s in specs])  # the kwargs are valid


def test_grading_values_and_checker_graders_are_validated() -> None:
    with pytest.raises(ValueError, match="grading"):
        RewardSet([RewardSpec("accuracy", kwargs={"grading": "tna"})])
    with pytest.raises(ValueError, match="strict"):
        RewardSet([RewardSpec("accuracy", kwargs={"strict": False})])
    with pytest.raises(ValueError, match="grader"):
        check("\\boxed{1}", "$1$", "latex", grader="tina")  # type: ignore[arg-type]
    assert check("The answer is $\\boxed{1}$.", "$1$", "latex", grader="tina_accuracy").correct


def test_legacy_boxed_extraction_and_swap_is_undone() -> None:
    assert (
        boxed_contents_052("\\boxed{3}. Wait, \\boxed{5}") == "5"
    )  # 1.0.6: only "and"/"or"/"," may separate
    assert boxed_contents_052("\\boxed{3} and \\boxed{5}") == "3,5"
    assert boxed_contents_052("\\boxed{5} \\boxed{5}", mode="all") == "5,5"  # no de-duplication
    assert boxed_contents_052("\\boxed{\\frac{1}{2}") == "{\\frac{1}{2}"  # unclosed: the rest of the text
    assert boxed_contents_052("no box") == "no box"
    from latex2sympy2_extended import math_normalization as mn

    before = (mn.to_replace_regex, mn.extract_boxed_content, mn.units_regex)
    with legacy_052():
        assert mn.extract_boxed_content is boxed_contents_052
    assert (mn.to_replace_regex, mn.extract_boxed_content, mn.units_regex) == before
