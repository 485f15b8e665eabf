"""Benchmark evaluation through any RolloutEngine: sample k completions per problem, grade, score, write, re-grade.

Used by the training callback (`evaluate`; `evaluate_population` scores a population's adapters in one generate call
per benchmark) and as a command (`python -m lightning_tina.evaluate --help`). Outputs:
`results.json` (config and scores), `results.md` (Tina's table layout plus details) and `samples.jsonl` (one record
per sample: prompt, completion, extracted answer, verdict), which `regrade` scores again offline.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning_tina.benchmarks import REGISTRY, Benchmark, render, render_text
from lightning_tina.passk import mean_pass_at_k, pass_at_1, reported_ks
from lightning_tina.population import adapter_major
from lightning_tina.rollout.base import Adapters, RolloutEngine, Sampler, SamplingConfig, with_adapters

log = logging.getLogger(__name__)

RESULTS_JSON, RESULTS_MD, SAMPLES_JSONL = "results.json", "results.md", "samples.jsonl"
DATASET_GRADING = "latex"
"""The grading mode of training-dataset rows (the accuracy reward's): their `solution` is `$...$` or LaTeX."""


@dataclass
class BenchmarkScore:
    """The scores of one benchmark (fractions in [0, 1])."""

    name: str
    """Registry name."""
    problems: int
    """Number of problems P."""
    k: int
    """Samples per problem."""
    pass_at_1: float
    """Mean over problems of the per-problem accuracy over its k samples."""
    stderr: float
    """Standard error of `pass_at_1`: std over problems (ddof=1) of per-problem accuracy / sqrt(P); NaN if P=1."""
    pass_at: dict[int, float]
    """Unbiased pass@j for j in 1, 2, 4, ... up to k."""
    correct: int
    """Correct samples."""
    truncated: int
    """Samples cut off by max_new_tokens."""
    other_pass_at_1: float | None = None
    """pass@1 under the other grading mode (strict vs Tina's lenient), when it was graded too."""


@dataclass
class EvalResult:
    """Scores per benchmark (in evaluation order), every graded sample, and the settings that produced them."""

    scores: dict[str, BenchmarkScore]
    """Per-benchmark scores."""
    records: list[dict[str, Any]]
    """One record per sample (see `evaluate`)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Sampling, k, strictness, model; copied into results.json."""

    @property
    def average(self) -> float:
        """Unweighted mean of pass@1 over the benchmarks evaluated (Tina's "Avg." when they are its six)."""
        return sum(s.pass_at_1 for s in self.scores.values()) / len(self.scores)

    def metrics(self, prefix: str = "bench") -> dict[str, float]:
        """Flat scalars for a logger: `<prefix>/<name>/pass@1`, `.../pass@1_stderr`, `.../pass@<j>`,
        `.../truncated` (fraction of samples), `<prefix>/avg/pass@1`; NaN standard errors are left out."""
        out = {f"{prefix}/avg/pass@1": self.average}
        for n, s in self.scores.items():
            out.update({f"{prefix}/{n}/pass@{j}": v for j, v in s.pass_at.items()})
            out[f"{prefix}/{n}/truncated"] = s.truncated / (s.problems * s.k)
            if not math.isnan(s.stderr):
                out[f"{prefix}/{n}/pass@1_stderr"] = s.stderr
        return out


def _check_many(completions: list[str], golds: list[str], mode: str, strict: bool) -> list[Any]:
    """The shared answer checker (imported late so that the module loads without it)."""
    from lightning_tina.checker import check_many

    return check_many(completions, golds, mode, strict=strict)


def decode(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """A completion's text as graded: special tokens removed (as lighteval decodes)."""
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def sample_and_grade(
    sampler: Sampler,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    golds: Sequence[str],
    mode: str,
    k: int,
    sampling: SamplingConfig,
    strict: bool = True,
    adapters: Adapters = None,
) -> list[bool]:
    """Sample `k` completions per prompt (prompt i through population adapter adapters[i] when given) and grade
    each against its prompt's gold: correctness, group-major. The decode and grading of `evaluate()`, for prompts
    that are not a registered benchmark (validate/test)."""
    gens = with_adapters(sampler.generate, prompt_ids, k, sampling, adapters=adapters)
    texts = [decode(tokenizer, g.token_ids) for g in gens]
    verdicts = _check_many(texts, [golds[i // k] for i in range(len(gens))], mode, strict)
    return [bool(v.correct) for v in verdicts]


def _grade(records: list[dict[str, Any]], strict: bool, key: str = "") -> None:
    """Grade `records` in place (grouped by mode): sets `correct`, `extracted`, `status` (prefixed with `key`)."""
    by_mode: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_mode.setdefault(r["mode"], []).append(i)
    for mode, idx in by_mode.items():
        verdicts = _check_many(
            [records[i]["completion"] for i in idx], [records[i]["gold"] for i in idx], mode, strict
        )
        for i, v in zip(idx, verdicts, strict=True):
            records[i][key + "correct"] = bool(v.correct)
            if not key:
                records[i]["extracted"] = None if v.extracted is None else str(v.extracted)
                records[i]["status"] = str(v.status)


def score_records(records: list[dict[str, Any]], other: bool = False) -> dict[str, BenchmarkScore]:
    """Scores per benchmark from graded records, problems in first-seen order; every problem must have k samples."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        grouped.setdefault(r["benchmark"], {}).setdefault(r["problem_id"], []).append(r)
    scores = {}
    for name, problems in grouped.items():
        ks = {len(v) for v in problems.values()}
        if len(ks) != 1:
            raise ValueError(f"benchmark {name!r}: problems have different sample counts {sorted(ks)}")
        k = ks.pop()
        matrix = [[s["correct"] for s in v] for v in problems.values()]
        mean, err = pass_at_1(matrix)
        other_mean = (
            pass_at_1([[s["other_correct"] for s in v] for v in problems.values()])[0] if other else None
        )
        scores[name] = BenchmarkScore(
            name=name,
            problems=len(matrix),
            k=k,
            pass_at_1=mean,
            stderr=err,
            pass_at={j: mean_pass_at_k(matrix, j) for j in reported_ks(k)},
            correct=sum(map(sum, matrix)),
            truncated=sum(r["finish_reason"] == "length" for v in problems.values() for r in v),
            other_pass_at_1=other_mean,
        )
    return scores


def _bench_seed(seed: int | None, name: str) -> int | None:
    """A per-benchmark sampling seed, so one benchmark's samples do not depend on which others run before it."""
    return None if seed is None else (seed + zlib.crc32(name.encode())) % (2**31)


def _sample_records(
    engine: Sampler,
    tokenizer: Any,
    bench: Benchmark,
    sampling: SamplingConfig,
    k: int,
    strict: bool,
    add_special_tokens: bool,
    adapters: Sequence[str] | None = None,
) -> list[list[dict[str, Any]]]:
    """Sample `k` completions per problem of `bench` in one generate call: ungraded records, group-major, one list
    per adapter (prompts repeated adapter-major, prompt i through its adapter), or one list without `adapters`."""
    prompts = [render(p, tokenizer, add_special_tokens=add_special_tokens) for p in bench.problems]
    texts = [render_text(p, tokenizer) for p in bench.problems]
    seeded = replace(sampling, seed=_bench_seed(sampling.seed, bench.name))
    if adapters is None:
        gens = engine.generate(prompts, k, seeded)
    else:
        names = adapter_major(adapters, len(prompts))
        gens = engine.generate(prompts * len(adapters), k, seeded, names)
    per = len(prompts) * k
    groups = [None] if adapters is None else list(adapters)
    if len(gens) != per * len(groups):
        across = "" if adapters is None else f" x {len(groups)} adapters"
        raise RuntimeError(
            f"engine returned {len(gens)} generations for {len(prompts)} prompts x k={k}{across}"
        )
    out = []
    for a, adapter in enumerate(groups):
        recs = []
        for j, g in enumerate(gens[a * per : (a + 1) * per]):  # group-major: problem j // k, sample j % k
            p = bench.problems[j // k]
            rec = dict(
                benchmark=bench.name,
                problem_id=p.id,
                sample=j % k,
                prompt=texts[j // k],
                completion=decode(tokenizer, g.token_ids),
                gold=p.gold,
                mode=p.mode,
                strict=strict,
                finish_reason=g.finish_reason,
                completion_tokens=len(g.token_ids),
            )
            if adapter is not None:
                rec["adapter"] = adapter
            recs.append(rec)
        out.append(recs)
    return out


def evaluate(
    engine: Sampler,
    tokenizer: Any,
    benchmarks: Sequence[Benchmark],
    sampling: SamplingConfig,
    k: int,
    strict: bool = True,
    *,
    compare_modes: bool = False,
    add_special_tokens: bool = False,
    on_benchmark: Callable[[BenchmarkScore], None] | None = None,
) -> EvalResult:
    """Sample `k` completions per problem with `engine`, grade them with the shared checker, and score.

    `strict=False` grades as Tina's lighteval did (quirks included); `compare_modes` also grades the other way and
    reports it as `other_pass_at_1`. The sampling seed of each benchmark is `sampling.seed` offset by a hash of its
    name. Records hold: benchmark, problem_id, sample, prompt (rendered text), completion, gold, mode, strict,
    finish_reason, completion_tokens, extracted, status, correct (and other_correct).
    """
    hook = None if on_benchmark is None else (lambda _adapter, score: on_benchmark(score))
    return _evaluate(
        engine, tokenizer, benchmarks, sampling, k, strict, compare_modes, add_special_tokens, hook
    )[0]


def evaluate_population(
    engine: Sampler,
    tokenizer: Any,
    benchmarks: Sequence[Benchmark],
    sampling: SamplingConfig,
    k: int,
    adapters: Sequence[str],
    strict: bool = True,
    *,
    compare_modes: bool = False,
    add_special_tokens: bool = False,
    on_benchmark: Callable[[str, BenchmarkScore], None] | None = None,
) -> dict[str, EvalResult]:
    """`evaluate` for several population adapters at once: per benchmark ONE generate call samples every adapter's
    `k` completions per problem (prompts repeated adapter-major, each naming its adapter), then each adapter's
    records are graded and scored as `evaluate` does. Returns one EvalResult per adapter, in `adapters` order.

    Seeds as `evaluate` (one per benchmark, shared by the adapters); with greedy sampling adapter a's result equals a
    solo `evaluate` with adapter a active. Records also hold `adapter`; each result's config names its adapter."""
    names = list(adapters)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"evaluate_population: adapters must be unique names, at least one; got {names}")
    results = _evaluate(
        engine,
        tokenizer,
        benchmarks,
        sampling,
        k,
        strict,
        compare_modes,
        add_special_tokens,
        on_benchmark,
        names,
    )
    for name, result in zip(names, results, strict=True):
        result.config["adapter"] = name
    return dict(zip(names, results, strict=True))


def _evaluate(
    engine: Sampler,
    tokenizer: Any,
    benchmarks: Sequence[Benchmark],
    sampling: SamplingConfig,
    k: int,
    strict: bool,
    compare_modes: bool,
    add_special_tokens: bool,
    on_benchmark: Callable[[str | None, BenchmarkScore], None] | None,
    adapters: Sequence[str] | None = None,
) -> list[EvalResult]:
    """The one evaluation path: one EvalResult per adapter (one without `adapters`, the policy as it is)."""
    if k < 1:
        raise ValueError(f"k (samples per problem) must be >= 1, got {k}")
    groups: list[str | None] = [None] if adapters is None else list(adapters)
    records: list[list[dict[str, Any]]] = [[] for _ in groups]
    scores: list[dict[str, BenchmarkScore]] = [{} for _ in groups]
    for bench in benchmarks:
        t0 = time.perf_counter()
        sampled = _sample_records(engine, tokenizer, bench, sampling, k, strict, add_special_tokens, adapters)
        every = [r for recs in sampled for r in recs]  # one grading pass over every adapter's records
        _grade(every, strict)
        if compare_modes:
            _grade(every, not strict, key="other_")
        for adapter, recs, own, kept in zip(groups, sampled, scores, records, strict=True):
            own[bench.name] = score_records(recs, other=compare_modes)[bench.name]
            kept.extend(recs)
            where = bench.name if adapter is None else f"{bench.name} [{adapter}]"
            log.info("%s: pass@1 %.4f (%.1fs)", where, own[bench.name].pass_at_1, time.perf_counter() - t0)
            if on_benchmark is not None:
                on_benchmark(adapter, own[bench.name])
    config = dict(sampling=asdict(sampling), k=k, strict=strict, compare_modes=compare_modes)
    config["benchmarks"] = {
        b.name: dict(source=b.source, seed=b.seed, problems=len(b.problems)) for b in benchmarks
    }
    return [
        EvalResult(scores=s, records=r, config=dict(config)) for s, r in zip(scores, records, strict=True)
    ]


def regrade(jsonl_path: str | Path, strict: bool | None = None) -> EvalResult:
    """Grade a written samples.jsonl again (with each record's own `strict`, unless `strict` is given) and score."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise FileNotFoundError(f"regrade: no samples file at {path}")
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"regrade: {path} has no records")
    compare = all("other_correct" in r for r in records)
    for r in records:
        if strict is not None:
            r["strict"] = strict
    for s in sorted({r["strict"] for r in records}):
        group = [r for r in records if r["strict"] == s]
        _grade(group, s)
        if compare:
            _grade(group, not s, key="other_")
    return EvalResult(
        scores=score_records(records, other=compare), records=records, config={"regraded": str(path)}
    )


def _num(x: float | None) -> float | None:
    """JSON-safe number: NaN becomes null."""
    return None if x is None or math.isnan(x) else x


def percent(x: float | None, stderr: float | None = None, decimals: int = 2) -> str:
    """A fraction in percent ("-" when missing), with its standard error when one is given and finite. Tina prints
    two decimals; the training table prints one."""
    if x is None or math.isnan(x):
        return "-"
    if stderr is None or math.isnan(stderr):
        return f"{100 * x:.{decimals}f}"
    return f"{100 * x:.{decimals}f} ± {100 * stderr:.{decimals}f}"


def results_table(result: EvalResult, label: str) -> str:
    """Markdown: Tina's table (benchmarks as columns in Tina's order, pass@1 in %, then Avg.) and a detail table."""
    names = [n for n in REGISTRY if n in result.scores] + [n for n in result.scores if n not in REGISTRY]
    titles = [REGISTRY[n].title if n in REGISTRY else n for n in names]
    lines = [
        "| Model | " + " | ".join(titles) + " | Avg. |",
        "|---|" + "---:|" * (len(names) + 1),
        f"| {label} | "
        + " | ".join(percent(result.scores[n].pass_at_1) for n in names)
        + f" | {percent(result.average)} |",
        "",
        "pass@1 is the mean over k samples per problem; ± is its standard error over problems (in points).",
        "",
        "| Benchmark | Problems | k | pass@1 ± s.e. | pass@k | other mode pass@1 | correct | truncated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, t in zip(names, titles, strict=True):
        s = result.scores[n]
        passk = ", ".join(f"@{j} {percent(v)}" for j, v in s.pass_at.items())
        lines.append(
            f"| {t} | {s.problems} | {s.k} | {percent(s.pass_at_1)} ± {percent(s.stderr)} | {passk} | "
            f"{percent(s.other_pass_at_1)} | {s.correct}/{s.problems * s.k} | {s.truncated} |"
        )
    return "\n".join(lines) + "\n"


def write_results(result: EvalResult, out_dir: str | Path, label: str = "model") -> dict[str, Path]:
    """Write results.json, results.md and samples.jsonl into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "md": out / RESULTS_MD, "samples": out / SAMPLES_JSONL}
    scores = {}
    for n, s in result.scores.items():
        d = asdict(s)
        d.update(stderr=_num(s.stderr), pass_at={str(j): v for j, v in s.pass_at.items()})
        scores[n] = d
    payload = dict(label=label, config=result.config, scores=scores, average_pass_at_1=result.average)
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(results_table(result, label), encoding="utf-8")
    with paths["samples"].open("w", encoding="utf-8") as f:
        for r in result.records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return paths


def _parser() -> Any:
    """The command's arguments (jsonargparse, so `--config configs/eval/<preset>.yaml` works)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="python -m lightning_tina.evaluate", description=__doc__)
    p.add_argument("--config", action=ActionConfigFile, help="YAML preset (see configs/eval/)")
    p.add_argument("--model", type=str, required=True, help="base model directory or hub id")
    p.add_argument("--adapter", type=str | None, default=None, help="PEFT LoRA adapter directory")
    p.add_argument("--benchmarks", type=str, default="math500", help="comma-separated: " + ",".join(REGISTRY))
    p.add_argument("--data-dir", type=str | None, default=None, help="local JSONL folder (default: the hub)")
    p.add_argument("--k", type=int, default=1, help="samples per problem (Tina: 1)")
    p.add_argument("--max-new-tokens", type=int, default=32768, help="Tina: 32768")
    p.add_argument("--temperature", type=float, default=0.6, help="Tina: 0.6")
    p.add_argument("--top-p", type=float, default=0.95, help="Tina: 0.95")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and GPQA option-slot seed")
    p.add_argument("--limit", type=int | None, default=None, help="first N problems of each benchmark")
    p.add_argument("--grading", type=str, default="strict", choices=["strict", "tina"], help="checker mode")
    p.add_argument("--compare-modes", type=bool, default=True, help="also grade the other mode, side by side")
    p.add_argument("--engine", type=str, default="auto", choices=["hf", "vllm", "auto"])
    p.add_argument("--dtype", type=str, default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--batch-prompts", type=int, default=64, help="prompts per HF generate call")
    p.add_argument("--double-bos", type=bool, default=False, help="add special tokens, as lighteval did")
    p.add_argument("--label", type=str | None, default=None, help="row label in results.md (default: model)")
    p.add_argument("--out", type=str, required=True, help="output directory")
    return p


def _check_paths(model: str, adapter: str | None) -> None:
    """Fail early, naming the flag, on a model path that does not exist or an adapter that is not one."""
    from lightning_tina.paths import check_model_path

    try:
        check_model_path(model, "--model")
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    if adapter is not None and not (Path(adapter).expanduser() / "adapter_config.json").is_file():
        raise SystemExit(f"--adapter: {adapter!r} is not a PEFT adapter directory (no adapter_config.json)")


def _load_policy(args: Any) -> Any:
    """The HF model with the adapter applied (PEFT), for HF generation or to push the adapter into vLLM."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    if args.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    return model


def _make_engine(args: Any, tokenizer: Any, max_model_len: int) -> tuple[RolloutEngine, str]:
    """The engine the flags ask for (through rollout.make_engine, as training builds its own), and its name: "auto"
    takes vLLM when it is installed, else HF generate."""
    import torch

    from lightning_tina.rollout import make_engine
    from lightning_tina.rollout.hf import HFEngine
    from lightning_tina.rollout.vllm import VLLM_INSTALL_HINT, VLLMConfig, vllm_available

    kind = args.engine if args.engine != "auto" else ("vllm" if vllm_available() else "hf")
    if kind == "vllm" and not vllm_available():
        raise SystemExit(f"--engine vllm: {VLLM_INSTALL_HINT}")
    policy = None
    if kind == "hf" or args.adapter is not None:  # HF generates on it; vLLM takes the adapter from it
        policy = _load_policy(args)
        if kind == "hf":
            policy = policy.to("cuda" if torch.cuda.is_available() else "cpu")
    rank = 1
    if args.adapter is not None:
        rank = json.loads((Path(args.adapter).expanduser() / "adapter_config.json").read_text())["r"]
    engine = make_engine(
        kind,
        model_name=args.model,
        policy=policy,
        tokenizer=tokenizer,
        dtype=args.dtype,
        lora_rank=rank,
        vllm=VLLMConfig(max_model_len=max_model_len, seed=args.seed),
    )
    if isinstance(engine, HFEngine):
        engine.max_batch_prompts = args.batch_prompts
    elif args.adapter is not None:  # vLLM serves the base; the adapter goes in as a LoRA, unmerged
        engine.sync(policy, version=1)
    return engine, kind


def main(argv: list[str] | None = None) -> EvalResult:
    """Run the standalone evaluation and write its three outputs."""
    from lightning_tina.benchmarks import get_spec, load_benchmarks

    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    try:
        for n in names:
            get_spec(n)
    except ValueError as err:
        raise SystemExit(f"--benchmarks: {err}") from None
    _check_paths(args.model, args.adapter)
    benches = load_benchmarks(names, data_dir=args.data_dir, limit=args.limit, seed=args.seed)
    from lightning_tina.policy import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.model)  # with the pad-token fallback training uses
    except OSError as err:
        raise SystemExit(f"--model: cannot load {args.model!r} as a directory or hub id ({err})") from None
    longest = max(
        len(render(p, tokenizer, add_special_tokens=args.double_bos)) for b in benches for p in b.problems
    )
    engine, kind = _make_engine(args, tokenizer, max_model_len=longest + args.max_new_tokens)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    try:
        result = evaluate(
            engine, tokenizer, benches, sampling, args.k, strict=args.grading == "strict",
            compare_modes=args.compare_modes, add_special_tokens=args.double_bos,
        )  # fmt: skip
    finally:
        engine.close()
    result.config.update(model=args.model, adapter=args.adapter, engine=kind, grading=args.grading)
    label = args.label or (args.model + (f" + {args.adapter}" if args.adapter else ""))
    paths = write_results(result, args.out, label=label)
    print(paths["md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return result


if __name__ == "__main__":
    main()
