"""ReasoningDataModule: a resumed (streamed) run continues with exactly the prompts an uninterrupted run sees next."""

import itertools
import json
from pathlib import Path

import pytest

from lightning_tina.datamodule import ReasoningDataModule

TINY = str(Path(__file__).resolve().parents[1] / "data" / "tiny")


def _rows_file(tmp_path: Path, n: int = 30) -> Path:
    path = tmp_path / "rows.jsonl"
    rows = [{"problem": f"Compute {i}+{i % 7}.", "answer": str(i + i % 7)} for i in range(n)]
    rows[5]["answer"] = ""  # a bad row inside the stream: skipped and counted, not fatal
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _dm(path: Path, **kwargs) -> ReasoningDataModule:
    dm = ReasoningDataModule(
        source=str(path), tokenizer=TINY, prompts_per_step=4, system_prompt="none", validate_rows=4, **kwargs
    )
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("streaming", [True, False])
def test_resume_from_a_batch_position_continues_the_same_stream(tmp_path, streaming):
    path = _rows_file(tmp_path)
    straight = list(
        itertools.islice(iter(_dm(path, streaming=streaming, shuffle_buffer=8).train_dataloader()), 12)
    )
    problems = [[r["problem"] for r in b.rows] for b in straight]
    assert len({p for b in problems for p in b}) > 25  # crosses an epoch boundary, reshuffled
    for cut in (1, 6, 7):  # resume after batch `cut` (batch 7 is already in the second epoch)
        resumed = _dm(path, streaming=streaming, shuffle_buffer=8)
        resumed.load_state_dict(straight[cut].position)
        again = list(itertools.islice(iter(resumed.train_dataloader()), 12 - cut - 1))
        assert [[r["problem"] for r in b.rows] for b in again] == problems[cut + 1 :], cut


def test_bad_rows_in_the_stream_are_skipped_and_counted(tmp_path):
    dm = _dm(_rows_file(tmp_path), streaming=True, shuffle_buffer=8)
    batches = list(itertools.islice(iter(dm.train_dataloader()), 8))  # 32 prompts: the whole file once
    assert sum(dm.skipped.values()) >= 1
    assert all(r["solution"].strip() for b in batches for r in b.rows)


def test_long_prompts_are_dropped_and_counted_never_cut(tmp_path):
    dm = _dm(_rows_file(tmp_path), max_prompt_length=20)  # one-digit problems fit, two-digit ones do not
    batch = next(iter(dm.train_dataloader()))
    assert all(len(ids) <= 20 for ids in batch.prompt_ids)
    assert dm.skipped["too_long"] > 0


def test_tina_gold_and_unparseable_golds_kept_as_tina_did(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [
        {"problem": f"Compute {i}+1.", "solution": f"Add one: \\boxed{{{i + 1}}}.", "answer": str(i + 1)}
        for i in range(8)
    ]
    rows[6]["solution"] = rows[6]["answer"] = "\\boxed{}"  # math-verify reads nothing out of this gold
    path.write_text("\n".join(json.dumps(r) for r in rows))
    kept = _dm(path, gold="tina", drop_unparseable_gold=False, streaming=True, shuffle_buffer=1)
    golds = [r["solution"] for b in itertools.islice(iter(kept.train_dataloader()), 2) for r in b.rows]
    assert sorted(golds) == sorted(r["solution"] for r in rows)  # worked solutions, the bad one kept
    assert not kept.skipped
    strict = _dm(path, streaming=True, shuffle_buffer=1)
    golds = [r["solution"] for b in itertools.islice(iter(strict.train_dataloader()), 2) for r in b.rows]
    assert all(g.startswith("$") and g.endswith("$") and "boxed" not in g for g in golds)
    assert strict.skipped["unparseable"] == 1
