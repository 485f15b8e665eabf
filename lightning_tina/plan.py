"""Per-GPU memory plan of a recipe: does the trainer plus its colocated vLLM engine fit the card?

    python -m lightning_tina.plan --config configs/tina/open_rs3.yaml [--gpu-memory 48] [--before-fixes]

The recipe is parsed by the project's CLI parser (every `config:` include, link and default as `fit` sees them)
without instantiating anything: no model, tokenizer or hub access. The model's shape comes from its config.json when
`model.model` is a local folder, from the built-in table `KNOWN_SHAPES` for the hub ids Tina uses, or else from the
local Hugging Face cache.

A step has two phases that never overlap on one GPU, and each must fit the card:

- generation: the trainer's resident memory (base weights, adapter, gradients, optimizer state) + the engine's
  share `rollout.vllm.gpu_memory_utilization x card` (its weights, activations and KV cache) + the runtime;
- training: the resident memory + the activations of one micro-batch at the longest prompt + completion (with or
  without gradient checkpointing) + the log-prob chunk + what a sleeping engine keeps + the runtime.

With sleep mode off (`rollout.vllm.enable_sleep_mode: false`) the engine keeps its whole share during training.
The activation model counts the tensors a Qwen2/Llama decoder layer saves for backward under bf16 autocast with LoRA
on all seven projections (`activation_bytes_per_token`); it is an estimate, checked against measured peaks by
bench/gpu_check.sh (`plan_vs_measured`). Sizes are GB = 1e9 bytes; an L40S ("48 GB") reports 46,068 MiB = 48.3 GB.

A population (`model.population`, K adapters on one base; docs/population.md) samples every adapter's completions in
one engine call, so generation holds K x prompts x G sequences (K times the KV-cache tokens, and vLLM's max_num_seqs
defaults to that many, capped at 256); the engine keeps one LoRA slot per adapter at the largest member's rank
(inside its share, taken from the KV cache); the trainer holds K adapters with their gradients and AdamW states,
each sized by its own rank and targets. Training runs one adapter's rows at a time, so the activations and the
log-prob chunk are those of a solo run. A solo recipe's numbers do not change.

`check_plan` is what `fit` runs on CUDA before training (TinaCLI.before_fit): it refuses a plan that cannot fit and
names the setting to change.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1e9

RUNTIME_GB = 1.0
"""CUDA context, cuBLAS workspaces and NCCL buffers of one training process (assumed; measured by gpu_check.sh)."""
ASLEEP_ENGINE_GB = 0.5
"""What a sleeping vLLM engine keeps on the GPU (CUDA-graph pool, sampler and LoRA buffers; assumed)."""
ENGINE_OVERHEAD_GB = 1.5
"""Non-KV memory inside the engine's share besides its weights: the profiled forward activations and CUDA graphs
(assumed for a 1.5B model; vLLM measures it at start)."""


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only transformer (Hugging Face config names in the comments)."""

    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    intermediate: int  # intermediate_size
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings
    qkv_bias: bool = True  # Qwen2 has biases on q/k/v
    max_positions: int = 131072  # max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one decoder layer, by its module name."""
        h, i, q, kv = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def parameters(self) -> int:
        """All parameters (embedding, layers, final norm, untied head)."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden  # + two RMSNorms
        if self.qkv_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.head_dim
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + head

    def lora_parameters(self, r: int, targets: list[str]) -> int:
        shapes = self.linear_shapes()
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


KNOWN_SHAPES: dict[str, ModelShape] = {
    # config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (Qwen2ForCausalLM): hidden_size 1536,
    # num_hidden_layers 28, num_attention_heads 12, num_key_value_heads 2, intermediate_size 8960,
    # vocab_size 151936, tie_word_embeddings false, max_position_embeddings 131072. 1.777B parameters.
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": ModelShape(
        1536, 28, 12, 2, 8960, 151936, False, True, 131072
    ),
}


def model_shape(name_or_path: str) -> ModelShape:
    """The model's shape, offline: a local folder's config.json, the built-in table, or the local HF cache."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()))
    if name_or_path in KNOWN_SHAPES:
        return KNOWN_SHAPES[name_or_path]
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name_or_path, local_files_only=True).get_text_config()
    except Exception as err:  # not cached here
        raise ValueError(
            f"model.model={name_or_path!r}: no config.json in a local folder, not among the built-in shapes "
            f"({', '.join(KNOWN_SHAPES)}) and not in the local Hugging Face cache ({type(err).__name__}); give a "
            "local folder or download the model's config once."
        ) from err
    return shape_from_config(cfg.to_dict())


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    cfg = cfg.get("text_config", cfg)
    heads = int(cfg["num_attention_heads"])
    return ModelShape(
        hidden=int(cfg["hidden_size"]),
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        intermediate=int(cfg["intermediate_size"]),
        vocab=int(cfg["vocab_size"]),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        max_positions=int(cfg.get("max_position_embeddings") or 131072),
    )


def activation_bytes_per_token(shape: ModelShape, lora: bool = True) -> int:
    """Bytes one decoder layer saves for backward per token under bf16 autocast (bf16 hidden states).

    Counted tensors (H hidden, I intermediate, kv = K/V width): two RMSNorms with their float32 intermediates
    (10H each); the q/k/v input (2H), q, k, v before and after rotary and K/V expanded for the attention kernel
    with its output (about 12H); the o_proj input (2H); the MLP's input (2H), gate and up outputs, SiLU output and
    product (8I); and per LoRA projection its dropout mask (1 byte) and dropped input (2 bytes) per input feature.
    """
    h, i = shape.hidden, shape.intermediate
    saved = 10 * h + 2 * h + 12 * h + 2 * h + 10 * h + 2 * h + 8 * i
    if lora:
        saved += 3 * (3 * h + h + 2 * h + i)  # q, k, v, o, gate, up take H features, down takes I
    return saved


@dataclass
class Plan:
    """One GPU's memory plan of a recipe (GB); `lines()` prints it."""

    recipe: str
    card_gb: float
    settings: dict[str, Any]
    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    @property
    def generation_gb(self) -> float:
        return self.parts["generation phase"]

    @property
    def training_gb(self) -> float:
        return self.parts["training phase"]

    @property
    def peak_gb(self) -> float:
        return max(self.generation_gb, self.training_gb)

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.card_gb and not self.advice

    def lines(self) -> list[str]:
        s = self.settings
        population = (
            f"population of {len(s['adapters'])}: {', '.join(s['adapters'])}; each adapter gets "
            if "adapters" in s
            else ""
        )
        out = [
            f"{self.recipe}: per GPU, card {self.card_gb:.1f} GB ({s['devices']} GPU(s), {s['model']})",
            f"  micro-batch {s['micro_batch_size']} x ({s['max_prompt_length']} + {s['max_new_tokens']}) tokens, "
            f"{population}{s['completions']} completions per rank per step"
            + ("" if population else f", LoRA r={s['lora_r']}")
            + ", "
            f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
            f"vLLM utilization {s['gpu_memory_utilization']}, sleep mode {'on' if s['sleep_mode'] else 'off'}",
        ]
        width = max(len(k) for k in self.parts)
        for k, v in self.parts.items():
            out.append(f"  {k:<{width}}  {v:7.2f} GB")
        out.extend(f"  note: {n}" for n in self.notes)
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        out.append(
            f"  => {verdict}: peak {self.peak_gb:.2f} of {self.card_gb:.1f} GB "
            f"(generation {self.generation_gb:.2f}, training {self.training_gb:.2f})"
        )
        out.extend(f"  change: {a}" for a in self.advice)
        return out


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _devices(trainer: dict[str, Any]) -> int:
    d = trainer.get("devices", 1)
    if isinstance(d, list):
        return len(d)
    try:
        return max(1, int(d))
    except (TypeError, ValueError):  # "auto"
        return 1


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def plan_for(
    cfg: dict[str, Any],
    card_gb: float,
    recipe: str = "recipe",
    shape: ModelShape | None = None,
    before_fixes: bool = False,
    engines_on_gpu0: bool | None = None,
) -> Plan:
    """The plan of a parsed `fit` config (a dict as the CLI parser gives it) on a card of `card_gb` GB.

    `before_fixes` models the code before issue 17: the trainer's cached peak stays reserved while the engine
    wakes (no empty_cache), and with 2+ devices every rank's engine sits on GPU 0 (`engines_on_gpu0`, which
    defaults to `before_fixes`).
    """
    if engines_on_gpu0 is None:
        engines_on_gpu0 = before_fixes
    model = _get(cfg, "model.model")
    shape = shape or model_shape(model)
    s = _Settings.read(cfg, model, shape)
    plan = Plan(recipe, card_gb, s.summary())
    trainer = _trainer_memory(plan.parts, shape, s)
    engines_here = s.devices if (engines_on_gpu0 and s.devices > 1 and s.uses_vllm) else 1
    if s.uses_vllm:
        generation, training = _vllm_phases(plan, shape, s, trainer, engines_here, before_fixes)
    else:  # HF generate: the KV cache of every completion of the step (every adapter's) at once
        kv_all = (
            s.k * s.batch * (s.prompt_tokens + s.new_tokens) * shape.kv_bytes_per_token(s.dtype_bytes) / GB
        )
        plan.parts["HF generate KV cache" + (f" ({s.k} adapters)" if s.members else "")] = kv_all
        generation = trainer.resident + RUNTIME_GB + kv_all
        training = trainer.peak + RUNTIME_GB
    plan.parts["generation phase"] = generation
    plan.parts["training phase"] = training
    _advise(plan, s, trainer, generation, training, engines_here, before_fixes)
    return plan


@dataclass(frozen=True)
class _Settings:
    """What the plan reads of a parsed config, with the defaults the trainer and the engine use."""

    model: Any
    dtype_bytes: int
    lora_on: bool
    lora_r: int
    targets: list[str]
    micro_batch: int
    batch: int
    checkpointing: bool
    chunk: int
    num_generations: Any  # read (as an int) only when the engine is vLLM
    prompt_tokens: int
    new_tokens: int
    uses_vllm: bool
    util: float
    sleep: bool
    max_len: int
    devices: int
    members: tuple[tuple[str, int, tuple[str, ...]], ...] = ()
    """A population's adapters: (name, LoRA rank, target modules) each; () for a solo run."""
    weight_sync: str = "auto"
    max_num_seqs: int | None = None

    @property
    def k(self) -> int:
        """Adapters sampled and trained per step (1 for a solo run)."""
        return max(1, len(self.members))

    @property
    def max_rank(self) -> int:
        """The largest adapter rank (what vLLM's max_lora_rank must hold)."""
        return max((r for _, r, _ in self.members), default=self.lora_r)

    @classmethod
    def read(cls, cfg: dict[str, Any], model: Any, shape: ModelShape) -> _Settings:
        """The settings of `cfg`; `shape` caps rollout.vllm.max_model_len at the model's positions."""
        g = _get(cfg, "model.grpo", {}) or {}
        vllm = _get(cfg, "rollout.vllm", {}) or {}
        return cls(  # read in this order, so that the first bad value raises
            model=model,
            dtype_bytes=_DTYPE_BYTES.get(_get(cfg, "model.dtype", "float32"), 4),
            lora_on=bool(_get(cfg, "model.lora.enabled", True)),
            lora_r=int(_get(cfg, "model.lora.r", 32)),
            targets=list(_get(cfg, "model.lora.target_modules", []) or []),
            micro_batch=int(g.get("micro_batch_size", 16)),
            batch=int(g.get("batch_size", 64)),
            checkpointing=bool(g.get("gradient_checkpointing", False)),
            chunk=int(g.get("logprob_chunk_tokens", 1024)),
            num_generations=g.get("num_generations", 1),
            prompt_tokens=int(_get(cfg, "data.max_prompt_length", 512)),
            new_tokens=int(_get(cfg, "rollout.sampling.max_new_tokens", 256)),
            uses_vllm=_get(cfg, "rollout.engine", "auto") in ("vllm", "auto"),
            util=float(vllm.get("gpu_memory_utilization", 0.4)),
            # enable_sleep_mode None (the default): on with a GPU
            sleep=vllm.get("enable_sleep_mode") is None or bool(vllm["enable_sleep_mode"]),
            max_len=min(int(vllm.get("max_model_len") or shape.max_positions), shape.max_positions),
            devices=_devices(_get(cfg, "trainer", {}) or {}),
            members=_members(_get(cfg, "model.population"), _get(cfg, "model.lora", {}) or {}),
            weight_sync=str(vllm.get("weight_sync") or "auto"),
            max_num_seqs=vllm.get("max_num_seqs"),
        )

    def summary(self) -> dict[str, Any]:
        """The settings that `Plan.lines` prints (`adapters` only for a population)."""
        extra = {"adapters": [f"{n} (r={r})" for n, r, _ in self.members]} if self.members else {}
        return dict(
            **extra,
            model=self.model,
            devices=self.devices,
            micro_batch_size=self.micro_batch,
            max_prompt_length=self.prompt_tokens,
            max_new_tokens=self.new_tokens,
            completions=self.batch,
            lora_r=self.lora_r,
            gradient_checkpointing=self.checkpointing,
            gpu_memory_utilization=self.util if self.uses_vllm else "-",
            sleep_mode=self.sleep and self.uses_vllm,
        )


def _members(population: Any, lora: dict[str, Any]) -> tuple[tuple[str, int, tuple[str, ...]], ...]:
    """(name, rank, targets) of each `model.population` entry, its `lora` overrides applied to `model.lora`."""
    if not population:
        return ()
    out = []
    for i, member in enumerate(population):
        if not isinstance(member, dict):  # an AdapterSettings rather than parsed YAML
            member = vars(member)
        over = member.get("lora") or {}
        out.append(
            (
                str(member.get("name", f"adapter_{i}")),
                int(over.get("r", lora.get("r", 32))),
                tuple(over.get("target_modules", lora.get("target_modules")) or ()),
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class _TrainerMemory:
    """The trainer's memory (GB), which both phases add to."""

    resident: float
    """Weights, adapter, gradients and optimizer state: there through the whole step."""
    peak: float
    """Resident + one micro-batch's activations + the log-prob chunk (without the runtime)."""
    act_gc: float  # one micro-batch's activations with gradient checkpointing
    act_full: float  # and without
    activations: float
    """The activations of the configured checkpointing (act_gc or act_full)."""


def _trainer_memory(p: dict[str, float], shape: ModelShape, s: _Settings) -> _TrainerMemory:
    """Add the trainer's parts to the plan's `p`: resident memory, the runtime, one micro-batch's activations."""
    p["base weights"] = shape.parameters() * s.dtype_bytes / GB
    # float32 weight + gradient + AdamW's two moments, and DDP's gradient bucket (a float32 copy)
    per_param = 4 + 4 + 8 + (4 if s.devices > 1 else 0)
    if s.lora_on and s.members:
        # every adapter keeps its weights, AdamW state and (zeroed only at its own next step) its gradients; DDP's
        # buckets cover every trainable weight, i.e. all adapters
        each = {
            f"  adapter {name} (r={r})": shape.lora_parameters(r, list(targets)) * per_param / GB
            for name, r, targets in s.members
        }
        p[f"adapters + grads + AdamW ({s.k} adapters)"] = sum(each.values())
        resident = sum(p.values())
        p.update(each)  # the detail lines, not summed again
    elif s.lora_on:
        n = shape.lora_parameters(s.lora_r, s.targets)
        p["adapter + grads + AdamW"] = n * per_param / GB
    else:
        p["full weights' grads + AdamW"] = shape.parameters() * (s.dtype_bytes + 8 + 4) / GB
    if not (s.lora_on and s.members):
        resident = sum(p.values())
    p["runtime (CUDA context, NCCL)"] = RUNTIME_GB

    # training: one micro-batch at the longest prompt + completion
    tokens = s.micro_batch * (s.prompt_tokens + s.new_tokens)
    per_layer = activation_bytes_per_token(shape, s.lora_on)
    hidden_state = 2 * shape.hidden  # bf16 residual stream
    grad_work = 4 * shape.intermediate  # a layer's backward temporaries (MLP-sized gradients)
    act_gc = tokens * (shape.layers * hidden_state + per_layer + grad_work) / GB
    act_full = tokens * (shape.layers * per_layer + grad_work) / GB
    p["activations, checkpointing on"] = act_gc
    p["activations, checkpointing off"] = act_full
    p["log-prob chunk"] = (
        2.5 * 4 * shape.vocab * min(s.chunk, tokens) / GB
    )  # 2 float32 [chunk, V] + the bf16 matmul
    activations = act_gc if s.checkpointing else act_full
    peak = resident + activations + p["log-prob chunk"]
    return _TrainerMemory(resident, peak, act_gc, act_full, activations)


def _vllm_phases(
    plan: Plan,
    shape: ModelShape,
    s: _Settings,
    trainer: _TrainerMemory,
    engines_here: int,
    before_fixes: bool,
) -> tuple[float, float]:
    """(generation, training) GB with colocated vLLM engines; adds the engine's parts, its KV-cache note and the
    advice when the KV cache cannot hold one max_model_len sequence."""
    p, card_gb = plan.parts, plan.card_gb
    share = s.util * card_gb
    engine_weights = shape.parameters() * 2 / GB  # bf16 on GPU
    kv = share - engine_weights - ENGINE_OVERHEAD_GB
    p["vLLM share (utilization x card)"] = share
    p["  of which weights"] = engine_weights
    if s.members:
        # one LoRA slot per adapter at max_lora_rank (the largest member's), A and B of every targeted projection
        # in the engine's bf16, allocated at start inside the share; a solo engine's one slot is in the overhead
        targets = sorted({t for _, _, ts in s.members for t in ts})
        slots = s.k * shape.lora_parameters(_vllm_lora_rank(s.max_rank), targets) * 2 / GB
        p[f"  of which LoRA slots ({s.k} x r={_vllm_lora_rank(s.max_rank)})"] = slots
        kv -= slots
    p["  of which KV cache"] = max(kv, 0.0)
    kv_token = shape.kv_bytes_per_token()
    capacity = max(kv, 0.0) * GB / kv_token
    plan.notes.append(
        f"the KV cache holds {capacity / 1000:.0f}k tokens ({kv_token / 1000:.1f} kB per token)"
    )
    # a population samples K x prompts x G in one call; prefixes are cached per adapter, so prompts count K times
    per_rank_tokens = s.k * (
        s.batch * s.new_tokens + (s.batch / max(1, int(s.num_generations))) * s.prompt_tokens
    )
    if s.members:
        from lightning_tina.rollout.vllm import default_max_num_seqs

        seqs, max_seqs = s.k * s.batch, s.max_num_seqs or default_max_num_seqs(s.k * s.batch)
        plan.notes.append(
            f"one engine call samples {s.k} adapters x {s.batch} = {seqs} completions per rank, "
            f"{per_rank_tokens / 1000:.0f}k KV-cache tokens at full length ({s.k} x a solo step's), "
            f"max_num_seqs {max_seqs}"
            + (f" (vLLM decodes them in waves of {max_seqs})" if seqs > max_seqs else "")
        )
        if s.weight_sync == "merged":
            plan.advice.append(
                "set rollout.vllm.weight_sync: lora (merged weights hold one adapter; a population needs one "
                "LoRA slot per adapter)"
            )
    if capacity < s.max_len:
        plan.advice.append(
            f"the KV cache holds {capacity:.0f} tokens, less than one rollout.vllm.max_model_len={s.max_len} "
            f"sequence (vLLM refuses to start): raise rollout.vllm.gpu_memory_utilization to at least "
            f"{math.ceil(100 * (engine_weights + ENGINE_OVERHEAD_GB + s.max_len * kv_token / GB) / card_gb) / 100}"
            " or lower max_model_len"
        )
    elif capacity < per_rank_tokens:
        plan.notes.append(
            f"the KV cache holds {capacity:.0f} of the {per_rank_tokens:.0f} tokens of a rank's step at full "
            "length: vLLM runs them in waves (slower, not an error)"
        )
    asleep = ASLEEP_ENGINE_GB if s.sleep else share
    generation = trainer.resident + RUNTIME_GB + engines_here * share
    if before_fixes:
        generation += trainer.peak - trainer.resident  # the cached peak was not returned before the wake-up
        if engines_here > 1:
            plan.notes.append(
                f"before the fix every rank's engine started on GPU 0: {engines_here} engines here"
            )
    training = trainer.peak + RUNTIME_GB + engines_here * asleep
    return generation, training


def _vllm_lora_rank(r: int) -> int:
    """The engine's max_lora_rank for a largest adapter rank `r`: rounded up to a rank vLLM accepts."""
    from lightning_tina.rollout.vllm import _LORA_RANKS

    return next((v for v in _LORA_RANKS if v >= r), r)


def _advise(
    plan: Plan,
    s: _Settings,
    trainer: _TrainerMemory,
    generation: float,
    training: float,
    engines_here: int,
    before_fixes: bool,
) -> None:
    """Add to the plan's advice the setting to change for each phase that does not fit the card."""
    card_gb = plan.card_gb
    if training > card_gb:
        if not s.checkpointing and training - trainer.act_full + trainer.act_gc <= card_gb:
            plan.advice.append("set model.grpo.gradient_checkpointing: true")
        else:
            fixed = training - trainer.activations
            per_seq = trainer.activations / s.micro_batch
            fit_mb = int((card_gb - fixed) // per_seq) if per_seq > 0 else s.micro_batch
            plan.advice.append(
                f"lower model.grpo.micro_batch_size (now {s.micro_batch}; at most {max(fit_mb, 0)} fits)"
                + ("" if s.checkpointing else " or set model.grpo.gradient_checkpointing: true")
                + ("" if s.sleep or not s.uses_vllm else ", or turn rollout.vllm.enable_sleep_mode on")
            )
    if s.uses_vllm and generation > card_gb:
        room = card_gb - (generation - engines_here * s.util * card_gb)
        best = math.floor(100 * room / (engines_here * card_gb)) / 100
        plan.advice.append(
            f"lower rollout.vllm.gpu_memory_utilization (now {s.util}; at most {best:.2f} fits)"
            + (" and return the trainer's cache before waking the engine (issue 17)" if before_fixes else "")
        )


def parse_recipe(path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The recipe as `fit` would see it (includes, links, defaults), parsed without instantiating anything."""
    from lightning_tina.__main__ import TinaCLI
    from lightning_tina.datamodule import ReasoningDataModule
    from lightning_tina.module import GRPOModule

    class _ParseOnly(TinaCLI):
        def _set_seed(self) -> None:
            pass

        def _parse_ckpt_path(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*args parameter is intended.*"
        )  # our own argv is parsed here
        cli = _ParseOnly(
            GRPOModule,
            ReasoningDataModule,
            args=["--config", str(path), *(overrides or [])],
            run=False,
            auto_configure_optimizers=False,
        )
    return cli.config.as_dict()


def check_plan(cfg: dict[str, Any], card_gb: float, recipe: str = "this run") -> Plan | None:
    """Refuse (ValueError naming the setting) a plan that cannot fit `card_gb`; None when the model's shape is
    unknown offline and cannot be planned."""
    try:
        shape = model_shape(str(_get(cfg, "model.model")))
    except ValueError:
        return None
    plan = plan_for(cfg, card_gb, recipe, shape=shape)
    if not plan.fits:
        raise ValueError(
            "this run does not fit the GPU (python -m lightning_tina.plan --config <recipe> prints the plan; "
            "TINA_SKIP_MEMORY_PLAN=1 starts anyway):\n" + "\n".join(plan.lines())
        )
    return plan


def check_plan_on_device(config: Any, trainer: Any) -> Plan | None:
    """What `fit` runs first (TinaCLI.before_fit): on a CUDA device, `check_plan` against that card's memory.

    `config` is the CLI's parsed config (with or without the `fit` level). Nothing on CPU; set
    TINA_SKIP_MEMORY_PLAN=1 to start anyway (e.g. when the plan's assumptions do not hold for your setup).
    """
    import os

    import torch

    try:
        root = trainer.strategy.root_device
    except Exception:  # a strategy that has no device before it is set up: nothing to check against
        return None
    if root is None or root.type != "cuda" or os.environ.get("TINA_SKIP_MEMORY_PLAN") == "1":
        return None
    cfg = config.get("fit", config) if hasattr(config, "get") else config
    cfg = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg)
    launcher = getattr(trainer.strategy, "launcher", None)
    if getattr(launcher, "_start_method", None) == "fork" and not torch.cuda.is_initialized():
        return None  # reading the card's size initializes CUDA, which a fork-based launch forbids
    rollout = cfg.get("rollout") or {}
    if rollout.get("engine", "auto") == "auto":
        from lightning_tina.rollout.vllm import vllm_available

        cfg = dict(cfg, rollout=dict(rollout, engine="vllm" if vllm_available() else "hf"))  # what auto picks
    card = torch.cuda.get_device_properties(root).total_memory / GB
    return check_plan(cfg, card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_tina.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, action="append", help="recipe YAML (repeat for several)")
    parser.add_argument("--gpu-memory", type=float, default=48.0, help="the card's memory in GB (default 48)")
    parser.add_argument("--before-fixes", action="store_true", help="model the code before issue 17")
    parser.add_argument("--json", action="store_true", help="one JSON line per recipe after the table")
    args, overrides = parser.parse_known_args(argv)
    worst = 0
    for path in args.config:
        cfg = parse_recipe(path, overrides)
        plan = plan_for(cfg, args.gpu_memory, Path(path).stem, before_fixes=args.before_fixes)
        print("\n".join(plan.lines()))
        if args.json:
            print("JSON " + json.dumps({"recipe": plan.recipe, "fits": plan.fits, **plan.parts}))
        worst = max(worst, 0 if plan.fits else 1)
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
