"""Rollouts with Hugging Face `generate` on the live policy (no copy, so `sync` has nothing to do)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_tina.policy import is_sharded
from lightning_tina.population import activate, adapter_runs, routed
from lightning_tina.rollout.base import Adapters, RolloutEngine, SamplingConfig
from lightning_tina.types import Generation


class HFEngine(RolloutEngine):
    """Samples with `model.generate` from the model the trainer optimizes, in eval mode (no LoRA dropout).

    Prompts are left-padded into batches of at most `max_batch_prompts` prompts; each prompt is expanded to `n`
    sequences. The engine returns no log-probs: it samples from the very weights the trainer uses.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_prompts: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_prompts = max_batch_prompts

    def sync(self, policy: torch.nn.Module, version: int) -> None:
        self.model = policy  # generate() runs on the live weights

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        adapters: Adapters = None,
    ) -> list[Generation]:
        """With `adapters` (a population), each batch of prompts runs through one adapter when its prompts share
        one (the solo path, that adapter active), else through each row's own adapter (`population.routed`)."""
        sampling.check()
        _check_adapters(self.model, prompt_ids, adapters)
        out: list[Generation] = []
        for start in range(0, len(prompt_ids), self.max_batch_prompts):
            end = start + self.max_batch_prompts
            names = adapters[start:end] if adapters is not None else None
            out.extend(self._generate_routed(prompt_ids[start:end], n, sampling, names))
        return out

    def _generate_routed(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig, adapters: Adapters
    ) -> list[Generation]:
        if adapters is None:
            return self._generate_batch(prompts, n, sampling)
        runs = adapter_runs(adapters)
        previous = self.model.active_adapter
        try:
            if len(runs) == 1:
                activate(self.model, runs[0][0])
                return self._generate_batch(prompts, n, sampling)
            # generate expands prompt i to rows i*n .. i*n+n-1
            with routed(self.model, [(a, s * n, e * n) for a, s, e in runs]):
                return self._generate_batch(prompts, n, sampling)
        finally:
            activate(self.model, previous)

    def _generate_batch(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig
    ) -> list[Generation]:
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)  # [b, P]
        mask = torch.zeros_like(ids)  # [b, P]
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        greedy = sampling.temperature <= 0
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        # Only ever set to True: left unset, transformers decides (it detects DeepSpeed ZeRO-3 by itself).
        if needs_synced_gpus(self.model):
            kwargs["synced_gpus"] = True
        if sampling.min_new_tokens > 0:
            kwargs["min_new_tokens"] = sampling.min_new_tokens
        if not greedy:
            kwargs.update(
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k
            )  # 0 = off (None would mean 50)
            if sampling.min_p > 0:
                kwargs["min_p"] = sampling.min_p
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=tok)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            seqs = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
            )  # [b*n, P+c]
        finally:
            self.model.train(was_training)
        completions = seqs[:, width:].tolist()
        return [self._to_generation(c, sampling) for c in completions]

    def _to_generation(self, tokens: list[int], sampling: SamplingConfig) -> Generation:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if eos in tokens:
            return Generation(token_ids=tokens[: tokens.index(eos) + 1], logprobs=None, finish_reason="stop")
        if sampling.stop:  # a stop string ends a sequence early and generate pads the rest
            while tokens and tokens[-1] == pad:
                tokens = tokens[:-1]
        # without stop strings every token up to max_new_tokens was sampled, a sampled pad id included
        stopped = bool(sampling.stop) and len(tokens) < sampling.max_new_tokens
        return Generation(token_ids=tokens, logprobs=None, finish_reason="stop" if stopped else "length")


def _check_adapters(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], adapters: Adapters) -> None:
    if adapters is None:
        return
    if len(adapters) != len(prompt_ids):
        raise ValueError(f"generate: {len(adapters)} adapter names for {len(prompt_ids)} prompts")
    known = set(getattr(model, "peft_config", {}))
    unknown = sorted(set(adapters) - known)
    if unknown:
        raise ValueError(f"generate: adapters {unknown} are not in the policy (it has {sorted(known)})")


def needs_synced_gpus(model: torch.nn.Module) -> bool:
    """True when `generate` must keep every rank stepping until all ranks are done (`synced_gpus=True`).

    That is the case for a model sharded with FSDP2 (its parameters are DTensors, as under Lightning's
    ModelParallelStrategy) in a process group of more than one rank: each forward pass all-gathers the parameters
    with a collective, so a rank whose sequences stop early must keep running forward passes, or the other ranks
    wait for it forever. transformers does this by itself only for models it sharded itself.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size() > 1 and is_sharded(model)
