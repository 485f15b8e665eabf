"""ReasoningDataModule: streams chat-templated prompts for GRPO, and held-out prompts for validate/test.

Rows come from the embedded arithmetic task ("tiny_arithmetic") or from lightning_tina.data_sources (Tina's
datasets by name, any hub id, local JSON/JSONL/CSV/Parquet), normalized to {"problem", "solution", ...}.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from lightning_tina.data_sources import (
    DatasetEntry,
    DataSource,
    RowError,
    iter_raw_rows,
    normalize,
    resolve,
    row_rng,
    system_prompt_for,
    validate_head,
)
from lightning_tina.data_sources.registry import GoldRule
from lightning_tina.prompts import render_prompt, resolve_system_prompt
from lightning_tina.rank_state import gather_ranks, own_rank
from lightning_tina.types import PromptBatch

TINY_SOURCE = "tiny_arithmetic"


class ReasoningDataModule(L.LightningDataModule):
    """Prompts for GRPO: one line of YAML picks the dataset.

    Args:
        source: "tiny_arithmetic" (generated, endless), a Tina dataset name ("limr", "open_rs3", ...), a hub id, or
            a local JSON/JSONL/CSV/Parquet file or glob.
        split: dataset split (hub sources).
        config: hub dataset config; None keeps Tina's choice.
        columns: source column -> our column ("problem", "answer", "solution", ...), e.g. {question_text: problem}.
        system_prompt: "open_r1", "open_rs", "none" or the text; None keeps Tina's choice for the dataset.
        chat_template: "tina_r1" (Tina's DeepSeek-R1 template), a Jinja string, or None for the tokenizer's own.
        tokenizer: tokenizer directory or hub id; linked from model.model by the CLI.
        prompts_per_step: prompts per optimizer step (B); linked as model.grpo.batch_size / num_generations.
        max_prompt_length: prompts longer than this many tokens are dropped and counted, never cut.
        gold: where a training row's gold comes from: "answer" (a bare answer, else the last \\boxed{} of a worked
            solution) or "tina" (Tina's grpo.py: the worked `solution` verbatim when the dataset has one, else
            `$answer$`; see DataSource.gold). Held-out rows always use "answer".
        drop_unparseable_gold: drop (and count) training rows whose gold math-verify cannot read. False keeps
            them, as Tina did: their accuracy-type rewards are then None and the other rewards still train.
        streaming: read lazily (hub streaming or line by line) with a shuffle buffer instead of a full permutation.
        shuffle_buffer: rows in the streaming shuffle buffer.
        seed: order of the rows (and the tiny task's generator).
        validate_rows: rows checked at start-up; a bad one stops the run with a message naming row, column, fix.
        val_source: held-out prompts for validate/test: "tiny_arithmetic" (its held-out split), another source, None.
        val_size: held-out problems used.
        val_batch_size: held-out prompts per validation batch.
    """

    def __init__(
        self,
        source: str = TINY_SOURCE,
        split: str = "train",
        config: str | None = None,
        columns: dict[str, str] | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        tokenizer: str = "data/tiny",
        prompts_per_step: int = 8,
        max_prompt_length: int = 512,
        gold: GoldRule = "answer",
        drop_unparseable_gold: bool = True,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        validate_rows: int = 16,
        val_source: str | None = TINY_SOURCE,
        val_size: int = 256,
        val_batch_size: int = 32,
    ) -> None:
        super().__init__()
        # where the rows come from, and how each becomes a prompt and a gold
        self.source, self.split, self.config, self.columns = source, split, config, dict(columns or {})
        self.system_prompt, self.chat_template, self.tokenizer_name = system_prompt, chat_template, tokenizer
        self.prompts_per_step, self.max_prompt_length = prompts_per_step, max_prompt_length
        self.gold: GoldRule = gold
        self.drop_unparseable_gold, self.validate_rows = drop_unparseable_gold, validate_rows
        # the order of the stream
        self.streaming, self.shuffle_buffer, self.seed = streaming, shuffle_buffer, seed
        # the held-out prompts of validate/test
        self.val_source, self.val_size, self.val_batch_size = val_source, val_size, val_batch_size
        self.tokenizer: Any = None
        self.entry: DatasetEntry | None = None
        self.epoch = 0  # position in the stream: epoch and raw rows read in it (checkpointed)
        self.rows_in_epoch = 0
        self.skipped: Counter[str] = Counter()  # rows dropped, by reason ("too_long", RowError kinds)
        self.consumed: dict[str, int] | None = None  # position after the last batch handed to training_step
        # the training loader's prompt stream
        self._live: Iterator[tuple[list[int], dict[str, Any]]] | None = None
        # (epoch, row) -> (epoch, row) ranges refills read
        self._refills: list[tuple[int, int, int, int]] = []
        self.skips: list[tuple[int, int, int, int]] = []  # such ranges after the resume point: jumped over

    # ---- set-up --------------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            from lightning_tina.policy import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_name)
        if stage in (None, "fit") and self.source != TINY_SOURCE and self.entry is None:
            self.entry = self._resolve(self.source)
            head = list(itertools.islice(self._raw(self.entry, epoch=0, skip=0), self.validate_rows))
            validate_head(self.entry, head, check_answer=self.drop_unparseable_gold)
        render_prompt(
            self.tokenizer, "check", None, self.chat_template
        )  # no chat template: fail before training

    def _resolve(self, name: str, gold: GoldRule | None = None) -> DatasetEntry:
        return resolve(
            DataSource(
                name=name,
                split=self.split,
                config=self.config,
                columns=self.columns,
                system_prompt=self.system_prompt,
                gold=self.gold if gold is None else gold,
            )
        )

    def _raw(self, entry: DatasetEntry, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        return iter_raw_rows(
            entry,
            streaming=self.streaming,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            skip=skip,
            epoch=epoch,
        )

    def render(self, problem: str, row: dict[str, Any] | None = None) -> list[int]:
        """Token ids of the chat-templated prompt for `problem` (generation prompt appended, nothing cut)."""
        if self.entry is not None:
            system = system_prompt_for(self.entry, row)
        else:
            system = resolve_system_prompt(self.system_prompt if self.system_prompt != "none" else None)
        text = render_prompt(self.tokenizer, problem, system, self.chat_template)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- rows ----------------------------------------------------------------------------------------------------

    def _train_rows(self) -> Iterator[dict[str, Any]]:
        """Normalized training rows from the saved position on; bad rows are skipped and counted by kind. Ranges
        of the stream that dynamic sampling's refills read before a resume (`skips`) are jumped over."""
        while True:
            jumped = False
            for raw in self._raw_rows():
                if self._jump():  # the row just read lies in a skipped range: restart after it
                    jumped = True
                    break
                pos = self.rows_in_epoch
                self.rows_in_epoch += 1
                if self.source == TINY_SOURCE:
                    yield raw
                    continue
                assert self.entry is not None
                try:
                    yield normalize(
                        self.entry,
                        raw,
                        rng=row_rng(self.seed, self.epoch, pos),
                        index=pos,
                        check_answer=self.drop_unparseable_gold,
                    )
                except RowError as err:
                    self.skipped[err.kind] += 1
            if jumped:
                continue
            if self.rows_in_epoch == 0:
                raise ValueError(f"data.source {self.source!r} yields no rows")
            self.epoch += 1
            self.rows_in_epoch = 0

    def _raw_rows(self) -> Iterator[dict[str, Any]]:
        """Raw rows of the current epoch from the current position (the tiny task: one endless epoch)."""
        if self.source == TINY_SOURCE:
            from lightning_tina.tiny.task import train_rows

            return itertools.islice(train_rows(self.seed), self.rows_in_epoch, None)
        assert self.entry is not None
        return self._raw(self.entry, self.epoch, self.rows_in_epoch)

    def _jump(self) -> bool:
        """If the stream has reached the first pending skipped range, move the position to its end (True)."""
        if not self.skips or (self.epoch, self.rows_in_epoch) < self.skips[0][:2]:
            return False
        _, _, self.epoch, self.rows_in_epoch = self.skips.pop(0)
        return True

    def _rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size) of this process; (0, 1) outside a Trainer."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _prompts(self, rows: Iterator[dict[str, Any]]) -> Iterator[tuple[list[int], dict[str, Any]]]:
        rank, world = self._rank_and_world()
        for row in rows:
            if (self.rows_in_epoch - 1) % world != rank:
                continue  # another rank's row: every rank reads the one stream and keeps every world-th row
            ids = self.render(row["problem"], row)
            if len(ids) > self.max_prompt_length:
                self.skipped["too_long"] += 1
                continue
            yield ids, row

    def _val_rows(self) -> list[dict[str, Any]]:
        if self.val_source is None:
            return []
        if self.val_source == TINY_SOURCE:
            from lightning_tina.tiny.task import heldout_rows

            return heldout_rows(self.val_size)
        entry = self._resolve(self.val_source, gold="answer")  # graded by the strict checker
        raw = iter_raw_rows(entry, streaming=False, seed=self.seed, shuffle_buffer=1, shuffle=False)
        return [
            normalize(entry, r, rng=row_rng(self.seed, 0, i), index=i)
            for i, r in zip(range(self.val_size), raw, strict=False)
        ]

    def _collate(self, items: list[tuple[list[int], dict[str, Any]]]) -> PromptBatch:
        ids = [i for i, _ in items]
        position = {
            "epoch": self.epoch,
            "rows_in_epoch": self.rows_in_epoch,
        }  # the stream has just read this batch
        return PromptBatch(
            prompt_ids=ids,
            rows=[r for _, r in items],
            position=position,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning reads one batch ahead; the position to resume from is the one after the batch being trained on.
        if (
            isinstance(batch, PromptBatch)
            and batch.position is not None
            and self.trainer
            and self.trainer.training
        ):
            self.consumed = dict(batch.position)
        return batch

    # ---- loaders -------------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        stream = _Stream(self._live_prompts)
        return DataLoader(stream, batch_size=self.prompts_per_step, collate_fn=self._collate)

    def _live_prompts(self) -> Iterator[tuple[list[int], dict[str, Any]]]:
        self._live = self._prompts(self._train_rows())
        return self._live

    def refill(self, n: int) -> PromptBatch:
        """`n` more training prompts from the loader's stream, where it stands (model.grpo.dynamic_sampling).

        Lightning has already read the next step's batch when a step asks, so a refill's rows follow that batch in
        the stream; the range it read is recorded and, after a resume, jumped over (state_dict's "skips"), so the
        resumed run reads the same rows for the same steps as an uninterrupted one.
        """
        if self._live is None:
            raise RuntimeError(
                "ReasoningDataModule.refill: the training stream is not open (call it during fit)"
            )
        start = (self.epoch, self.rows_in_epoch)
        items = list(itertools.islice(self._live, n))
        if len(items) < n:
            raise RuntimeError(f"data.source {self.source!r}: the prompt stream ended during a refill")
        if self._refills and self._refills[-1][2:] == start:  # contiguous with the last range: extend it
            start = self._refills.pop()[:2]
        self._refills.append((*start, self.epoch, self.rows_in_epoch))
        if self.consumed is not None:  # ranges before the resume point are never needed again
            here = (self.consumed["epoch"], self.consumed["rows_in_epoch"])
            self._refills = [r for r in self._refills if r[:2] >= here]
        return self._collate(items)

    def val_dataloader(self) -> DataLoader:
        rows = self._val_rows()
        items = [(self.render(r["problem"], r), r) for r in rows]
        return DataLoader(items, batch_size=self.val_batch_size, collate_fn=self._collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # ---- resume --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        pos = self.consumed or {"epoch": self.epoch, "rows_in_epoch": self.rows_in_epoch}
        state: dict[str, Any] = {**pos, "skipped": dict(self.skipped)}
        here = (pos["epoch"], pos["rows_in_epoch"])
        self._refills = [r for r in self._refills if r[:2] >= here]  # older ones lie before any resume point
        skips = [list(r) for r in self.skips + self._refills if r[:2] >= here]
        if skips:  # refills read past the resume point (dynamic sampling): a resume jumps over them
            state["skips"] = skips
        return gather_ranks(state)  # each rank's position (ranks read apart)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = own_rank(state)
        self.epoch = int(state.get("epoch", 0))
        self.rows_in_epoch = int(state.get("rows_in_epoch", 0))
        self.skipped = Counter(state.get("skipped", {}))
        self.skips = [(int(a), int(b), int(c), int(d)) for a, b, c, d in state.get("skips", [])]
        self._refills = []


class _Stream(IterableDataset):
    """An IterableDataset over a generator factory (called anew for each pass)."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Any]:
        return iter(self.make())
