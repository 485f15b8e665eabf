"""Prompt parity, Tina's side: the prompt token ids and golds Tina's pipeline builds for rows of every dataset format
of lightning_tina's registry. Runs in parity/.venv-tina.

For each registry name, Tina's own `tina/post_train_hf/grpo.py` `main()` runs on Tina's own recipe for that dataset
(`recipes/DeepSeek-R1-Distill-Qwen-1.5B/grpo/train_model_<name>.yaml`), with four things replaced: `load_dataset`
returns the hand-written rows of tests/fixtures/datasets (no network), the tokenizer is the harness tokenizer
(built here, see `build_tokenizer`), the model loader returns nothing, and `GRPOTrainer` only records the
tokenizer and the dataset it is handed, then stops the script. So the column handling, system prompt choice,
conversation building (`make_conv_for_grpo` / `_l1`), pad token and chat template are Tina's code. The prompt ids are
then made the way TRL 0.15.2's `_prepare_inputs` makes them: `maybe_apply_chat_template(row, tokenizer)["prompt"]`,
tokenized with `add_special_tokens=False` (before its left cut at max_prompt_length, reported separately). What
vLLM 0.7 got is recorded too: the same text tokenized with special tokens (a second BOS).

Two names need a nudge, both reported: `l1_exact`/`l1_max` are commented out in Tina's dataset map (grpo.py stops
with a KeyError), so the harness adds the entries the comments name (DeepScaleR); `2thought` as published drops its
`messages` column before renaming it (a ValueError), so the harness lets that one `remove_columns` call through
unchanged. Output: WORK/prompts_tina.json.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIALS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<|fim_pad|>"]
FORMATS = {  # registry name -> fixture file (tests/fixtures/datasets), one per dataset format
    "still": "still.jsonl",
    "deepscaler": "deepscaler.jsonl",
    "2thought": "2thought.jsonl",
    "open_rs1": "open_s1.jsonl",
    "open_rs2": "open_rs.jsonl",
    "open_rs3": "open_rs.jsonl",
    "limr": "limr.jsonl",
    "open_r1": "open_r1.jsonl",
    "thoughts": "thoughts.jsonl",
    "l1_exact": "deepscaler.jsonl",
    "l1_max": "deepscaler.jsonl",
}
L1_HUB_ID = "agentica-org/DeepScaleR-Preview-Dataset"  # what Tina's commented-out map entries name


def build_tokenizer(tiny_dir: Path, out: Path):
    """A Qwen-style byte-level BPE (data/tiny's) with DeepSeek-R1-Distill's special tokens and its BOS rule: the
    BOS is added when encoding with special tokens (DeepSeek's tokenizer has add_bos_token). Saved as a plain
    tokenizer.json + config, readable by transformers 4.49 and 5.x alike."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(str(out))
    return fast


class _Stop(Exception):
    pass


def tina_rows(
    tina_dir: Path, fixtures: Path, name: str, tokenizer_dir: Path, tmp: Path
) -> tuple[list, object, str]:
    """Run Tina's grpo.py main() on its recipe for `name`; return (the dataset rows it hands the trainer, the
    tokenizer it configured, a note on any nudge)."""
    import datasets
    import tina.post_train_hf.grpo as tina_grpo
    import transformers

    rows = [json.loads(line) for line in (fixtures / FORMATS[name]).read_text().splitlines() if line.strip()]
    note = ""
    captured: dict = {}

    class RecordingTrainer:
        def __init__(self, *, processing_class, train_dataset, **kwargs):
            captured["tokenizer"], captured["dataset"] = processing_class, train_dataset
            raise _Stop

    patches = {
        "load_dataset": lambda *a, **k: datasets.Dataset.from_list(rows),
        "GRPOTrainer": RecordingTrainer,
    }
    saved = {k: getattr(tina_grpo, k) for k in patches}
    tok_loader = transformers.AutoTokenizer.from_pretrained
    model_loader = transformers.AutoModelForCausalLM.from_pretrained
    remove_columns = datasets.Dataset.remove_columns
    map_added = False
    if name not in tina_grpo.RL_POST_TRAIN_CONFIG_MAP and name.startswith("l1_"):
        tina_grpo.RL_POST_TRAIN_CONFIG_MAP[name] = L1_HUB_ID
        map_added = True
        note = (
            "Tina's map has this entry commented out (KeyError as published): added as its comment names it"
        )
    if name == "2thought":

        def keep_messages(self, column_names, *a, **k):
            if column_names == "messages":
                return self
            return remove_columns(self, column_names, *a, **k)

        datasets.Dataset.remove_columns = keep_messages
        note = "as published grpo.py drops `messages` before renaming it (ValueError): that drop is skipped"
    recipe = tina_dir / "recipes" / "DeepSeek-R1-Distill-Qwen-1.5B" / "grpo" / f"train_model_{name}.yaml"
    argv = sys.argv
    try:
        for k, v in patches.items():
            setattr(tina_grpo, k, v)
        transformers.AutoTokenizer.from_pretrained = staticmethod(
            lambda *a, **k: transformers.PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
        )
        tina_grpo.AutoTokenizer = transformers.AutoTokenizer
        tina_grpo.AutoModelForCausalLM = types.SimpleNamespace(from_pretrained=lambda *a, **k: None)
        tina_grpo.get_peft_model = lambda model, config: model
        os.environ["CKPT_DIR"] = str(tmp)
        sys.argv = [
            "grpo.py",
            "--config",
            str(recipe),
            "--report_to",
            "none",
            "--output_dir",
            str(tmp / "out"),
        ]
        try:
            tina_grpo.main()
        except _Stop:
            pass
    finally:
        sys.argv = argv
        for k, v in saved.items():
            setattr(tina_grpo, k, v)
        transformers.AutoTokenizer.from_pretrained = tok_loader
        transformers.AutoModelForCausalLM.from_pretrained = model_loader
        datasets.Dataset.remove_columns = remove_columns
        if map_added:
            del tina_grpo.RL_POST_TRAIN_CONFIG_MAP[name]
    if "dataset" not in captured:
        raise RuntimeError(f"{name}: Tina's grpo.py did not reach GRPOTrainer")
    return list(captured["dataset"]), captured["tokenizer"], note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tina-dir", required=True, type=Path, help="a checkout of shangshang-wang/Tina")
    ap.add_argument("--model", required=True, type=Path, help="data/tiny (its byte-level BPE is reused)")
    ap.add_argument("--fixtures", required=True, type=Path, help="tests/fixtures/datasets")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--max-prompt-length", type=int, default=512)
    args = ap.parse_args()
    sys.path.insert(0, str(args.tina_dir.resolve()))
    if importlib.util.find_spec("wandb") is None:  # imported by Tina's callbacks (unused here), not installed
        stub = types.ModuleType("wandb")
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = stub
    from trl.data_utils import maybe_apply_chat_template

    args.work.mkdir(parents=True, exist_ok=True)
    tok_dir = args.work / "tokenizer"
    build_tokenizer(args.model, tok_dir)
    out = {}
    for name in FORMATS:
        rows, tokenizer, note = tina_rows(args.tina_dir, args.fixtures, name, tok_dir, args.work / "tina_tmp")
        items = []
        for row in rows:
            text = maybe_apply_chat_template(row, tokenizer)["prompt"]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            items.append(
                {
                    "ids": ids,
                    "cut": len(ids) > args.max_prompt_length,  # TRL would keep the last max_prompt_length ids
                    "vllm_ids": tokenizer(text)[
                        "input_ids"
                    ],  # vLLM 0.7 tokenized the text with special tokens
                    "solution": row.get("solution"),
                    "target_length": row.get("target_length"),
                }
            )
        out[name] = {"rows": items, "note": note, "pad_token": tokenizer.pad_token}
        print(f"tina {name}: {len(items)} rows{' (' + note + ')' if note else ''}")
    (args.work / "prompts_tina.json").write_text(json.dumps(out, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
