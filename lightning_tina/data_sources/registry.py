"""Where training prompts come from: the registry of Tina's datasets, and ad-hoc hub ids or local files.

A `DataSource` is what a config names; `resolve` turns it into a `DatasetEntry` that says how to load the rows and how
to normalize them. Tina's training script (`tina/post_train_hf/grpo.py`) picks the dataset by a short name and rewrites
its columns in code; here every such rewrite is data on the entry (a column mapping), so a user's own dataset gets the
same treatment from a one-line `columns:` mapping.
"""

from __future__ import annotations

import difflib
import glob
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from lightning_tina.prompts import resolve_system_prompt

LOCAL_FORMATS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""File suffix -> reader for local files."""

DEFAULT_PROBLEM_ALIASES: tuple[str, ...] = ("problem", "question", "prompt")
"""Columns tried in order for the problem when no mapping names one (Tina renames question/prompt -> problem)."""

TINA_L1_TARGET_RANGE: tuple[int, int] = (100, 4000)
"""Tina's l1 runs draw the target length uniformly from this inclusive range (`random.randint(100, 4000)`)."""

GoldRule = Literal["answer", "tina"]
"""Where a row's gold (`solution`) comes from; see DataSource.gold."""


@dataclass
class DataSource:
    """A config's choice of training data (one line of YAML for registry names)."""

    name: str
    """A registry name (see REGISTRY, e.g. "limr"), a Hugging Face hub id ("owner/dataset"), or a local
    JSON/JSONL/CSV/Parquet file or glob ("data/train-*.parquet")."""
    split: str = "train"
    """Dataset split to read (hub datasets only; a local file is one split)."""
    config: str | None = None
    """Hub dataset config (subset) name; None uses the registry's (Tina's) choice or the hub default."""
    columns: dict[str, str] = field(default_factory=dict)
    """Source column -> our column, applied before normalization, e.g. {"question_text": "problem",
    "final": "answer"}. Our columns: "problem"; "answer" (a bare final answer, wrapped in $...$ as the gold);
    "solution" (a worked solution whose last \\boxed{} is the gold, or a bare answer); any other target is kept
    as an extra field of the row. A source may be a path into nested or JSON-string values:
    "messages.0.content", "verification_info.answer.value". Merged over the registry entry's own mapping."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin the data to; None = the default branch."""
    system_prompt: str | None = None
    """Override Tina's per-dataset choice: "open_r1", "open_rs", "none", or the prompt text itself.
    None keeps Tina's choice (the open-rs prompt for knoveleng/open-rs, the Open-R1 prompt otherwise)."""
    gold: GoldRule = "answer"
    """Which column becomes the gold. "answer": the bare `answer` when the row has one (wrapped in $...$), else
    the last \\boxed{} of a worked `solution` (a clean gold for any grader). "tina": the rule of Tina's
    `grpo.py`: the `solution` column verbatim when the dataset has one (a worked solution, from which Tina's
    math-verify call extracts the gold), else f"${answer}$" (DeepScaleR: the answer, as Tina's special case)."""


@dataclass(frozen=True)
class DatasetEntry:
    """How to load and normalize one dataset: a registry entry or one made for an ad-hoc source."""

    name: str
    """The registry name, hub id or local path this entry was made for (used in every error message)."""
    hub_id: str | None = None
    """Hugging Face dataset id; None for local files."""
    config: str | None = None
    """Hub config (subset) passed to `datasets.load_dataset(name=...)`."""
    split: str = "train"
    """Split to read."""
    revision: str | None = None
    """Hub revision to pin; None = default branch."""
    files: tuple[str, ...] = ()
    """Local files (sorted glob matches), read in this order; empty for hub datasets."""
    file_format: str | None = None
    """Reader for `files`: "json" (one array or JSON lines), "jsonl", "csv" or "parquet"."""
    columns: dict[str, str] = field(default_factory=dict)
    """Source column (or path) -> our column, as in DataSource.columns (the entry's defaults merged with the
    user's mapping; the user's wins)."""
    problem_aliases: tuple[str, ...] = DEFAULT_PROBLEM_ALIASES
    """Columns tried in order for the problem when `columns` maps none to "problem"."""
    system_prompt: str | None = None
    """System prompt text for every row (None = no system message); l1 rows append their target length."""
    target_length_range: tuple[int, int] | None = None
    """For l1 variants: inclusive range of the per-row target length drawn into `target_length`."""
    length_control: str | None = None
    """For l1 variants: "exact" or "max", the length reward Tina pairs with this data."""
    gold: GoldRule = "answer"
    """Where the gold comes from (DataSource.gold)."""
    tina_gold: Literal["solution", "answer"] = "solution"
    """With gold "tina": the column Tina's script made the gold when a row has both (DeepScaleR: "answer")."""
    notes: str = ""
    """Where the schema and the normalization come from, and how they differ from Tina's script."""

    @property
    def is_local(self) -> bool:
        """True when the rows come from local files rather than the hub."""
        return bool(self.files)

    def describe(self) -> str:
        """A short label for messages: name plus where the rows come from."""
        if self.is_local:
            return f"{self.name!r} (local {self.file_format}, {len(self.files)} file(s))"
        where = self.hub_id + (f", config {self.config!r}" if self.config else "")
        return f"{self.name!r} ({where}, split {self.split!r})"


def _tina_system_prompt(hub_id: str | None) -> str | None:
    # Tina's rule, on the hub id: `OPEN_RS_SYSTEM_PROMPT if "open-rs" in name else OPEN_R1_SYSTEM_PROMPT`, so
    # knoveleng/open-s1 (open_rs1) gets the Open-R1 prompt although it is open-rs data.
    return resolve_system_prompt("open_rs" if hub_id and "open-rs" in hub_id else "open_r1")


def _entry(name: str, hub_id: str, *, notes: str, **kwargs: object) -> DatasetEntry:
    return DatasetEntry(
        name=name, hub_id=hub_id, system_prompt=_tina_system_prompt(hub_id), notes=notes, **kwargs
    )


_DEEPSCALER_NOTES = (
    "Columns problem, answer, solution (worked). Tina: answer -> solution wrapped in $...$, solution -> "
    "solution_archive. Same here."
)
_ANSWER_OVER_WORKED = (
    "Tina kept this dataset's worked `solution` as the gold (it has a `solution` column, so Tina's script does "
    "not rename `answer`) and math-verify read the gold out of the worked text. With `gold: answer` (the "
    "default) the `answer` column is the gold (wrapped in $...$) and the worked solution goes to solution_archive; "
    "`gold: tina` (configs/tina) keeps Tina's choice."
)

REGISTRY: dict[str, DatasetEntry] = {
    "still": _entry(
        "still",
        "RUC-AIBOX/STILL-3-Preview-RL-Data",
        notes="Columns question, answer. Tina: question -> problem, answer -> solution wrapped in $...$.",
    ),
    "deepscaler": _entry(
        "deepscaler", "agentica-org/DeepScaleR-Preview-Dataset", tina_gold="answer", notes=_DEEPSCALER_NOTES
    ),
    "2thought": _entry(
        "2thought",
        "Intelligent-Internet/II-Thought-RL-v0-Math-50K",
        columns={"messages.0.content": "problem", "verification_info.answer.value": "answer"},
        notes=(
            "Columns messages (chat list), verification_info (JSON string). Tina: problem = messages[0].content, "
            "solution = $json.loads(verification_info)['answer']['value']$. (Tina's script drops `messages` "
            "before that rename, which would fail as published; the intent is reproduced here.)"
        ),
    ),
    "open_rs1": _entry(
        "open_rs1",
        "knoveleng/open-s1",
        notes="Columns problem, solution, answer, source, messages. Open-R1 prompt (Tina's rule). "
        + _ANSWER_OVER_WORKED,
    ),
    "open_rs2": _entry(
        "open_rs2",
        "knoveleng/open-rs",
        notes="Columns problem, solution, answer, level. Open-RS prompt. " + _ANSWER_OVER_WORKED,
    ),
    "open_rs3": _entry(
        "open_rs3",
        "knoveleng/open-rs",
        notes="Same data as open_rs2 (the runs differ in rewards). " + _ANSWER_OVER_WORKED,
    ),
    "limr": _entry(
        "limr",
        "GAIR/LIMR",
        problem_aliases=(*DEFAULT_PROBLEM_ALIASES, "context"),
        notes=(
            "HF limr.json: prompt, answer (Tina: prompt -> problem, answer -> $answer$). The LIMR authors' own "
            "OpenRLHF release names the problem `context`, so that alias is accepted too."
        ),
    ),
    "open_r1": _entry(
        "open_r1",
        "open-r1/OpenR1-Math-220k",
        config="default",
        notes="Columns problem, solution, answer, uuid, generations, messages, ... " + _ANSWER_OVER_WORKED,
    ),
    "thoughts": _entry(
        "thoughts",
        "bethgelab/CuratedThoughts",
        config="OpenThoughts-114k-math-default",
        notes=(
            "Columns source, problem, solution (worked, NuminaMath), messages, ... with no answer column. Tina kept "
            "the worked solution as gold (`gold: tina`); with `gold: answer` the gold is its last \\boxed{} "
            "(wrapped in $...$) and the worked text goes to solution_archive."
        ),
    ),
    "l1_exact": _entry(
        "l1_exact",
        "agentica-org/DeepScaleR-Preview-Dataset",
        target_length_range=TINA_L1_TARGET_RANGE,
        length_control="exact",
        notes=(
            "DeepScaleR (Tina's map names it in a comment; the entry itself is commented out there) plus a "
            "per-row target length in [100, 4000] appended to the system prompt as '\\nThink for N tokens.'. "
            + _DEEPSCALER_NOTES
            + " With `gold: tina` the gold is the worked solution: Tina's DeepScaleR case keys on the name "
            "'deepscaler', which 'l1_exact' does not contain (its length rewards read no gold)."
        ),
    ),
    "l1_max": _entry(
        "l1_max",
        "agentica-org/DeepScaleR-Preview-Dataset",
        target_length_range=TINA_L1_TARGET_RANGE,
        length_control="max",
        notes="As l1_exact; Tina pairs it with the l1 'max' length reward.",
    ),
}
"""Tina's training datasets by the names its recipes use (`model_post_train_dataset_name`)."""


def _local_files(name: str) -> tuple[str, ...] | None:
    """The files a local path or glob names, or None if `name` does not look local."""
    if glob.has_magic(name):
        return tuple(sorted(glob.glob(name, recursive=True)))
    path = Path(name)
    if path.is_file():
        return (name,)
    if path.is_dir():
        raise ValueError(
            f"data source {name!r} is a directory; name the files instead, e.g. '{name}/*.jsonl'."
        )
    if path.suffix.lower() in LOCAL_FORMATS:
        return ()
    return None


def _file_format(name: str, files: tuple[str, ...]) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = sorted(s for s in suffixes if s not in LOCAL_FORMATS)
    if unknown:
        raise ValueError(
            f"data source {name!r}: cannot read files ending in {unknown}; use {sorted(LOCAL_FORMATS)}."
        )
    formats = {LOCAL_FORMATS[s] for s in suffixes}
    if formats == {"json", "jsonl"}:
        return "json"  # the JSON reader also takes JSON lines
    if len(formats) != 1:
        raise ValueError(
            f"data source {name!r} mixes file formats {sorted(formats)}; use one format per source."
        )
    return formats.pop()


def resolve(source: DataSource) -> DatasetEntry:
    """The entry for a source: the registry's, or an ad-hoc one for a hub id or local files.

    The source's config, revision, column mapping and system prompt override are folded into the entry.
    """
    if source.name in REGISTRY:
        base = REGISTRY[source.name]
        entry = replace(
            base,
            split=source.split,
            config=source.config if source.config is not None else base.config,
            revision=source.revision,
            columns={**base.columns, **source.columns},
        )
    else:
        files = _local_files(source.name)
        if files is not None:
            if not files:
                raise ValueError(f"data source {source.name!r}: no file matches; check the path or glob.")
            entry = DatasetEntry(
                name=source.name,
                files=files,
                file_format=_file_format(source.name, files),
                columns=dict(source.columns),
                system_prompt=_tina_system_prompt(None),
                notes="Local files, Tina's generic normalization.",
            )
        elif "/" in source.name:
            entry = DatasetEntry(
                name=source.name,
                hub_id=source.name,
                config=source.config,
                split=source.split,
                revision=source.revision,
                columns=dict(source.columns),
                system_prompt=_tina_system_prompt(source.name),
                notes="Hub dataset, Tina's generic normalization.",
            )
        else:
            close = difflib.get_close_matches(source.name, list(REGISTRY), n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"data source {source.name!r} is not a registry name ({', '.join(sorted(REGISTRY))}), a hub id "
                f"('owner/dataset') or an existing local file. {hint}"
            )
    if source.gold not in get_args(GoldRule):
        raise ValueError(f"data.gold must be 'answer' or 'tina', got {source.gold!r}")
    entry = replace(entry, gold=source.gold)
    if source.system_prompt is not None:
        entry = replace(entry, system_prompt=resolve_system_prompt(source.system_prompt))
    return entry


def system_prompt_for(entry: DatasetEntry, row: dict[str, Any] | None = None) -> str | None:
    """The system prompt for a row: the entry's (Tina's per-dataset choice or the override), plus for l1
    variants Tina's suffix "\\nThink for {target_length} tokens." using the row's `target_length`."""
    prompt = entry.system_prompt
    if entry.target_length_range is None or row is None:
        return prompt
    if "target_length" not in row:
        raise ValueError(
            f"dataset {entry.name!r} is an l1 variant but the row has no target_length; normalize it first."
        )
    suffix = f"\nThink for {row['target_length']} tokens."
    return suffix.lstrip("\n") if prompt is None else prompt + suffix
