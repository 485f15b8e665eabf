"""Prompt parity, lightning_tina's side: the prompt ids and golds `ReasoningDataModule` builds, as the Tina recipes
configure it (chat_template tina_r1, gold tina, Tina's per-dataset system prompt), for the same fixture rows as
parity/prompts_tina.py. Runs in the project's environment.

The DataModule streams its real training batches; two things are replaced: the raw-row reader (the fixture rows in
file order, instead of the hub and our shuffle) and, for the l1 variants only, the per-row target-length draw (Tina's
drawn value for that row, since the two draws use different RNGs by design). Output: WORK/prompts_ours.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prompts_tina import FORMATS  # one list of formats for both sides (plain Python, no Tina import)

import lightning_tina.datamodule as dm_module
from lightning_tina.datamodule import ReasoningDataModule


class _Drawn:
    """Stands in for the row RNG of an l1 row: `randint` gives Tina's drawn target length."""

    def __init__(self, value: int) -> None:
        self.value = value

    def randint(self, low: int, high: int) -> int:
        assert low <= self.value <= high
        return self.value


def our_batch(name: str, rows: list[dict[str, Any]], tokenizer: str, targets: list[int | None]):
    """The first training batch of a DataModule over `rows` (all of them, in order)."""
    dm = ReasoningDataModule(
        source=name,
        chat_template="tina_r1",
        tokenizer=tokenizer,
        gold="tina",
        drop_unparseable_gold=False,
        prompts_per_step=len(rows),
        max_prompt_length=1_000_000,  # compare every row; the 512 limit is reported on Tina's side
        validate_rows=len(rows),
        seed=42,
    )
    real_reader, real_rng = dm_module.iter_raw_rows, dm_module.row_rng
    dm_module.iter_raw_rows = lambda entry, *, skip=0, **kw: iter(rows[skip:])
    if name.startswith("l1_"):
        dm_module.row_rng = lambda seed, epoch, index: _Drawn(targets[index])
    try:
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))
    finally:
        dm_module.iter_raw_rows, dm_module.row_rng = real_reader, real_rng


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True, type=Path, help="tests/fixtures/datasets")
    ap.add_argument("--work", required=True, type=Path, help="holds tokenizer/ and prompts_tina.json")
    args = ap.parse_args()
    tina = json.loads((args.work / "prompts_tina.json").read_text())
    out = {}
    for name, fixture in FORMATS.items():
        rows = [json.loads(x) for x in (args.fixtures / fixture).read_text().splitlines() if x.strip()]
        targets = [r["target_length"] for r in tina[name]["rows"]]
        batch = our_batch(name, rows, str(args.work / "tokenizer"), targets)
        out[name] = {
            "rows": [
                {"ids": list(ids), "solution": row["solution"], "target_length": row.get("target_length")}
                for ids, row in zip(batch.prompt_ids, batch.rows, strict=True)
            ]
        }
        print(f"ours {name}: {len(batch.prompt_ids)} rows")
    (args.work / "prompts_ours.json").write_text(json.dumps(out, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
