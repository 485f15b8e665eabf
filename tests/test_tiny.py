"""The mini-Tina task generator and the shipped tiny model in data/tiny."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest
import torch

from lightning_tina.tiny.build import boxed_int, pass_at_k, prompt_text, well_formed
from lightning_tina.tiny.task import (
    heldout_rows,
    is_heldout,
    make_row,
    parse_problem,
    reference_completion,
    render_problem,
    train_rows,
)

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
STEP = re.compile(r"(-?\d+)([-+*])(\d+)=(-?\d+)")


def _eval(left: int, op: str, right: int) -> int:
    return {"+": left + right, "-": left - right, "*": left * right}[op]


def test_rows_are_deterministic_per_seed() -> None:
    a = [make_row(random.Random(7)) for _ in range(3)]
    b = [make_row(random.Random(7)) for _ in range(3)]
    assert a == b
    assert list(itertools.islice(train_rows(3), 50)) == list(itertools.islice(train_rows(3), 50))
    assert list(itertools.islice(train_rows(3), 50)) != list(itertools.islice(train_rows(4), 50))
    assert heldout_rows(32, seed=5) == heldout_rows(32, seed=5)


def test_row_schema_and_gold_answer() -> None:
    rng = random.Random(0)
    for _ in range(500):
        row = make_row(rng)
        assert set(row) == {"problem", "solution", "answer"}
        assert row["solution"] == f"${row['answer']}$"
        start, steps = parse_problem(row["problem"])
        assert 3 <= len(steps) <= 4
        assert render_problem(start, steps) == row["problem"]
        value = start
        for step in steps:
            value = _eval(value, step.op, step.operand)
            assert 0 <= value <= 99
        assert str(value) == row["answer"]


def test_heldout_and_train_never_overlap() -> None:
    held = heldout_rows(256)
    problems = {r["problem"] for r in held}
    assert len(problems) == 256
    assert all(is_heldout(p) for p in problems)
    train = [r["problem"] for r in itertools.islice(train_rows(0), 5000)]
    assert not problems & set(train)
    assert not any(is_heldout(p) for p in train)
    # about 10% of freshly drawn problems are held out
    rng = random.Random(11)
    share = sum(is_heldout(make_row(rng)["problem"]) for _ in range(4000)) / 4000
    assert 0.07 < share < 0.13


def test_clean_reference_completion_is_correct() -> None:
    rng = random.Random(1)
    for row in itertools.islice(train_rows(1), 300):
        text = reference_completion(row, rng, error_rate=0.0)
        assert text.startswith("<think>\n") and "\n</think>\n" in text
        assert well_formed(text)
        assert boxed_int(text) == int(row["answer"])
        for left, op, right, result in STEP.findall(text):
            assert _eval(int(left), op, int(right)) == int(result)


def test_errors_are_consistent_and_wrong() -> None:
    rng = random.Random(2)
    wrong = 0
    for row in itertools.islice(train_rows(2), 300):
        text = reference_completion(row, rng, error_rate=1.0)
        steps = STEP.findall(text)
        start, _ = parse_problem(row["problem"])
        previous = start
        for left, op, right, result in steps:
            assert int(left) == previous  # each step continues from the (possibly wrong) result before it
            assert 1 <= abs(_eval(int(left), op, int(right)) - int(result)) <= 2
            previous = int(result)
        assert boxed_int(text) == previous
        wrong += boxed_int(text) != int(row["answer"])
    assert wrong > 200  # errors can cancel out, but rarely
    with pytest.raises(ValueError, match="error_rate"):
        reference_completion(make_row(rng), rng, error_rate=1.5)


def test_pass_at_k_estimator() -> None:
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - (6 * 5 * 4 * 3) / (8 * 7 * 6 * 5))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    if not (TINY / "tokenizer.json").exists():
        pytest.fail(
            f"{TINY} has no tokenizer; rebuild it with python -m lightning_tina.tiny.build --out data/tiny"
        )
    return AutoTokenizer.from_pretrained(TINY)


def test_shipped_tokenizer_round_trips_and_has_single_token_specials(tokenizer) -> None:
    row = heldout_rows(1)[0]
    prompt = prompt_text(tokenizer, row["problem"])
    assert prompt == f"<|im_start|>user\n{row['problem']}<|im_end|>\n<|im_start|>assistant\n"
    text = prompt + reference_completion(row, random.Random(0)) + tokenizer.eos_token
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    for token in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", tokenizer.pad_token):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for digit in "0123456789":
        assert len(tokenizer.encode(f"x{digit}{digit}", add_special_tokens=False)) == 3
    # the reasoning tags survive the decoding that rollouts use
    plain = tokenizer.decode(ids, skip_special_tokens=True)
    assert "<think>" in plain and "</think>" in plain
    assert "<|im_end|>" not in plain and "<|im_start|>" not in plain


def test_shipped_chat_template_accepts_a_system_prompt(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute (1+2)*3."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute (1+2)*3.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not no_prompt.endswith("assistant\n")


def test_shipped_model_loads_and_gives_logits(tokenizer) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(TINY).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 4_000_000
    prompts = [prompt_text(tokenizer, r["problem"]) for r in heldout_rows(3)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        logits = model(**enc).logits  # [3, T, V]
    assert logits.shape == (3, enc["input_ids"].shape[1], model.config.vocab_size)
    assert model.config.vocab_size >= len(tokenizer)
    assert torch.isfinite(logits).all()
    gen = GenerationConfig.from_pretrained(TINY)
    assert gen.eos_token_id == tokenizer.eos_token_id and gen.pad_token_id == tokenizer.pad_token_id


def test_shipped_model_solves_some_problems_greedily(tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY).eval()
    rows = heldout_rows(16)
    enc = tokenizer([prompt_text(tokenizer, r["problem"]) for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=96)  # [16, P + C]
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(well_formed(t) for t in texts), texts
    assert sum(boxed_int(t) == int(r["answer"]) for t, r in zip(texts, rows, strict=True)) >= 4, texts
