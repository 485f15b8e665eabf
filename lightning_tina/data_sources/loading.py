"""Read raw rows from the hub or from local files, shuffled with a seed, from any position in the stream.

The order of rows depends only on (source, streaming, seed, shuffle_buffer, epoch), so `skip=k` resumes a run after
its first k rows: the rows it yields are exactly those an uninterrupted run yields after its first k.

- Hub: `datasets.load_dataset(hub_id, name=config, split=split, revision=..., streaming=...)`. Not streaming: a full
  permutation (`Dataset.shuffle(seed)`); streaming: shard-order plus buffer shuffle (`IterableDataset.shuffle(seed,
  buffer_size)`, `set_epoch`).
- Local JSON/JSONL/CSV/Parquet: read here, not through `datasets`, so values keep their types (a CSV cell "025" stays
  the string "025") and nothing is cached. Not streaming: all rows, permuted; streaming: files read lazily in
  sorted order through a seeded buffer shuffle.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from collections.abc import Iterable, Iterator
from typing import Any

import datasets

from lightning_tina.data_sources.registry import DatasetEntry, DataSource, resolve


def _epoch_seed(seed: int, epoch: int) -> int:
    # a distinct, reproducible shuffle per epoch; same mixing for hub (map-style) and local rows
    return (seed * 1_000_003 + epoch) % (2**32)


def _read_json(path: str) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 12).lstrip()
        f.seek(0)
        if head.startswith("["):  # one JSON array
            rows = json.load(f)
            yield from rows
            return
        yield from _read_jsonl_handle(f, path)


def _read_jsonl_handle(f: Iterable[str], path: str) -> Iterator[dict[str, Any]]:
    for lineno, line in enumerate(f, start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {lineno}: not valid JSON ({err.msg}); fix or remove the line."
                ) from None


def _read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        yield from _read_jsonl_handle(f, path)


def _read_csv(path: str) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)  # every value stays a string


def _read_parquet(path: str) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


_READERS = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}


def _local_rows(entry: DatasetEntry) -> Iterator[dict[str, Any]]:
    reader = _READERS[entry.file_format or ""]
    for path in entry.files:
        for row in reader(path):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: every row must be a JSON object, got {type(row).__name__}.")
            yield row


def buffer_shuffle(
    rows: Iterable[dict[str, Any]], buffer_size: int, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """Approximate shuffle of a stream in O(buffer_size) memory: fill a buffer, then emit a random slot and refill
    it with the next row; drain the buffer shuffled at the end. Deterministic given the RNG state."""
    buf: list[dict[str, Any]] = []
    for row in rows:
        if len(buf) < buffer_size:
            buf.append(row)
            continue
        j = rng.randrange(buffer_size)
        yield buf[j]
        buf[j] = row
    rng.shuffle(buf)
    yield from buf


def _hub_rows(
    entry: DatasetEntry, *, streaming: bool, shuffle: bool, seed: int, shuffle_buffer: int, epoch: int
) -> Iterator[dict[str, Any]]:
    ds = datasets.load_dataset(
        entry.hub_id or "", name=entry.config, split=entry.split, revision=entry.revision, streaming=streaming
    )
    if streaming:
        if shuffle:
            ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
            ds.set_epoch(epoch)
    elif shuffle:
        ds = ds.shuffle(seed=_epoch_seed(seed, epoch))
    yield from ds


def iter_raw_rows(
    source: DataSource | DatasetEntry,
    *,
    streaming: bool,
    seed: int,
    shuffle_buffer: int,
    skip: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> Iterator[dict[str, Any]]:
    """Raw rows of a source, in the seeded order of `epoch`, starting after the first `skip` rows.

    `shuffle_buffer` is the buffer size of the streaming shuffle (a full permutation is used when not streaming).
    Resuming with `skip=k` reads and drops k rows, so it costs reading them but is exact by construction.
    """
    entry = resolve(source) if isinstance(source, DataSource) else source
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if streaming and shuffle and shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1 when streaming with shuffle, got {shuffle_buffer}")
    if entry.is_local:
        rows: Iterator[dict[str, Any]] = _local_rows(entry)
        if shuffle:
            rng = random.Random(_epoch_seed(seed, epoch))
            if streaming:
                rows = buffer_shuffle(rows, shuffle_buffer, rng)
            else:
                materialized = list(rows)
                rng.shuffle(materialized)
                rows = iter(materialized)
    else:
        rows = _hub_rows(
            entry, streaming=streaming, shuffle=shuffle, seed=seed, shuffle_buffer=shuffle_buffer, epoch=epoch
        )
    return itertools.islice(rows, skip, None)
