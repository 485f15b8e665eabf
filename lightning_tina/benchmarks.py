"""The benchmarks of Tina's evaluation: registry, loading (hub or local JSONL), prompts and chat rendering.

Prompts follow Tina's lighteval task file (`scripts/eval/run_eval_custom_tasks.py`): every math benchmark wraps the
problem in one query template that asks for a boxed final answer; GPQA-Diamond lists the four options under A-D with
the correct one in a random slot. Tina drew that slot from Python's global `random` before lighteval seeded it, so its
slots cannot be reproduced; here they come from `random.Random(seed)`, one draw per row in dataset order (a `limit`
keeps the slots of the full set). The rendered prompt is one user message under the tokenizer's chat template, no
system prompt, as `lighteval --use-chat-template` built it.

Grading modes (see `lightning_tina.checker`): "expr" compares with the answer string (AIME24/25, AMC23), "latex"
extracts the answer from a LaTeX gold (MATH-500 and Minerva: the whole reference solution; OlympiadBench: the answer),
"letter" reads one of A-D (GPQA).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Mode = Literal["expr", "latex", "letter"]
Template = Literal["math", "gpqa", "plain"]
GoldField = Literal["answer", "solution", "letter"]

MATH_QUERY_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of the "
    "following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' (without quotes) "
    "where ANSWER is just the final number or expression that solves the problem. Think step by step before "
    "answering.\n\n{Question}"
)
"""Tina's math query (from simple-evals); `{{ANSWER}}` renders as `{ANSWER}`. Note the double space after 'clearly.'."""

GPQA_QUERY_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering."
    "\n\n{Question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)
"""Tina's GPQA query (from simple-evals); options are inserted as given, without stripping whitespace."""

LETTERS = "ABCD"


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how Tina prompts and grades it."""

    name: str
    """Registry key, e.g. "math500"."""
    title: str
    """Column header in the results table (Tina's spelling, e.g. "MATH500")."""
    hub_id: str | None
    """Hugging Face dataset id Tina loads; None for generated sets."""
    hub_config: str | None
    """Dataset config (subset) name on the hub; None for the default one."""
    hub_split: str
    """Split Tina evaluates on."""
    local_file: str | None
    """File name of the offline copy inside a data directory laid out like `shared/benchmarks/`."""
    mode: Mode
    """Checker mode Tina's metric corresponds to."""
    gold_field: GoldField
    """Row field the gold comes from ("letter": the slot of the correct GPQA option)."""
    template: Template
    """Query template: Tina's math one, Tina's GPQA one, or the bare problem."""


def _spec(
    name: str,
    title: str,
    hub: str | None,
    split: str,
    file: str | None,
    mode: Mode,
    gold: GoldField,
    template: Template = "math",
    config: str | None = None,
) -> BenchmarkSpec:
    """A registry entry in one line (positional arguments in the column order commented in REGISTRY)."""
    return BenchmarkSpec(name, title, hub, config, split, file, mode, gold, template)


REGISTRY: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in [  # name, title, hub id, split, local file, mode, gold field
        _spec("aime24", "AIME24", "HuggingFaceH4/aime_2024", "train", "aime24.jsonl", "expr", "answer"),
        _spec("aime25", "AIME25", "yentinglin/aime_2025", "train", "aime25.jsonl", "expr", "answer"),
        _spec("amc23", "AMC23", "knoveleng/AMC-23", "train", "amc23.jsonl", "expr", "answer"),
        _spec("math500", "MATH500", "HuggingFaceH4/MATH-500", "test", "math500.jsonl", "latex", "solution"),
        _spec("gpqa_diamond", "GPQA", "Idavidrein/gpqa", "train", "gpqa_diamond.jsonl", "letter", "letter",
              template="gpqa", config="gpqa_diamond"),
        _spec("minerva", "Minerva", "knoveleng/Minerva-Math", "train", "minerva_math.jsonl", "latex", "solution"),
        _spec("olympiadbench", "OlympiadBench", "knoveleng/OlympiadBench", "train", "olympiadbench.jsonl", "latex",
              "answer"),
        _spec("tiny_heldout", "TinyHeldout", None, "heldout", None, "expr", "answer", template="plain"),
    ]
}  # fmt: skip
"""All benchmarks by name, in the column order of Tina's results table (AIME24 ... Minerva), extras last."""


@dataclass(frozen=True)
class Problem:
    """One benchmark item, ready to render and grade."""

    id: str
    """Stable id (the dataset's own id where it has one, else `<benchmark>-<row index>`)."""
    prompt_text: str
    """The user message before the chat template (Tina's query template applied)."""
    gold: str
    """What the checker compares against (answer string, LaTeX solution, or a letter A-D)."""
    mode: Mode
    """Checker mode for this problem."""
    reference: str | None = None
    """A reference completion when the source has one (the worked solution; for GPQA 'Answer: <letter>')."""


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its spec, where it came from, and its problems in dataset order."""

    spec: BenchmarkSpec
    """Registry entry."""
    source: str
    """The file path, hub id or generator the rows came from."""
    seed: int
    """Seed of the GPQA option shuffle (unused by the other benchmarks)."""
    problems: list[Problem]
    """The problems, after `limit`."""

    @property
    def name(self) -> str:
        """Registry name of the benchmark."""
        return self.spec.name


def get_spec(name: str) -> BenchmarkSpec:
    """The registry entry for `name`, or a ValueError listing the known names."""
    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; choose from: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, with the line number in any parse error."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
    return rows


def _load_rows(spec: BenchmarkSpec, path: str | Path | None) -> tuple[list[dict[str, Any]], str]:
    """Raw rows and their source: a JSONL file, a directory holding `spec.local_file`, the hub, or the generator
    (generated sets ignore a directory, since a data directory serves all benchmarks of a run)."""
    if spec.name == "tiny_heldout":
        from lightning_tina.tiny.task import heldout_rows

        if path is not None and Path(path).is_file():
            return _read_jsonl(Path(path)), str(path)
        return heldout_rows(), "lightning_tina.tiny.task.heldout_rows(n=256, seed=1234)"
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / str(spec.local_file)
        if not p.is_file():
            raise FileNotFoundError(
                f"benchmark {spec.name!r}: no file at {p}; pass a JSONL file or a directory holding {spec.local_file}"
            )
        return _read_jsonl(p), str(p)
    import datasets

    ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    return [dict(r) for r in ds], f"hf://{spec.hub_id}" + (f"/{spec.hub_config}" if spec.hub_config else "")


def _field(row: dict[str, Any], names: tuple[str, ...], where: str) -> Any:
    """The first of `names` present (and not None) in `row`, or a ValueError naming the row and the fields."""
    for n in names:
        if row.get(n) is not None:
            return row[n]
    raise ValueError(f"{where}: missing field, expected one of {list(names)}; got keys {sorted(row)}")


def _as_text(value: Any) -> str:
    """Answers as text; integral floats (AMC's `27.0`) lose their `.0`."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _math_problem(spec: BenchmarkSpec, row: dict[str, Any], index: int) -> Problem:
    """A math row (problem/question + answer and/or solution) as a Problem."""
    where = f"benchmark {spec.name!r} row {index}"
    question = str(_field(row, ("problem", "question"), where))
    gold = _as_text(_field(row, (spec.gold_field,), where))
    solution = row.get("solution")
    pid = row.get("id", row.get("unique_id"))
    return Problem(
        id=str(pid) if pid is not None else f"{spec.name}-{index}",
        prompt_text=MATH_QUERY_TEMPLATE.format(Question=question) if spec.template == "math" else question,
        gold=gold,
        mode=spec.mode,
        reference=str(solution) if solution is not None else None,
    )


def _gpqa_problem(spec: BenchmarkSpec, row: dict[str, Any], index: int, slot: int) -> Problem:
    """A GPQA row (local or hub column names) with the correct option inserted at `slot` (0-3)."""
    where = f"benchmark {spec.name!r} row {index}"
    question = str(_field(row, ("question", "Question"), where))
    correct = str(_field(row, ("correct_answer", "Correct Answer"), where))
    if "incorrect_answers" in row:
        wrong = [str(x) for x in row["incorrect_answers"]]
    else:
        wrong = [str(_field(row, (f"Incorrect Answer {i}",), where)) for i in (1, 2, 3)]
    if len(wrong) != 3:
        raise ValueError(f"{where}: expected 3 incorrect answers, got {len(wrong)}")
    options = wrong[:slot] + [correct] + wrong[slot:]
    pid = row.get("id", row.get("Record ID"))
    return Problem(
        id=str(pid) if pid is not None else f"{spec.name}-{index}",
        prompt_text=GPQA_QUERY_TEMPLATE.format(Question=question, **dict(zip(LETTERS, options, strict=True))),
        gold=LETTERS[slot],
        mode="letter",
        reference=f"Answer: {LETTERS[slot]}",
    )


def load_benchmark(
    name: str, *, path: str | Path | None = None, limit: int | None = None, seed: int = 0
) -> Benchmark:
    """Load benchmark `name` from `path` (a JSONL file, or a directory laid out like `shared/benchmarks/`) or, when
    `path` is None, from its Hugging Face hub id. `limit` keeps the first problems in dataset order; `seed` fixes the
    GPQA option slots (slot of row i = the i-th `randint(0, 3)` of `random.Random(seed)`)."""
    spec = get_spec(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of problems or None, got {limit}")
    rows, source = _load_rows(spec, path)
    if not rows:
        raise ValueError(f"benchmark {name!r}: {source} has no rows")
    if spec.template == "gpqa":
        rng = random.Random(seed)
        problems = [_gpqa_problem(spec, r, i, rng.randint(0, 3)) for i, r in enumerate(rows)]
    else:
        problems = [_math_problem(spec, r, i) for i, r in enumerate(rows)]
    dupes = sorted(i for i, c in Counter(p.id for p in problems).items() if c > 1)
    if dupes:
        raise ValueError(f"benchmark {name!r}: {source} repeats problem ids {dupes[:5]}; ids must be unique")
    return Benchmark(spec=spec, source=source, seed=seed, problems=problems[:limit])


def load_benchmarks(
    names: list[str], *, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0
) -> list[Benchmark]:
    """Several benchmarks from one data directory (or the hub when `data_dir` is None); unknown names fail first."""
    for n in names:
        get_spec(n)
    return [load_benchmark(n, path=data_dir, limit=limit, seed=seed) for n in names]


def render_text(problem: Problem, tokenizer: Any) -> str:
    """The prompt string: `problem.prompt_text` as the only user message, chat template with generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat_template; Tina evaluates with --use-chat-template, so load a tokenizer "
            "that defines one (or set tokenizer.chat_template)"
        )
    messages = [{"role": "user", "content": problem.prompt_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render(problem: Problem, tokenizer: Any, *, add_special_tokens: bool = False) -> list[int]:
    """Token ids of the rendered prompt.

    The chat template already writes the BOS token, so the text is encoded without special tokens. lighteval
    ed084813 (Tina's pin) encoded it with `add_special_tokens=True`, which on tokenizers that add a BOS (such as
    DeepSeek-R1-Distill's) gives a second BOS; pass `add_special_tokens=True` to reproduce that.
    """
    return list(tokenizer.encode(render_text(problem, tokenizer), add_special_tokens=add_special_tokens))
