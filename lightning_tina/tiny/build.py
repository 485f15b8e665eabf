"""Build the shipped mini-Tina base model: tokenizer, SFT from scratch, held-out pass@k.

Run ``python -m lightning_tina.tiny.build --out data/tiny --seed 0``. On one CPU thread it trains a small Qwen2 on
(prompt, reference completion) pairs of :mod:`lightning_tina.tiny.task` whose steps are deliberately wrong with
probability ``--error-rate``, so the model makes stochastic step errors that GRPO can learn to suppress.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from lightning_tina.tiny.task import heldout_rows, reference_completion, train_rows

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE, BOXED = "<think>", "</think>", "\\boxed{"
ROLES = ("system", "user", "assistant")  # one token each: they are in every prompt
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``."""


@dataclass
class BuildConfig:
    """Everything that determines the shipped model (the defaults are what made ``data/tiny``)."""

    seed: int = 0
    """Seeds the problem stream, the injected errors, the initialisation and the evaluation samples."""
    error_rate: float = 0.45
    """Probability that a step of an SFT trace is wrong (off by 1-2), making the base deliberately imperfect."""
    clean_fraction: float = 0.6
    """Share of the first SFT steps trained on error-free traces (learning the arithmetic) before errors start."""
    steps: int = 1500
    """Optimizer steps of SFT."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 3
    """Decoder layers."""
    head_dim: int = 32
    """Attention head size (vLLM's CPU attention supports 32 and 64)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 384
    """MLP width."""
    max_position_embeddings: int = 256
    """Longest prompt + completion the model is meant for."""
    eval_problems: int = 256
    """Held-out problems for pass@k."""
    eval_samples: int = 8
    """Samples per held-out problem (n of pass@k)."""

    def __post_init__(self) -> None:
        for name in ("error_rate", "clean_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"BuildConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("steps", "batch_size", "eval_problems", "eval_samples", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"BuildConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"BuildConfig.warmup must be in [0, steps={self.steps}), got {self.warmup}")


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2/Qwen's byte-to-unicode map), in byte order."""
    kept = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), 256),
    ]
    shifted = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(shifted)) for b in range(256)]


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level tokenizer without merges (one token per byte), plus ChatML, think, boxed and role tokens.

    It is a ``Qwen2Tokenizer`` (a ``tokenizers``-backed fast tokenizer) because transformers 5 reloads any
    ``model_type: qwen2`` folder through that class; building it the same way makes save and reload identical.
    Every digit is its own token. ``<think>``, ``</think>``, ``\\boxed{`` and the role names are non-special added
    tokens (whole words, to keep sequences short) so they survive ``decode(..., skip_special_tokens=True)``.
    """
    vocab = {t: i for i, t in enumerate([PAD, IM_START, IM_END, *_byte_alphabet()])}
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,  # every byte is in the vocabulary
        bos_token=None,
        padding_side="left",  # generation pads prompts on the left
        model_max_length=256,
    )
    tok.add_tokens([AddedToken(IM_START, special=True, normalized=False)], special_tokens=True)
    words = (THINK_OPEN, THINK_CLOSE, BOXED) + ROLES
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in words])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(cfg: BuildConfig, tok: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 sized by ``cfg`` (tied embeddings, float32)."""
    if cfg.hidden_size % cfg.head_dim:
        raise ValueError(f"hidden_size {cfg.hidden_size} must be a multiple of head_dim {cfg.head_dim}")
    heads = cfg.hidden_size // cfg.head_dim
    if heads % cfg.num_kv_heads:
        raise ValueError(f"num_kv_heads {cfg.num_kv_heads} must divide the {heads} attention heads")
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rope_theta=10000.0,
        dtype="float32",
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def prompt_text(tok: PreTrainedTokenizerBase, problem: str) -> str:
    """The rendered chat prompt of a problem (user turn only, generation prompt appended)."""
    return tok.apply_chat_template(
        [{"role": "user", "content": problem}], add_generation_prompt=True, tokenize=False
    )


def sft_batch(
    tok: PreTrainedTokenizerBase, rows: list[dict[str, str]], rng: random.Random, error_rate: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)`` with labels only on completion tokens and EOS."""
    seqs: list[list[int]] = []
    labels: list[list[int]] = []
    for row in rows:
        prompt = tok.encode(prompt_text(tok, row["problem"]), add_special_tokens=False)
        completion = tok.encode(reference_completion(row, rng, error_rate), add_special_tokens=False)
        completion.append(tok.eos_token_id)
        seqs.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)  # [B, T]
    for i, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, : len(y)] = torch.tensor(y)
    return ids, mask, lab


def lr_at(step: int, cfg: BuildConfig) -> float:
    """Learning rate: ``lr * (step + 1) / warmup`` during warmup, then ``lr * (0.1 + 0.9 * (1 + cos(pi t)) / 2)``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerBase, cfg: BuildConfig) -> list[float]:
    """SFT with AdamW on the completion tokens; returns the loss every 100 steps."""
    rng = random.Random(cfg.seed + 1)  # the injected errors; the problem stream has its own seed
    stream = train_rows(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    clean_steps = round(cfg.clean_fraction * cfg.steps)
    model.train()
    losses: list[float] = []
    running = 0.0
    start = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        rows = [next(stream) for _ in range(cfg.batch_size)]
        if step == clean_steps:
            print(
                f"greedy held-out accuracy after clean SFT: {greedy_accuracy(model, tok, cfg.eval_problems):.4f}"
            )
            model.train()
        error_rate = 0.0 if step < clean_steps else cfg.error_rate
        ids, mask, lab = sft_batch(tok, rows, rng, error_rate)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % 100 == 0:
            losses.append(running / 100)
            print(
                f"step {step + 1:5d}  loss {running / 100:.4f}  {time.perf_counter() - start:6.1f}s",
                flush=True,
            )
            running = 0.0
    return losses


_BOXED_RE = re.compile(r"\\boxed\{(-?\d+)\}")


def boxed_int(completion: str) -> int | None:
    """The integer inside the last ``\\boxed{...}`` of a completion, or None."""
    found = _BOXED_RE.findall(completion)
    return int(found[-1]) if found else None


def well_formed(completion: str) -> bool:
    """Whether a completion closes its reasoning and then gives a boxed integer."""
    _, sep, tail = completion.partition(THINK_CLOSE)
    return bool(sep) and boxed_int(tail) is not None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct out of ``n`` samples: ``1 - C(n-c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _generate(
    model: Qwen2ForCausalLM, tok: PreTrainedTokenizerBase, prompts: list[str], **kwargs: object
) -> list[str]:
    """Completions of left-padded ``prompts`` (special tokens removed)."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc, max_new_tokens=96, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs
    )  # [len(prompts), P + C]
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def greedy_accuracy(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerBase, n_problems: int) -> float:
    """Share of the first ``n_problems`` held-out problems solved by greedy decoding (what the model *knows*)."""
    model.eval()
    rows = heldout_rows(n_problems)
    texts = _generate(model, tok, [prompt_text(tok, r["problem"]) for r in rows], do_sample=False)
    return sum(boxed_int(t) == int(r["answer"]) for t, r in zip(texts, rows, strict=True)) / n_problems


@torch.no_grad()
def evaluate(
    model: Qwen2ForCausalLM,
    tok: PreTrainedTokenizerBase,
    n_problems: int,
    n_samples: int,
    seed: int,
    chunk: int = 512,
) -> tuple[dict[str, float], list[str]]:
    """Held-out pass@1 (mean over samples), pass@n and format rate under the fixed evaluation protocol.

    Protocol: chat-template prompts, ``do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=96``,
    ``n_samples`` per problem; a sample is correct when the last boxed integer equals the answer. Returns the
    metrics and the sampled completions (problem-major).
    """
    model.eval()
    torch.manual_seed(seed)
    rows = heldout_rows(n_problems)
    prompts = [prompt_text(tok, r["problem"]) for r in rows for _ in range(n_samples)]
    texts: list[str] = []
    for i in range(0, len(prompts), chunk):
        texts += _generate(model, tok, prompts[i : i + chunk], do_sample=True, temperature=0.6, top_p=0.95)
    correct = [boxed_int(t) == int(rows[j // n_samples]["answer"]) for j, t in enumerate(texts)]
    counts = [sum(correct[p * n_samples : (p + 1) * n_samples]) for p in range(n_problems)]
    metrics = {
        "pass@1": sum(pass_at_k(n_samples, c, 1) for c in counts) / n_problems,
        f"pass@{n_samples}": sum(pass_at_k(n_samples, c, n_samples) for c in counts) / n_problems,
        "format": sum(well_formed(t) for t in texts) / len(texts),
        "greedy": greedy_accuracy(model, tok, n_problems),
    }
    return metrics, texts


def main(argv: list[str] | None = None) -> None:
    """CLI: build the tokenizer, train, evaluate and save everything into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (e.g. data/tiny)")
    defaults = BuildConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = BuildConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    model = build_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config {asdict(cfg)}\nparameters {n_params}", flush=True)
    start = time.perf_counter()
    losses = train(model, tok, cfg)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics, texts = evaluate(model, tok, cfg.eval_problems, cfg.eval_samples, cfg.seed)
    eval_s = time.perf_counter() - start
    print(f"example completion:\n{texts[0]}")
    print(
        f"train {train_s:.0f}s  eval {eval_s:.0f}s  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.update(
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    report = {"config": asdict(cfg), "parameters": n_params, "train_seconds": round(train_s, 1)}
    report |= {"eval_seconds": round(eval_s, 1), "heldout": metrics, "loss_every_100_steps": losses}
    (args.out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
