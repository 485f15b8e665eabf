"""Benchmark registry, loading (synthetic fixtures and the offline copies), Tina's prompts and chat rendering."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lightning_tina.benchmarks import (
    GPQA_QUERY_TEMPLATE,
    LETTERS,
    MATH_QUERY_TEMPLATE,
    REGISTRY,
    load_benchmark,
    load_benchmarks,
    render,
    render_text,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"offline benchmark copies not found at {SHARED}"
)


class CharTokenizer:
    """A character-level stand-in with a ChatML-like template (BOS = id 1)."""

    chat_template = "chatml-like"

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert not tokenize
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return "^" + body + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) + 2 for c in text]


def test_registry_matches_tina_task_file() -> None:
    assert list(REGISTRY) == [
        "aime24", "aime25", "amc23", "math500", "gpqa_diamond", "minerva", "olympiadbench", "tiny_heldout",
    ]  # fmt: skip
    modes = {n: (s.mode, s.gold_field, s.template) for n, s in REGISTRY.items()}
    assert modes["aime24"] == modes["aime25"] == modes["amc23"] == ("expr", "answer", "math")
    assert modes["math500"] == modes["minerva"] == ("latex", "solution", "math")
    assert modes["olympiadbench"] == ("latex", "answer", "math")
    assert modes["gpqa_diamond"] == ("letter", "letter", "gpqa")
    assert modes["tiny_heldout"] == ("expr", "answer", "plain")
    assert (REGISTRY["gpqa_diamond"].hub_id, REGISTRY["gpqa_diamond"].hub_config) == (
        "Idavidrein/gpqa",
        "gpqa_diamond",
    )
    assert REGISTRY["math500"].hub_split == "test" and REGISTRY["aime24"].hub_split == "train"


def test_math_prompt_and_gold_from_fixture() -> None:
    bench = load_benchmark("math500", path=FIXTURES)
    assert len(bench.problems) == 5 and bench.source.endswith("math500.jsonl")
    p = bench.problems[1]
    assert p.id == "syn-2" and p.mode == "latex"
    assert p.gold == "Divide by 2: $\\boxed{\\frac{3}{4}}$."  # LaTeX gold = the whole solution
    assert p.prompt_text.startswith(
        "Solve the following math problem efficiently and clearly.  The last line"
    )
    assert p.prompt_text.endswith("answering.\n\nSimplify $\\frac{6}{8}$.")
    assert "$\\boxed{ANSWER}$" in p.prompt_text


def test_expr_gold_is_answer_and_integral_floats_lose_point_zero() -> None:
    bench = load_benchmark("amc23", path=FIXTURES / "amc23.jsonl")
    assert [p.gold for p in bench.problems] == ["7", "-1"]
    assert [p.id for p in bench.problems] == ["amc23-0", "amc23-1"]
    assert all(p.mode == "expr" and p.reference is None for p in bench.problems)


def test_gpqa_slots_are_seeded_and_the_gold_letter_points_at_the_correct_option() -> None:
    rows = [json.loads(line) for line in (FIXTURES / "gpqa_diamond.jsonl").read_text().splitlines()]
    for seed in range(6):
        bench = load_benchmark("gpqa_diamond", path=FIXTURES, seed=seed)
        for row, p in zip(rows, bench.problems, strict=True):
            slot = LETTERS.index(p.gold)
            assert f"\n{p.gold}) {row['correct_answer']}\n" in p.prompt_text + "\n"
            wrong = [
                line[3:] for line in p.prompt_text.splitlines()[-4:] if not line.startswith(p.gold + ")")
            ]
            assert wrong == row["incorrect_answers"]  # incorrect options keep their order around the slot
            assert p.prompt_text.startswith("Answer the following multiple choice question.")
            assert 0 <= slot <= 3 and p.mode == "letter"
    golds = {
        s: [p.gold for p in load_benchmark("gpqa_diamond", path=FIXTURES, seed=s).problems] for s in range(6)
    }
    assert golds[0] == [p.gold for p in load_benchmark("gpqa_diamond", path=FIXTURES, seed=0).problems]
    assert len({tuple(g) for g in golds.values()}) > 1, "different seeds should move the correct option"
    assert [p.gold for p in load_benchmark("gpqa_diamond", path=FIXTURES, seed=3, limit=2).problems] == golds[
        3
    ][:2]


def test_gpqa_hub_column_names_give_the_same_prompts() -> None:
    local = load_benchmark("gpqa_diamond", path=FIXTURES, seed=7)
    hub = load_benchmark("gpqa_diamond", path=FIXTURES / "gpqa_hub_columns.jsonl", seed=7)
    assert [(p.id, p.prompt_text, p.gold) for p in local.problems] == [
        (p.id, p.prompt_text, p.gold) for p in hub.problems
    ]


def test_gpqa_template_layout() -> None:
    text = GPQA_QUERY_TEMPLATE.format(Question="Q", A="a", B="b", C="c", D="d")
    assert text.endswith("one of ABCD. Think step by step before answering.\n\nQ\n\nA) a\nB) b\nC) c\nD) d")
    assert MATH_QUERY_TEMPLATE.count("{Question}") == 1


def test_render_is_one_user_message_with_generation_prompt() -> None:
    p = load_benchmark("math500", path=FIXTURES).problems[0]
    tok = CharTokenizer()
    assert render_text(p, tok) == "^<user>" + p.prompt_text + "</user><assistant>"
    ids = render(p, tok)
    assert ids == tok.encode(render_text(p, tok)) and ids[0] != 1
    assert render(p, tok, add_special_tokens=True) == [1] + ids  # lighteval's double BOS, on request


def test_render_without_chat_template_fails_clearly() -> None:
    tok = CharTokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        render(load_benchmark("math500", path=FIXTURES).problems[0], tok)


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'math5000'.*math500"):
        load_benchmark("math5000")
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        load_benchmarks(["math500", "nope"], data_dir=FIXTURES)
    with pytest.raises(FileNotFoundError, match="aime24.jsonl"):
        load_benchmark("aime24", path=FIXTURES)
    with pytest.raises(ValueError, match="row 1: missing field"):
        load_benchmark("math500", path=FIXTURES / "bad_row.jsonl")
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("math500", path=FIXTURES, limit=0)
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\n{not json\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_benchmark("aime24", path=bad)


def test_tiny_heldout_uses_the_task_module_with_a_plain_prompt() -> None:
    from lightning_tina.tiny.task import heldout_rows

    bench = load_benchmark("tiny_heldout", limit=10)
    rows = heldout_rows()[:10]
    assert [p.prompt_text for p in bench.problems] == [r["problem"] for r in rows]
    assert [p.gold for p in bench.problems] == [r["answer"] for r in rows]
    assert all(p.mode == "expr" for p in bench.problems)
    assert len(load_benchmark("tiny_heldout", path=FIXTURES).problems) == 256  # a data directory is ignored


@needs_shared
def test_offline_copies_load_with_tina_modes() -> None:
    expected = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272, "gpqa_diamond": 198}
    expected["olympiadbench"] = 675
    benches = load_benchmarks(list(expected), data_dir=SHARED)
    for b in benches:
        assert len(b.problems) == expected[b.name], b.name
        assert len({p.id for p in b.problems}) == len(b.problems), f"{b.name}: ids not unique"
        assert all(p.mode == b.spec.mode and p.gold for p in b.problems)
    by = {b.name: b for b in benches}
    assert by["aime24"].problems[0].gold.isdigit()
    assert all("\\boxed" in p.gold for p in by["minerva"].problems)
    slots = Counter(p.gold for p in by["gpqa_diamond"].problems)
    assert set(slots) == set(LETTERS) and min(slots.values()) > 30  # roughly uniform over 198 rows


@pytest.mark.skipif(not (TINY / "tokenizer_config.json").is_file(), reason=f"tiny model not built at {TINY}")
def test_render_with_the_tiny_tokenizer() -> None:
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(TINY)
    p = load_benchmark("tiny_heldout", limit=1).problems[0]
    text = render_text(p, tok)
    assert p.prompt_text in text
    assert tok.decode(render(p, tok)) == text


def test_repeated_problem_ids_are_refused(tmp_path: Path) -> None:
    rows = [{"id": "same", "problem": f"{i}+1?", "answer": str(i + 1)} for i in range(2)]
    path = tmp_path / "dupes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"repeats problem ids \['same'\]"):
        load_benchmark("aime24", path=path)
