"""The dataset registry: normalization of every Tina dataset, local files, hub loading (faked), errors, resume."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_tina.data_sources import (
    REGISTRY,
    DataSource,
    DataValidationError,
    RowError,
    answer_parse_status,
    get_path,
    iter_raw_rows,
    last_boxed,
    normalize,
    resolve,
    row_rng,
    system_prompt_for,
    validate_head,
    wrap_math,
)
from lightning_tina.prompts import OPEN_R1_SYSTEM_PROMPT, OPEN_RS_SYSTEM_PROMPT, render_prompt

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "datasets"
TRAIN_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "train_samples"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def norm_all(entry: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [normalize(entry, r, rng=row_rng(0, 0, i), index=i) for i, r in enumerate(rows)]


# registry name -> (fixture file, expected golds, source column of the problem or None for "problem")
EXPECTED: dict[str, tuple[str, list[str], str | None]] = {
    "still": ("still.jsonl", ["$12$", "$8\\sqrt{2}$", "$6$", "$\\frac{1}{6}$"], "question"),
    "deepscaler": ("deepscaler.jsonl", ["$2$", "$96$", "$3\\sqrt{2}$", "$54$"], None),
    "2thought": ("2thought.jsonl", ["$12$", "$6$", "$3$", "$\\frac{1}{8}$"], "messages"),
    "open_rs1": ("open_s1.jsonl", ["$13$", "$24$", "$720$"], None),
    "open_rs2": ("open_rs.jsonl", ["$36$", "$9$", "$35$"], None),
    "open_rs3": ("open_rs.jsonl", ["$36$", "$9$", "$35$"], None),
    "limr": ("limr.jsonl", ["$18$", "$17$", "$13$"], "prompt"),
    "open_r1": ("open_r1.jsonl", ["$72$", "$3$", "$\\frac{11}{12}$"], None),
    "thoughts": ("thoughts.jsonl", ["$\\frac{5}{6}$", "$50$", "$5$"], None),
    "l1_exact": ("deepscaler.jsonl", ["$2$", "$96$", "$3\\sqrt{2}$", "$54$"], None),
    "l1_max": ("deepscaler.jsonl", ["$2$", "$96$", "$3\\sqrt{2}$", "$54$"], None),
}


def test_registry_has_every_tina_dataset() -> None:
    assert set(REGISTRY) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registry_entry_normalizes_its_schema(name: str) -> None:
    fixture, golds, problem_col = EXPECTED[name]
    raw = read_jsonl(FIXTURES / fixture)
    rows = norm_all(resolve(DataSource(name)), raw)
    assert [r["solution"] for r in rows] == golds
    for r, src in zip(rows, raw, strict=True):
        expected_problem = (
            src["messages"][0]["content"] if problem_col == "messages" else src[problem_col or "problem"]
        )
        assert r["problem"] == expected_problem
        assert answer_parse_status(r["solution"]) == "sympy"
        worked = src.get("solution")
        assert r.get("solution_archive") == worked  # worked solutions are kept aside, never the gold
        extras = set(r) - {"problem", "solution", "solution_archive"}
        assert extras == ({"target_length"} if name.startswith("l1_") else set())  # no bulky columns leak


def test_l1_target_length_is_drawn_per_row_and_reproducible() -> None:
    entry = resolve(DataSource("l1_exact"))
    raw = read_jsonl(FIXTURES / "deepscaler.jsonl")[0]
    lengths = [normalize(entry, raw, rng=row_rng(42, 0, i), index=i)["target_length"] for i in range(200)]
    assert all(100 <= n <= 4000 for n in lengths) and len(set(lengths)) > 150
    again = [normalize(entry, raw, rng=row_rng(42, 0, i))["target_length"] for i in range(200)]
    assert again == lengths
    row = normalize(entry, raw, rng=row_rng(1, 0, 0))
    assert (
        system_prompt_for(entry, row) == OPEN_R1_SYSTEM_PROMPT + f"\nThink for {row['target_length']} tokens."
    )
    with pytest.raises(ValueError, match="l1 variant"):
        normalize(entry, raw)


def test_system_prompt_follows_tinas_rule_and_can_be_overridden() -> None:
    chosen = {name: system_prompt_for(resolve(DataSource(name))) for name in REGISTRY}
    assert {n for n, p in chosen.items() if p == OPEN_RS_SYSTEM_PROMPT} == {"open_rs2", "open_rs3"}
    assert chosen["open_rs1"] == OPEN_R1_SYSTEM_PROMPT  # knoveleng/open-s1 does not contain "open-rs"
    assert system_prompt_for(resolve(DataSource("knoveleng/open-rs"))) == OPEN_RS_SYSTEM_PROMPT
    assert system_prompt_for(resolve(DataSource("limr", system_prompt="none"))) is None
    assert system_prompt_for(resolve(DataSource("limr", system_prompt="open_rs"))) == OPEN_RS_SYSTEM_PROMPT
    assert system_prompt_for(resolve(DataSource("limr", system_prompt="Be brief."))) == "Be brief."
    l1 = resolve(DataSource("l1_max", system_prompt="none"))
    assert system_prompt_for(l1, {"target_length": 7}) == "Think for 7 tokens."


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<｜begin▁of▁sentence｜>", unk_token="[UNK]"
    )


@pytest.mark.parametrize("fname", ["limr_math8k_rows_first300.jsonl", "limr_openrlhf_arrow_first300.jsonl"])
def test_limr_train_samples_normalize_render_and_parse(fname: str) -> None:
    path = TRAIN_SAMPLES / fname
    if not path.exists():
        pytest.skip(f"{path} is absent (the offline benchmark copies live beside the repo in shared/)")
    entry = resolve(DataSource("limr"))
    raw = read_jsonl(path)
    validate_head(entry, raw[:16])
    rows = norm_all(entry, raw)  # raises on any row whose gold math-verify cannot read
    assert [r["solution"] for r in rows] == [
        f"${r['answer']}$" for r in raw
    ]  # Tina's wrap, unchanged answers
    status = collections.Counter(answer_parse_status(r["solution"]) for r in rows)
    assert status["none"] == 0 and sum(status.values()) == len(raw)
    tok = tiny_tokenizer()
    for r in rows:
        text = render_prompt(tok, r["problem"], system_prompt_for(entry, r), "tina_r1")
        assert text.endswith("<｜User｜>" + r["problem"] + "<｜Assistant｜>")
        assert text.startswith("<｜begin▁of▁sentence｜>" + OPEN_R1_SYSTEM_PROMPT)


# ---- hub path (load_dataset faked with the fixtures) -------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name", ["thoughts", "2thought", "open_r1"])
def test_hub_path_calls_load_dataset_and_normalizes(
    monkeypatch: pytest.MonkeyPatch, name: str, streaming: bool
) -> None:
    fixture, golds, _ = EXPECTED[name]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_load_dataset(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        ds = datasets.Dataset.from_list(read_jsonl(FIXTURES / fixture))
        return ds.to_iterable_dataset(num_shards=1) if kwargs["streaming"] else ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    entry = resolve(DataSource(name))
    raw = list(iter_raw_rows(entry, streaming=streaming, seed=0, shuffle_buffer=4, shuffle=False))
    assert calls == [
        ((entry.hub_id,), {"name": entry.config, "split": "train", "revision": None, "streaming": streaming})
    ]
    assert [r["solution"] for r in norm_all(entry, raw)] == golds


def test_hub_config_and_revision_come_from_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_load_dataset(path: str, **kwargs: Any) -> datasets.Dataset:
        seen.update(kwargs, path=path)
        return datasets.Dataset.from_list([{"q": "What is $2+3$?", "a": 5}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = DataSource(
        "someone/math", split="test", config="easy", revision="v1", columns={"q": "problem", "a": "answer"}
    )
    entry = resolve(src)
    rows = [normalize(entry, r) for r in iter_raw_rows(src, streaming=False, seed=0, shuffle_buffer=1)]
    assert seen == {
        "path": "someone/math",
        "name": "easy",
        "split": "test",
        "revision": "v1",
        "streaming": False,
    }
    assert rows == [{"problem": "What is $2+3$?", "solution": "$5$"}]


# ---- local files -------------------------------------------------------------------------------------------------


def local_rows(name: str, **columns: str) -> list[dict[str, Any]]:
    src = DataSource(str(FIXTURES / name), columns=dict(columns))
    return [
        normalize(resolve(src), r)
        for r in iter_raw_rows(src, streaming=False, seed=0, shuffle_buffer=1, shuffle=False)
    ]


def test_local_jsonl_and_json_array() -> None:
    expected = [
        ("What is $7 \\times 8$?", "$56$"),
        ("Round $3.14159$ to two decimal places.", "$3.14$"),
        ("How many edges does a cube have?", "$12$"),
    ]
    assert [(r["problem"], r["solution"]) for r in local_rows("local_problems.jsonl")] == expected
    assert [
        (r["problem"], r["solution"]) for r in local_rows("local_problems.json")
    ] == expected  # question alias


def test_local_csv_keeps_text_and_needs_a_mapping() -> None:
    rows = local_rows("local_problems.csv", **{"Question": "problem", "Final Answer": "answer", "id": "id"})
    assert [r["solution"] for r in rows] == ["$56$", "$025$", "$3/4$"]  # "025" is not turned into 25
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]  # a mapped extra column is kept
    with pytest.raises(
        RowError, match=r"column 'problem': no problem column.*Fix: add `columns: \{Question: problem\}`"
    ):
        local_rows("local_problems.csv")


def test_local_parquet_with_bare_solutions_and_extras() -> None:
    rows = local_rows("local_problems.parquet", difficulty="difficulty")
    assert [(r["solution"], r["difficulty"]) for r in rows] == [("$81$", 1), ("$12$", 1), ("$3$", 2)]
    assert all("solution_archive" not in r for r in rows)


def test_local_glob_and_path_errors(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"part-{i}.jsonl").write_text(json.dumps({"problem": f"p{i}", "answer": str(i)}) + "\n")
    src = DataSource(str(tmp_path / "part-*.jsonl"))
    assert [
        r["problem"] for r in iter_raw_rows(src, streaming=True, seed=0, shuffle_buffer=1, shuffle=False)
    ] == ["p0", "p1", "p2"]
    with pytest.raises(ValueError, match="no file matches"):
        resolve(DataSource(str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="is a directory"):
        resolve(DataSource(str(tmp_path)))
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(ValueError, match="mixes file formats"):
        resolve(DataSource(str(tmp_path / "*")))
    with pytest.raises(ValueError, match="Did you mean 'deepscaler'"):
        resolve(DataSource("deepscalr"))


# ---- errors ------------------------------------------------------------------------------------------------------


def test_start_up_check_gives_one_clear_message() -> None:
    src = DataSource(str(FIXTURES / "bad_rows.jsonl"))
    raw = list(iter_raw_rows(src, streaming=False, seed=0, shuffle_buffer=1, shuffle=False))
    with pytest.raises(DataValidationError) as info:
        validate_head(resolve(src), raw)
    msg = str(info.value)
    assert "bad_rows.jsonl" in msg and "row 1, column 'answer'" in msg
    assert "Fix: add `columns: {final: answer}`" in msg and "3 of the first 5 rows fail" in msg
    assert [e.kind for e in info.value.errors] == ["missing_column", "empty", "unparseable"]
    with pytest.raises(DataValidationError, match="yields no rows"):
        validate_head(resolve(src), [])


def test_bad_rows_later_in_a_stream_are_skipped_and_counted() -> None:
    src = DataSource(str(FIXTURES / "bad_rows.jsonl"))
    entry = resolve(src)
    good, skipped = [], collections.Counter()
    for i, raw in enumerate(iter_raw_rows(src, streaming=True, seed=0, shuffle_buffer=1, shuffle=False)):
        try:
            good.append(normalize(entry, raw, index=i))
        except RowError as err:
            skipped[err.kind] += 1
            assert err.dataset == entry.name and err.index == i and err.column in ("answer", "problem")
    assert [r["solution"] for r in good] == ["$2$", "$8$"]
    assert skipped == {"missing_column": 1, "empty": 1, "unparseable": 1}


def test_other_row_errors_name_the_column_and_the_fix() -> None:
    entry = resolve(DataSource("still"))
    with pytest.raises(RowError, match=r"column 'question': the problem is empty") as info:
        normalize(entry, {"question": None, "answer": "1"})
    assert info.value.kind == "empty"
    with pytest.raises(RowError, match=r"column 'answer': the answer is a dict"):
        normalize(entry, {"question": "q", "answer": {"value": 1}})
    worked = {"problem": "p", "solution": "First we note that\nthe sum is 10, as claimed."}
    with pytest.raises(RowError, match="worked solution without") as info:
        normalize(resolve(DataSource("deepscaler", columns={})), {k: v for k, v in worked.items()})
    assert info.value.kind == "unparseable"
    with pytest.raises(RowError, match=r"the answer is a list.*`columns: \{final_answer.0: answer\}`"):
        normalize(
            resolve(DataSource("x/y", columns={"final_answer": "answer"})),
            {"problem": "p", "final_answer": ["1"]},
        )
    with pytest.raises(
        RowError, match=r"column 'messages.0.content': the mapped source is missing.*`messages.0.content: "
    ):
        normalize(resolve(DataSource("2thought")), {"messages": [], "verification_info": "{}"})


def test_user_mapping_overrides_the_registry_and_renames() -> None:
    entry = resolve(DataSource("limr", columns={"context": "problem", "id": "uid"}))
    row = normalize(
        entry, {"context": "Find $x$ if $x+1=3$.", "prompt": "ignored", "answer": "2", "id": "a1"}
    )
    assert row == {"problem": "Find $x$ if $x+1=3$.", "solution": "$2$", "uid": "a1"}


def test_path_boxed_and_wrap_helpers() -> None:
    row = {"m": [{"content": "hi"}], "v": '{"answer": {"value": 7}}', "a.b": 1}
    assert (
        get_path(row, "m.0.content") == "hi"
        and get_path(row, "v.answer.value") == 7
        and get_path(row, "a.b") == 1
    )
    with pytest.raises(KeyError):
        get_path(row, "m.3.content")
    assert last_boxed("so $\\boxed{\\frac{1}{2}}$ and then \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("no box") is None and last_boxed("\\boxed{1") is None
    assert wrap_math("5") == "$5$" and wrap_math("$5$") == "$5$" and wrap_math("\\(5\\)") == "\\(5\\)"


# ---- streaming and resume ----------------------------------------------------------------------------------------


def numbered_rows(n: int) -> list[dict[str, Any]]:
    return [{"problem": f"What is {i} + 0?", "answer": str(i)} for i in range(n)]


@pytest.mark.parametrize("streaming", [True, False])
def test_local_resume_with_skip_continues_the_same_sequence(tmp_path: Path, streaming: bool) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in numbered_rows(40)))
    src = DataSource(str(path))

    def run(skip: int = 0, seed: int = 7, epoch: int = 0) -> list[str]:
        rows = iter_raw_rows(src, streaming=streaming, seed=seed, shuffle_buffer=8, skip=skip, epoch=epoch)
        return [r["answer"] for r in rows]

    full = run()
    assert sorted(full, key=int) == [str(i) for i in range(40)] and full != sorted(full, key=int)
    for k in (0, 1, 13, 39, 40, 45):
        assert run(skip=k) == full[k:]
    assert run(seed=8) != full and run(epoch=1) != full


@pytest.mark.parametrize("streaming", [True, False])
def test_hub_resume_with_skip_continues_the_same_sequence(
    monkeypatch: pytest.MonkeyPatch, streaming: bool
) -> None:
    def fake_load_dataset(path: str, **kwargs: Any) -> Any:
        ds = datasets.Dataset.from_list(numbered_rows(40))
        return ds.to_iterable_dataset(num_shards=4) if kwargs["streaming"] else ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = DataSource("someone/numbers")

    def run(skip: int = 0) -> list[str]:
        return [
            r["answer"] for r in iter_raw_rows(src, streaming=streaming, seed=3, shuffle_buffer=8, skip=skip)
        ]

    full = run()
    assert sorted(full, key=int) == [str(i) for i in range(40)] and full != sorted(full, key=int)
    for k in (1, 17, 40):
        assert run(skip=k) == full[k:]


# ---- gold: tina (Tina's grpo.py column choice) ----------------------------------------------------------------------

TINA_GOLD_COLUMN = {
    "still": "answer",
    "deepscaler": "answer",  # Tina's DeepScaleR case: answer -> solution, the worked solution set aside
    "2thought": "verification_info.answer.value",
    "limr": "answer",
    "open_rs1": "solution",
    "open_rs2": "solution",
    "open_rs3": "solution",
    "open_r1": "solution",
    "thoughts": "solution",
    "l1_exact": "solution",  # the DeepScaleR case keys on the name "deepscaler"; the l1 rewards read no gold
    "l1_max": "solution",
}
"""Where Tina's grpo.py takes each registry dataset's gold: a `solution` column verbatim, else `$answer$`."""


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tina_gold_is_the_column_tinas_script_kept(name: str) -> None:
    fixture, _, _ = EXPECTED[name]
    raw = read_jsonl(FIXTURES / fixture)
    entry = resolve(DataSource(name, gold="tina"))
    rows = [normalize(entry, r, rng=row_rng(0, 0, i), index=i, check_answer=False) for i, r in enumerate(raw)]
    col = TINA_GOLD_COLUMN[name]
    if col == "solution":
        assert [r["solution"] for r in rows] == [src["solution"] for src in raw]  # the worked text, untouched
    else:
        assert [r["solution"] for r in rows] == [f"${get_path(src, col)}$" for src in raw]
    if name == "deepscaler":
        assert [r["solution_archive"] for r in rows] == [src["solution"] for src in raw]


def test_tina_gold_wraps_the_answer_as_tina_did() -> None:
    # Tina writes f"${answer}$": no stripping, no check for delimiters already there
    tina, ours = resolve(DataSource("limr", gold="tina")), resolve(DataSource("limr"))
    row = {"prompt": "p", "answer": "$5$ "}
    assert normalize(tina, row, check_answer=False)["solution"] == "$$5$ $"
    assert normalize(ours, row)["solution"] == "$5$"
    local = resolve(DataSource(str(FIXTURES / "local_problems.jsonl"), gold="tina"))
    assert local.gold == "tina"
    with pytest.raises(ValueError, match="data.gold"):
        resolve(DataSource("limr", gold="solution"))  # type: ignore[arg-type]


def test_tina_gold_keeps_rows_whose_gold_does_not_parse_when_asked() -> None:
    entry = resolve(DataSource(str(FIXTURES / "bad_rows.jsonl"), gold="tina"))
    raw = read_jsonl(FIXTURES / "bad_rows.jsonl")
    with pytest.raises(RowError, match="extracts no answer"):
        normalize(entry, raw[3], index=3)
    assert normalize(entry, raw[3], index=3, check_answer=False)["solution"] == "$\\boxed{}$"
