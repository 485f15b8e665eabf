"""Evaluation core, outputs, offline re-grading, the done-when oracle checks, and the standalone command."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import lightning_tina.evaluate as ev
from lightning_tina.benchmarks import Benchmark, load_benchmark
from lightning_tina.passk import pass_at_1
from lightning_tina.rollout.base import RolloutEngine, SamplingConfig
from lightning_tina.types import Generation

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"offline benchmark copies not found at {SHARED}"
)
needs_tiny = pytest.mark.skipif(
    not (TINY / "config.json").is_file(), reason=f"tiny model not built at {TINY}"
)


def _has_checker() -> bool:
    try:
        from lightning_tina.checker import check_many  # noqa: F401
    except ImportError:
        return False
    return True


needs_checker = pytest.mark.skipif(not _has_checker(), reason="lightning_tina.checker is not written yet")


class CharTokenizer:
    """A character-level stand-in tokenizer with a ChatML-like template."""

    chat_template = "chatml-like"

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool
    ) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) + 2 for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 2) for i in ids)


class ScriptedEngine(RolloutEngine):
    """Answers each prompt with its problem's reference, or (with probability `wrong_rate`) with a wrong answer,
    drawing from `random.Random(sampling.seed)` like a seeded sampler."""

    def __init__(self, tok: CharTokenizer, benches: list[Benchmark], wrong_rate: float = 0.0) -> None:
        self.tok, self.wrong_rate = tok, wrong_rate
        self.answers = {tuple(ev.render(p, tok)): p.reference or "" for b in benches for p in b.problems}
        self.seeds: list[int | None] = []

    def sync(self, policy: Any, version: int) -> None:
        pass

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig
    ) -> list[Generation]:
        self.seeds.append(sampling.seed)
        rng = random.Random(sampling.seed)
        out = []
        for p in prompt_ids:
            for _ in range(n):
                text = self.answers[tuple(p)] if rng.random() >= self.wrong_rate else "I cannot solve this."
                out.append(
                    Generation(self.tok.encode(text), None, "stop" if rng.random() < 0.8 else "length")
                )
        return out


class FakeVerdict(NamedTuple):
    correct: bool
    extracted: str | None
    status: str


def fake_check_many(completions: list[str], golds: list[str], mode: str, strict: bool) -> list[FakeVerdict]:
    """Stands in for the shared checker in plumbing tests: correct iff the completion equals the gold's reference."""
    out = []
    for c, g in zip(completions, golds, strict=True):
        ok = c.strip() != "I cannot solve this." and (mode != "letter" or c.endswith(g))
        out.append(FakeVerdict(ok if strict else not ok, c[-3:] if ok else None, "ok" if ok else "no_answer"))
    return out


@pytest.fixture
def fake_checker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ev, "_check_many", fake_check_many)


def _benches() -> list[Benchmark]:
    return [load_benchmark("gpqa_diamond", path=FIXTURES, seed=1), load_benchmark("math500", path=FIXTURES)]


def _run(
    seed: int, wrong_rate: float = 0.5, benches: list[Benchmark] | None = None, **kw: Any
) -> ev.EvalResult:
    benches = benches or _benches()
    tok = CharTokenizer()
    return ev.evaluate(
        ScriptedEngine(tok, benches, wrong_rate), tok, benches, SamplingConfig(seed=seed), k=4, **kw
    )


def test_records_are_group_major_and_scores_follow_them(fake_checker: None) -> None:
    result = _run(seed=0, compare_modes=True)
    assert len(result.records) == (4 + 5) * 4
    math = [r for r in result.records if r["benchmark"] == "math500"]
    assert [r["problem_id"] for r in math[:5]] == ["syn-1"] * 4 + ["syn-2"]
    assert [r["sample"] for r in math[:5]] == [0, 1, 2, 3, 0]
    assert math[0]["prompt"].startswith("<user>Solve the following math problem")
    for key in (
        "completion",
        "gold",
        "mode",
        "extracted",
        "status",
        "correct",
        "other_correct",
        "finish_reason",
    ):
        assert key in math[0]
    s = result.scores["math500"]
    matrix = [[r["correct"] for r in math[i : i + 4]] for i in range(0, len(math), 4)]
    assert (s.pass_at_1, s.stderr) == pass_at_1(matrix)
    assert 0.0 < s.pass_at_1 < 1.0 and list(s.pass_at) == [1, 2, 4] and s.pass_at[4] >= s.pass_at[1]
    assert s.correct == sum(map(sum, matrix)) and s.problems == 5 and s.k == 4
    assert s.truncated == sum(r["finish_reason"] == "length" for r in math)
    assert s.other_pass_at_1 == pytest.approx(1.0 - s.pass_at_1)  # the fake grades the other mode inverted
    assert result.average == pytest.approx((s.pass_at_1 + result.scores["gpqa_diamond"].pass_at_1) / 2)
    metrics = result.metrics()
    assert metrics["bench/math500/pass@1"] == s.pass_at_1 and metrics["bench/math500/pass@4"] == s.pass_at[4]
    assert (
        metrics["bench/math500/pass@1_stderr"] == s.stderr and metrics["bench/avg/pass@1"] == result.average
    )
    assert metrics["bench/math500/truncated"] == s.truncated / 20


def test_same_seed_same_numbers_other_seed_other_samples(fake_checker: None) -> None:
    a, b, c = _run(seed=3), _run(seed=3), _run(seed=4)
    assert a.scores == b.scores and a.records == b.records
    assert [r["correct"] for r in a.records] != [r["correct"] for r in c.records]


def test_benchmark_seed_does_not_depend_on_the_other_benchmarks(fake_checker: None) -> None:
    both = _run(seed=5)
    alone = _run(seed=5, benches=[load_benchmark("math500", path=FIXTURES)])
    assert alone.scores["math500"] == both.scores["math500"]


def test_write_results_and_regrade_reproduce_the_numbers(fake_checker: None, tmp_path: Path) -> None:
    result = _run(seed=0, compare_modes=True)
    paths = ev.write_results(result, tmp_path / "out", label="scripted")
    data = json.loads(paths["json"].read_text())
    assert data["scores"]["math500"]["pass_at_1"] == result.scores["math500"].pass_at_1
    assert data["average_pass_at_1"] == result.average and data["config"]["k"] == 4
    table = paths["md"].read_text().splitlines()
    assert table[0] == "| Model | MATH500 | GPQA | Avg. |"  # Tina's column order, whatever the run order
    avg = f"{100 * result.average:.2f}"
    assert table[2] == f"| scripted | {100 * result.scores['math500'].pass_at_1:.2f} | " + (
        f"{100 * result.scores['gpqa_diamond'].pass_at_1:.2f} | {avg} |"
    )
    assert len(paths["samples"].read_text().splitlines()) == len(result.records)
    again = ev.regrade(paths["samples"])
    assert again.scores == result.scores
    flipped = ev.regrade(paths["samples"], strict=False)
    assert flipped.scores["math500"].pass_at_1 == pytest.approx(1.0 - result.scores["math500"].pass_at_1)


def test_engine_with_wrong_count_and_bad_k_fail(fake_checker: None) -> None:
    class Short(ScriptedEngine):
        def generate(
            self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig
        ) -> list[Generation]:
            return super().generate(prompt_ids, n, sampling)[:-1]

    benches, tok = _benches(), CharTokenizer()
    with pytest.raises(RuntimeError, match="generations for 4 prompts x k=2"):
        ev.evaluate(Short(tok, benches), tok, benches, SamplingConfig(seed=0), k=2)
    with pytest.raises(ValueError, match="k .* must be >= 1"):
        ev.evaluate(ScriptedEngine(tok, benches), tok, benches, SamplingConfig(), k=0)
    with pytest.raises(FileNotFoundError, match="no samples file"):
        ev.regrade(Path("/nonexistent/samples.jsonl"))


def _oracle_pass_at_1(name: str, file_limit: int | None, strict: bool) -> float:
    bench = load_benchmark(name, path=SHARED, limit=file_limit)
    tok = CharTokenizer()
    result = ev.evaluate(
        ScriptedEngine(tok, [bench]), tok, [bench], SamplingConfig(seed=0), k=1, strict=strict
    )
    return result.scores[name].pass_at_1


@needs_shared
@needs_checker
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name", ["math500", "minerva"])
def test_oracle_completions_score_at_least_99_percent_fast(name: str, strict: bool) -> None:
    assert _oracle_pass_at_1(name, 40, strict) >= 0.99


@pytest.mark.slow
@needs_shared
@needs_checker
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name", ["math500", "minerva"])
def test_oracle_completions_score_at_least_99_percent_full(name: str, strict: bool) -> None:
    assert _oracle_pass_at_1(name, None, strict) >= 0.99


@needs_checker
def test_regrade_with_the_real_checker_is_exact(tmp_path: Path) -> None:
    result = _run(seed=2, compare_modes=True)
    paths = ev.write_results(result, tmp_path)
    assert ev.regrade(paths["samples"]).scores == result.scores
    assert 0.0 < result.scores["math500"].pass_at_1 < 1.0


def test_cli_rejects_unknown_benchmark_and_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--benchmarks: unknown benchmark 'math5000'"):
        ev.main(["--model", "org/model", "--benchmarks", "math5000", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--model: no such directory './missing'"):
        ev.main(["--model", "./missing", "--benchmarks", "aime24", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--adapter: .* is not a PEFT adapter directory"):
        ev.main(["--model", "org/model", "--adapter", str(tmp_path), "--out", str(tmp_path)])


def test_eval_presets_parse() -> None:
    presets = sorted((Path(__file__).resolve().parents[1] / "configs" / "eval").glob("*.yaml"))
    assert presets, "configs/eval/ has no presets"
    for preset in presets:
        args = ev._parser().parse_args(["--config", str(preset), "--model", "org/model", "--out", "x"])
        assert args.k >= 1 and 0 < args.top_p <= 1, preset


@needs_tiny
@needs_checker
def test_cli_end_to_end_on_the_tiny_model(tmp_path: Path) -> None:
    names = "tiny_heldout,math500" if SHARED.is_dir() else "tiny_heldout"
    argv = [
        "--model",
        str(TINY),
        "--benchmarks",
        names,
        "--data-dir",
        str(SHARED),
        "--limit",
        "4",
        "--k",
        "2",
    ]
    argv += ["--max-new-tokens", "48", "--engine", "hf", "--dtype", "float32", "--seed", "0"]
    first = ev.main(argv + ["--out", str(tmp_path / "a")])
    second = ev.main(argv + ["--out", str(tmp_path / "b")])
    for name in ("results.json", "results.md", "samples.jsonl"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert first.scores == second.scores
    assert [r["completion"] for r in first.records] == [r["completion"] for r in second.records]
    assert ev.regrade(tmp_path / "a" / "samples.jsonl").scores == first.scores
    assert first.scores["tiny_heldout"].problems == 4 and len(first.records) == 2 * 4 * len(names.split(","))


@needs_tiny
@needs_checker
def test_cli_applies_an_adapter(tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )  # random B: not a no-op
    get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), lora).save_pretrained(tmp_path / "adapter")
    argv = ["--model", str(TINY), "--benchmarks", "tiny_heldout", "--limit", "3", "--k", "1"]
    argv += ["--max-new-tokens", "16", "--engine", "hf", "--dtype", "float32"]
    base = ev.main(argv + ["--out", str(tmp_path / "base")])
    tuned = ev.main(argv + ["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "tuned")])
    assert [r["completion"] for r in base.records] != [r["completion"] for r in tuned.records]
    assert json.loads((tmp_path / "tuned" / "results.json").read_text())["config"]["adapter"] == str(
        tmp_path / "adapter"
    )
