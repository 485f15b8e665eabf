"""Tina's system prompts and chat template, and prompt rendering (offline tokenizer, no Hub)."""

from __future__ import annotations

import hashlib

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_tina.prompts import (
    OPEN_R1_SYSTEM_PROMPT,
    OPEN_RS_SYSTEM_PROMPT,
    TINA_R1_CHAT_TEMPLATE,
    build_messages,
    render_prompt,
    resolve_chat_template,
    resolve_system_prompt,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


def tiny_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory, with DeepSeek-R1's BOS/EOS strings."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token="[UNK]")
    if chat_template is not None:
        out.chat_template = chat_template
    return out


# sha256 of the strings as Python evaluates Tina's tina/utils/prompt.py and chat_template.py (commit c6274cd),
# measured once with hashlib; they pin our copies byte for byte.
@pytest.mark.parametrize(
    ("text", "digest"),
    [
        (OPEN_R1_SYSTEM_PROMPT, "c07fb6f7bcc92beb77cd31f0db41d45909a97f37f755b191124288b6b8be14b7"),
        (OPEN_RS_SYSTEM_PROMPT, "1b15ad1031a46dcf9ad1dad87c1d70bc4851ea00efc988c44f40e29bb34630d8"),
        (TINA_R1_CHAT_TEMPLATE, "f7433633d77a4f705e0b2b8e37adc7c270240897a7d8be30c556ad6e1f387444"),
    ],
)
def test_strings_are_byte_identical_to_tina(text: str, digest: str) -> None:
    assert hashlib.sha256(text.encode()).hexdigest() == digest


def test_tina_quirks_are_kept() -> None:
    assert "\\boxed{{}} ." in OPEN_RS_SYSTEM_PROMPT  # doubled braces: Tina's string is not an f-string
    assert "respectively, \ni.e." in OPEN_RS_SYSTEM_PROMPT
    assert OPEN_R1_SYSTEM_PROMPT.startswith("\nYou are") and OPEN_R1_SYSTEM_PROMPT.endswith("</answer>\n")


def test_render_with_tina_template() -> None:
    tok = tiny_tokenizer()
    text = render_prompt(tok, "What is $1+1$?", OPEN_R1_SYSTEM_PROMPT, "tina_r1")
    assert text == BOS + OPEN_R1_SYSTEM_PROMPT + "<｜User｜>What is $1+1$?<｜Assistant｜>"
    assert render_prompt(tok, "Q", None, TINA_R1_CHAT_TEMPLATE) == BOS + "<｜User｜>Q<｜Assistant｜>"


def test_tina_template_renders_assistant_turns() -> None:
    tok = tiny_tokenizer(TINA_R1_CHAT_TEMPLATE)
    messages = [*build_messages("Q", "S"), {"role": "assistant", "content": "A"}]
    assert tok.apply_chat_template(messages, tokenize=False) == BOS + "S<｜User｜>Q<｜Assistant｜>A" + EOS


def test_render_uses_the_tokenizer_template_unless_one_is_given() -> None:
    own = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    tok = tiny_tokenizer(own)
    assert render_prompt(tok, "Q", "S") == "[system]S[user]Q>"
    assert render_prompt(tok, "Q", "S", "tokenizer") == "[system]S[user]Q>"
    assert render_prompt(tok, "Q", "S", "tina_r1") == BOS + "S<｜User｜>Q<｜Assistant｜>"


def test_render_without_any_template_names_the_fix() -> None:
    with pytest.raises(ValueError, match="has no chat template; set chat_template"):
        render_prompt(tiny_tokenizer(), "Q", None)


def test_resolve_names() -> None:
    assert resolve_system_prompt("open_rs") == OPEN_RS_SYSTEM_PROMPT
    assert resolve_system_prompt("none") is None
    assert resolve_system_prompt("Be brief.") == "Be brief."
    assert resolve_chat_template("tokenizer") is None
    with pytest.raises(ValueError, match="neither a known name"):
        resolve_chat_template("deepseek")
