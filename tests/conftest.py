"""Fixtures shared by the rollout-engine tests: a tiny Qwen2 model folder and prompts for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_DIR = Path(__file__).resolve().parents[1] / "data" / "tiny"


def _build_random_qwen2(out: Path) -> None:
    """A random Qwen2 (hidden 64, 2 layers, head_dim 32) with a small byte-level BPE tokenizer (288 tokens).

    EOS is made more likely (measured: 2.4% per token at T = 0.7, against 0.35% for a uniform pick) so that most
    64-token completions stop: embedding channel 0 is a constant 0.3 for every token, which after the final
    RMSNorm is a positive feature, and the EOS row of the output head reads it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lightning_tina.tiny.random_model import save_random_qwen2

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["What is 12 + 34? The answer is 46. Think step by step."] * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")

    def likely_eos(model: torch.nn.Module) -> None:
        model.model.embed_tokens.weight[:, 0] = 0.3  # [V] constant channel
        model.lm_head.weight[fast.eos_token_id, 0] = 0.7  # EOS logit about +3.3 on every position

    save_random_qwen2(
        out,
        fast,
        edit=likely_eos,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        vocab_size=len(fast),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped tiny model when data/tiny has one, else a random Qwen2 built in a temp folder."""
    if (TINY_DIR / "config.json").is_file() and (TINY_DIR / "tokenizer.json").is_file():
        return TINY_DIR
    out = tmp_path_factory.mktemp("tiny-qwen2")
    _build_random_qwen2(out)
    return out


@pytest.fixture(scope="module")
def tiny_prompts(tiny_model: Path) -> list[list[int]]:
    """Three arithmetic prompts as token ids, chat-formatted when the model has a chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["What is 12 + 34?", "What is 7 * 8?", "What is 90 - 45?"]
    if tok.chat_template:  # the shipped tiny model was trained on chat-formatted prompts
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
            )
            for t in texts
        ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
