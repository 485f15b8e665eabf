"""Shared helpers of the bench scripts: model shapes, random-weight Qwen2 folders, prompts, rewards, timing, memory.

The bench scripts import this file as ``common`` (they put ``bench/`` on ``sys.path``), so nothing here is part of
the ``lightning_tina`` package. Call ``pin_threads`` before importing torch-heavy modules in a fresh process.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for lightning_tina
from lightning_tina.policy import TINA_TARGET_MODULES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_DIR = REPO / "data" / "tiny"
LORA_TARGETS = TINA_TARGET_MODULES

# Random-weight shapes (vocab_size None = the tokenizer's length).
# 18m: the second size; intermediate 2 * hidden gives about 18M parameters with the tiny tokenizer.
# qwen1.5b: DeepSeek-R1-Distill-Qwen-1.5B's published config.json (no download: only the shape is used).
SHAPES: dict[str, dict[str, Any]] = {
    "18m": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1024,
        vocab_size=None,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "qwen1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        max_position_embeddings=131072,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
}


GPU_SETTINGS: dict[str, Any] = dict(
    size="qwen1.5b",
    dtype="bfloat16",
    precision="bf16",
    gradient_checkpointing=True,
    prompt_tokens=512,
    tokens=3584,
    lora_r=32,
    lora_alpha=128,
    prompts=2,
    micro_batch=4,
)
"""What --gpu means in every bench script: Tina's model shape, lengths (512 prompt + 3,584 completion tokens) and
LoRA (r=32, alpha=128), bf16 weights with bf16 autocast, gradient checkpointing, 2 prompts x 4 generations trained
in micro-batches of 4."""


def pin_threads(n: int) -> None:
    """Use `n` intra-op threads (OpenMP/MKL and torch) and one inter-op thread, identically for every tool."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass


def tiny_dir(explicit: str | None = None) -> Path:
    """The embedded tiny model: `explicit` (--tiny-dir), else data/tiny."""
    candidate = Path(explicit) if explicit else TINY_DIR
    if (candidate / "config.json").exists():
        return candidate
    where = explicit or TINY_DIR
    raise SystemExit(
        f"no tiny model at {where}: build one with `python -m lightning_tina.tiny.build --out DIR` and pass "
        "--tiny-dir DIR"
    )


def build_random_qwen2(shape: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a random-weight Qwen2ForCausalLM of `shape` with the tokenizer of `tokenizer_dir` into `out`.

    Saved in float32, except the 1.5B shape in bfloat16 (half the disk); the bench scripts load either in the
    dtype they need.
    Reuses `out` when it already holds a model built with the same shape, seed and tokenizer, so repeated
    bench runs do not rebuild it. Built on the GPU when there is one (the 1.5B shape takes minutes on a CPU).
    """
    import torch
    from transformers import AutoTokenizer

    from lightning_tina.tiny.random_model import save_random_qwen2

    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {sorted(SHAPES)}")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    spec = dict(SHAPES[shape])
    spec["vocab_size"] = spec["vocab_size"] or len(tok)
    dtype = "bfloat16" if shape == "qwen1.5b" else "float32"
    stamp = out / "bench_shape.json"
    tok_file = tokenizer_dir / "tokenizer.json"
    tok_hash = hashlib.sha256(tok_file.read_bytes()).hexdigest()[:16] if tok_file.exists() else ""
    wanted = {"shape": shape, "seed": seed, "dtype": dtype, "tokenizer": tok_hash, **spec}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return out
    save_random_qwen2(
        out,
        tok,
        seed=seed,
        dtype=getattr(torch, dtype),
        device="cuda" if torch.cuda.is_available() else "cpu",
        head_dim=spec["hidden_size"] // spec["num_attention_heads"],
        bos_token_id=None,
        **spec,
    )
    stamp.write_text(json.dumps(wanted))
    return out


def count_parameters(model_dir: Path) -> int:
    """Parameters of the model saved in `model_dir` (tied weights counted once), built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return sum(p.numel() for p in model.parameters())


def bench_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows of the generated arithmetic task ({"problem", "solution", "answer"}), deterministic in `seed`."""
    import itertools

    from lightning_tina.tiny.task import train_rows

    return list(itertools.islice(train_rows(seed), n))


def render_prompts(tokenizer: Any, rows: Sequence[dict[str, str]]) -> tuple[list[str], list[list[int]]]:
    """Chat-templated prompt texts (no system prompt, generation prompt appended) and their token ids."""
    from lightning_tina.prompts import render_prompt

    texts = [render_prompt(tokenizer, r["problem"], None, None) for r in rows]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return texts, ids


def synthetic_sequences(
    prompts: int, generations: int, prompt_tokens: int, completion_tokens: int, vocab: int, seed: int = 0
) -> tuple[Any, Any]:
    """Random prompt ids [B*G, P] (the G rows of a group share their prompt) and completion ids [B*G, C].

    For timing the training forward/backward at fixed lengths without generating; ids avoid 0-2 (pad/special).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (prompts, prompt_tokens), generator=g).repeat_interleave(generations, 0)
    completion = torch.randint(3, vocab, (prompts * generations, completion_tokens), generator=g)
    return prompt, completion  # [B*G, P], [B*G, C]


def synthetic_completion_mask(n: int, completion_tokens: int, spread: float, seed: int) -> Any:
    """[N, C] right-padded completion mask with lengths uniform in [(1 - spread) * C, C] per sequence (all C at
    spread 0), drawn from `seed`: both tools of a comparison train on the same lengths."""
    import torch

    shortest = max(1, round((1 - spread) * completion_tokens))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, completion_tokens + 1, (n,), generator=g)  # [N]
    return (torch.arange(completion_tokens) < lengths[:, None]).long()  # [N, C]


# ---- the reward both tools use: lightning_tina's accuracy + format, weights 1 and 1 -----------------------------


def trl_accuracy(completions: list[str], solution: list[str], **_: Any) -> list[float | None]:
    """lightning_tina's `accuracy` reward with TRL's calling convention (dataset columns as keyword lists)."""
    from lightning_tina.rewards import accuracy_reward

    return accuracy_reward(list(completions), solution=list(solution))


def trl_format(completions: list[str], **_: Any) -> list[float | None]:
    """lightning_tina's `format` reward with TRL's calling convention."""
    from lightning_tina.rewards import format_reward

    return format_reward(list(completions))


# ---- timing and memory -----------------------------------------------------------------------------------------


def sync_device() -> None:
    """Wait for queued GPU work so that wall-clock timings include it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhaseTimer:
    """Accumulates wall seconds, process CPU seconds and (on GPU) the allocator peak per named phase of one step.

    CPU seconds count only this process's own work, so on a shared machine they vary much less than wall seconds
    (with one thread they equal the wall time the phase would take on an idle core).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as phase `name` (added to earlier time of the same phase in this step)."""
        import torch

        sync_device()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            sync_device()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_start
            if torch.cuda.is_available():
                peak = torch.cuda.max_memory_allocated()
                self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Highest resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory() -> dict[str, float]:
    """Peak memory in GB: process RSS on CPU, plus the CUDA allocator's peak when a GPU is used."""
    import torch

    out = {"peak_rss_gb": peak_rss_bytes() / 1e9}
    if torch.cuda.is_available():
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, minimum, maximum and count of `values`."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    """A plain fixed-width table of `rows` (dicts) restricted to `columns`; floats get 3 significant decimals."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    if title:
        print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def emit_json(record: dict[str, Any], prefix: str = "JSON ") -> None:
    """Print one machine-readable line (`prefix` + JSON) that other scripts and readers grep for."""
    print(prefix + json.dumps(record, sort_keys=True, default=float), flush=True)


def parse_json_lines(text: str, prefix: str = "JSON ") -> list[dict[str, Any]]:
    """Every record that `emit_json` printed into `text`."""
    return [json.loads(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU count and model, GPU name, library versions."""
    import platform

    import torch

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for name in ("transformers", "peft", "trl", "vllm", "lightning"):
        mod = sys.modules.get(name)
        if mod is not None:
            info[name] = getattr(mod, "__version__", "?")
    return info


def load_avg() -> float:
    """The 1-minute load average (the machine is shared: a high value explains noisy timings)."""
    return os.getloadavg()[0]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of fn() (GPU work included) and its result."""
    sync_device()
    start = time.perf_counter()
    result = fn()
    sync_device()
    return time.perf_counter() - start, result
