"""The answer checker: extraction, the Tina-compatible and strict verdicts, timeouts, threads, bad input."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from lightning_tina.checker import Verdict, check, check_many
from lightning_tina.checker.extract import find_final_answer, last_boxed, normalize_answer
from lightning_tina.checker.letter import extract_letter_strict, extract_letter_tina
from lightning_tina.checker.pool import get_pool

TINY = "<think>\n7+8=15\n15*3=45\n45-5=40\n</think>\n\\boxed{40}"
TOWER = "\\boxed{10^{10^{10^{10}}}}"  # sympy tries to evaluate it: takes far longer than any timeout here
SHORT_TIMEOUT = 1.5
SLACK = 1.0  # seconds a timed-out check may take beyond its limit (kill + taking the warm spare)


def test_last_boxed_nested_unclosed_empty_and_variants() -> None:
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("\\boxed{3} and a cut-off \\boxed{4 + ") == "3"  # unclosed last box is skipped
    assert last_boxed("\\boxed{5} \\boxed{}") == "5"  # empty box is skipped
    assert last_boxed("\\fbox{6}") == "6" and last_boxed("\\framebox{204}") == "204"
    assert last_boxed("so \\boxed 7 done") == "7"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are content
    assert last_boxed("no box at all") is None


def test_find_final_answer_order_and_no_last_number_fallback() -> None:
    assert find_final_answer("final answer is 3. Also \\boxed{4}") == "4"  # boxed first
    assert find_final_answer("Therefore, the final answer is: $17$. I hope it is correct") == "17"
    assert find_final_answer("The answer is 2 \\sqrt{5}") == "2 \\sqrt{5}"  # whole answer, not "2"
    assert find_final_answer("Answer: $x=3$ since ...") == "x=3"
    assert find_final_answer("We compute 12 + 28 = 40 and then") is None


def test_normalize_answer_fixes() -> None:
    assert normalize_answer("4.5e33") == "4.5\\times 10^{33}"
    assert normalize_answer("1e-3") == "1\\times 10^{-3}"
    assert normalize_answer("\\text{080}") == "080"
    assert normalize_answer("$\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert normalize_answer("e^{2}") == "e^{2}"  # Euler's number without digits on both sides is left alone


def test_tiny_task_shape_is_graded_in_every_math_mode() -> None:
    for strict in (True, False):
        assert check(TINY, "$40$", "latex", strict=strict) == Verdict(True, "40", "ok")
        assert check(TINY, "40", "expr", strict=strict).correct
        assert not check(TINY.replace("{40}", "{41}"), "$40$", "latex", strict=strict).correct


# (name, completion, gold, mode, Tina's lighteval verdict, strict verdict); the quirks listed in grading.md
QUIRKS = [
    (
        "cut off, last number equals gold",
        "We compute 12 + 28 = 40 and then we need",
        "40",
        "expr",
        True,
        False,
    ),
    (
        "e-notation gold, x10 prediction",
        "\\boxed{4.5 \\times 10^{33}}",
        "so \\boxed{4.5e33} erg/s",
        "latex",
        False,
        True,
    ),
    (
        "e-notation gold, prediction in full",
        "\\boxed{4500000000000000000000000000000000}",
        "\\boxed{4.5e33}",
        "latex",
        False,
        True,
    ),
    ("e-notation, different value", "\\boxed{4.6e33}", "\\boxed{4.5e33}", "latex", False, False),
    ("tiny numbers below the rounding", "\\boxed{1.3e-27}", "\\boxed{2.88e-19}", "latex", False, False),
    ("unboxed 'answer is' cut to 2", "The answer is 2 \\sqrt{5}", "$2$", "latex", True, False),
    ("unboxed 'answer is', right", "The answer is 2 \\sqrt{5}", "$2\\sqrt{5}$", "latex", False, True),
    ("\\text{080} as a string", "So \\boxed{\\text{080}}", "080", "expr", False, True),
    ("leading zero gold", "So \\boxed{80}", "080", "expr", True, True),
    ("GPQA lowercase letter", "Answer: c", "C", "letter", False, True),
    ("GPQA capital elsewhere", "A molecule with a C=O bond", "C", "letter", False, False),
    ("GPQA standard answer line", "blah blah\nAnswer: D", "D", "letter", True, True),
    ("GPQA boxed letter", "Therefore \\boxed{B}", "B", "letter", True, True),
]


@pytest.mark.parametrize("case", QUIRKS, ids=[q[0] for q in QUIRKS])
def test_tina_quirks_kept_and_strict_fixes(case: tuple[str, str, str, str, bool, bool]) -> None:
    _, completion, gold, mode, tina, strict = case
    assert check(completion, gold, mode, strict=False).correct is tina  # type: ignore[arg-type]
    assert check(completion, gold, mode, strict=True).correct is strict  # type: ignore[arg-type]


def test_letter_extraction_rules() -> None:
    assert extract_letter_tina("The final answer is B. I hope it is correct") == "B"
    assert extract_letter_tina("I think (C) but a note on D") == "D"  # bare capitals: the rightmost wins
    assert extract_letter_strict("the answer is a bit unclear") is None  # an article, not option (a)
    assert extract_letter_strict("the answer is (a)") == "A"
    assert extract_letter_strict("**Answer:** C") == "C"
    assert extract_letter_strict("Answer: Alpha decay") is None


def test_statuses_and_check_many_order() -> None:
    verdicts = check_many(
        ["\\boxed{1}", "no answer here", "\\boxed{1}", "\\boxed{x}"], ["1", "1", "2", "\\text{}"]
    )
    assert [v.status for v in verdicts] == ["ok", "no_answer", "ok", "gold_unparsed"]
    assert [v.correct for v in verdicts] == [True, False, False, False]
    assert check("\\boxed{C}", "not a letter", "letter").status == "gold_unparsed"


def test_parallel_matches_sequential() -> None:
    completions = [f"\\boxed{{{i % 7}}}" for i in range(24)]
    golds = [str(i % 5) for i in range(24)]
    assert check_many(completions, golds, workers=2) == check_many(completions, golds, workers=1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(mode="latexx"), ValueError),
        (dict(timeout_s=0), ValueError),
        (dict(letters="abcd"), ValueError),
        (dict(gold=5), TypeError),
    ],
)
def test_bad_input_is_one_clear_error(kwargs: dict, error: type[Exception]) -> None:
    args = dict(completion="\\boxed{5}", gold="5") | kwargs
    with pytest.raises(error):
        check(**args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 completions but 1 golds"):
        check_many(["a", "b"], ["1"])


def _warm() -> None:
    """Wait until an idle worker is ready, so the next timing measures the check and not a worker start."""
    assert check("\\boxed{1}", "1").correct


ADVERSARIAL = {
    "100k chars of text": ("the value of x is 3 so we add 17 and then 42 = y + 5 hence " * 1700)[:100_000],
    "5000 nested braces": "{" * 5000 + "}" * 5000,
    "5000 nested braces in a box": "\\boxed{" + "{" * 5000 + "}" * 5000 + "}",
    "unclosed box": "we get 12, so the answer is \\boxed{" + "1+" * 2000,
    "power tower": TOWER,
    "lone surrogates, odd unicode": "\ud800 \udfff \u202e\x00\ufeff 𝟓 ５ x\u0301 \\boxed{\ud800}",
    "empty": "",
    "10000 empty boxes": "\\boxed{}" * 10_000,
}


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "tina"])
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_completion_gets_a_verdict_within_the_timeout(name: str, strict: bool) -> None:
    _warm()
    t0 = time.monotonic()
    verdict = check(ADVERSARIAL[name], "1234", "expr", strict=strict, timeout_s=SHORT_TIMEOUT)
    elapsed = time.monotonic() - t0
    assert elapsed < SHORT_TIMEOUT + SLACK, f"{name}: {elapsed:.2f}s"
    assert verdict.status in ("ok", "no_answer", "timeout")
    assert verdict.correct is False


def test_timeout_off_the_main_thread_is_a_timeout_not_a_silent_zero() -> None:
    _warm()
    out: dict[str, object] = {}

    def work() -> None:
        t0 = time.monotonic()
        out["slow"] = check(TOWER, "5", timeout_s=SHORT_TIMEOUT)
        out["elapsed"] = time.monotonic() - t0
        out["fine"] = check("so \\boxed{5}", "5")  # the same thread keeps working after a timeout

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert out["slow"] == Verdict(False, None, "timeout")
    assert out["elapsed"] < SHORT_TIMEOUT + SLACK + 2.0  # + a worker start if no spare was warm yet
    assert out["fine"] == Verdict(True, "5", "ok")


def test_many_threads_at_once_all_get_right_verdicts() -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(lambda i: check(f"\\boxed{{{i}}}", str(i)), range(12)))
    assert all(v.correct for v in verdicts)


def test_a_worker_that_died_while_idle_is_replaced() -> None:
    _warm()
    idle = get_pool()._idle
    assert idle, "the pool keeps its workers between calls"
    idle[0].proc.kill()
    idle[0].proc.wait()
    assert check("\\boxed{5}", "5") == Verdict(True, "5", "ok")


def _check_in_child(queue: Any) -> None:
    queue.put((check(TOWER, "5", timeout_s=SHORT_TIMEOUT).status, check("\\boxed{5}", "5").correct))


def test_check_inside_a_forked_worker_process_uses_its_own_workers() -> None:
    _warm()  # the parent's pool exists before the fork; the child must not talk to its workers
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_check_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == ("timeout", True)
    child.join(timeout=10)
    assert child.exitcode == 0
    assert check("\\boxed{6}", "6").correct  # the parent's workers still answer
