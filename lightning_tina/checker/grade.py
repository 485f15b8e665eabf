"""One grading decision, in-process and without any timeout (the worker pool in ``pool.py`` adds that).

Two behaviours share math-verify's LaTeX parser (latex2sympy2_extended) and its equivalence test ``verify``:

* ``strict=False`` configures math-verify the way Tina's lighteval task file configured lighteval 0.8
  (``scripts/eval/run_eval_custom_tasks.py``): gold extraction by expression (``expr``) or LaTeX (``latex``),
  prediction extraction by LaTeX with boxed first plus bare expressions, fallback "first match", precision 5,
  and the raw gold string when the gold does not parse. Its quirks are kept on purpose (see grading.md).
* ``strict=True`` extracts one final answer (``extract.find_final_answer``: boxed, "final answer is", "answer
  is"; never the last number of the text), fixes e-notation and ``\\text{080}``, and parses the whole answer, so
  "answer is 2 \\sqrt{5}" is not cut to ``2``.

* ``"tina_accuracy"`` / ``"tina_length"`` (``GRADERS``) are the math-verify calls of Tina's training rewards
  (tina/post_train_hf/rewards.py): its accuracy reward, and the one its length, L1 and cosine rewards share. They
  run math-verify 0.5.2's behaviour under the installed newer version (``mv_compat``), so that the Tina recipes
  train on the values Tina trained on; parity/rewards_parity.py checks them against Tina's own code.

``grade`` returns plain tuples so the worker processes can send them back cheaply.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Any

from lightning_tina.checker.extract import find_final_answer, last_boxed, loose_string_key, normalize_answer
from lightning_tina.checker.letter import extract_letter_strict, extract_letter_tina
from lightning_tina.checker.mv_compat import legacy_052, old_percentages

TINA_PRECISION = 5  # lighteval metric precision in Tina's task file: floats are rounded to 5 decimals
MAX_EXTRACTED_CHARS = 1000  # Verdict.extracted is cut to this length (it is for logs, not for comparison)
MAX_STRICT_ANSWER_CHARS = 20_000  # strict mode compares longer "answers" as strings, without parsing
MAX_STRICT_BRACE_DEPTH = 64  # deeper nesting is not an answer; the LaTeX parser would take seconds on it
STRICT_REL_TOL = 1e-4  # strict mode: plain numbers must also agree to this relative tolerance
_PLAIN_EXPR_RE = re.compile(r"[\d\s.+\-*/^()]+")

# lighteval's extraction settings in Tina's metrics; math-verify's SIGALRM timeout off (the pool enforces time)
_TINA_PARSE: dict[str, Any] = dict(
    fallback_mode="first_match", extraction_mode="any_match", parsing_timeout=None
)

# (correct, extracted, status) with status in "ok" | "no_answer" | "gold_unparsed" | "error"
GradeResult = tuple[bool, str | None, str]

GRADERS: tuple[str, ...] = ("strict", "lighteval", "tina_accuracy", "tina_length")
"""How a completion is graded. "strict" and "lighteval" are ``strict=True`` / ``strict=False``; the two "tina_*"
graders are the math-verify calls of Tina's training rewards (tina/post_train_hf/rewards.py):
"tina_accuracy" is ``accuracy_reward``'s, "tina_length" the one that ``len_reward``, the two L1 rewards and the
cosine reward share. They ignore the gold ``mode`` (Tina's rewards parse every gold the same way)."""


@lru_cache(maxsize=1)
def _mv() -> Any:
    """Import math-verify lazily and once (the parent process need not load sympy)."""
    import latex2sympy2_extended.latex2sympy2 as l2s
    import math_verify
    import math_verify.grader

    for name in ("math_verify", "latex2sympy2_extended"):
        # We run math-verify with its SIGALRM timeouts disabled (they fail off the main thread); it warns
        # about that on every import. The pool enforces the time limit instead.
        logging.getLogger(name).setLevel(logging.ERROR)
    return math_verify, l2s, math_verify.grader


@lru_cache(maxsize=1)
def _tina_targets() -> dict[str, tuple[list[Any], list[Any]]]:
    """(gold targets, prediction targets) per mode, as lighteval 0.8 built them for Tina's metrics."""
    mv, l2s, _ = _mv()
    norm = l2s.NormalizationConfig(  # lighteval 0.8's default LaTeX normalization (math-verify 0.9 differs)
        basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all", equations=True
    )
    # lighteval orders targets LaTeX before expression; within one priority the earlier target wins ties.
    pred = [
        mv.LatexExtractionConfig(boxed_match_priority=0, normalization_config=norm),
        mv.ExprExtractionConfig(),
    ]
    latex_gold = [mv.LatexExtractionConfig(boxed_match_priority=55, normalization_config=norm)]
    return {"latex": (latex_gold, pred), "expr": ([mv.ExprExtractionConfig()], pred)}


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_EXTRACTED_CHARS:
        return text
    return text[:MAX_EXTRACTED_CHARS] + "…"


@lru_cache(maxsize=256)
def _tina_gold(gold: str, mode: str) -> tuple[Any, ...]:
    mv, _, _ = _mv()
    return tuple(mv.parse(gold, _tina_targets()[mode][0], **_TINA_PARSE))


def _grade_tina_math(completion: str, gold: str, mode: str) -> GradeResult:
    mv, _, _ = _mv()
    golds = _tina_gold(gold, mode)
    preds = mv.parse(completion, _tina_targets()[mode][1], **_TINA_PARSE)
    correct = bool(
        mv.verify(list(golds) or [gold], preds, float_rounding=TINA_PRECISION, timeout_seconds=None)
    )
    extracted = next((p for p in preds if isinstance(p, str)), None)
    if extracted is None and preds:
        extracted = str(preds[0])
    status = "gold_unparsed" if not golds else ("no_answer" if not preds else "ok")
    return correct, _clip(extracted), status


# ---- Tina's training rewards (math-verify 0.5.2 / latex2sympy2_extended 1.0.6 semantics) ------------------------


@lru_cache(maxsize=1)
def _tina_reward_targets() -> dict[str, tuple[list[Any], list[Any]]]:
    """(gold targets, completion targets) of each Tina reward grader, with 0.5.2's defaults written out.

    Tina relied on math-verify 0.5.2 defaults in two places: ``parse(sol)`` without targets (LaTeX then
    expression) and ``LatexExtractionConfig()`` for the gold of the length and cosine rewards. 0.5.2's default
    LaTeX normalization has ``equations=True`` (an answer ``a = b = c`` is cut to ``c``); newer versions changed
    that default to False, so it is pinned here. The completion targets are Tina's own, word for word, including
    ``boxed=True`` for the length/cosine rewards: not one of "all"/"last"/"none", so the normalizer leaves a box
    that the extraction regex caught inside ``$...$`` unopened. The LaTeX parser reads a lone ``\\boxed{5}`` as
    5, but ``$\\boxed{5} = \\boxed{5}$`` or ``$\\boxed{2, 3, \\text{ and } 4}$`` then count as wrong.
    """
    mv, l2s, _ = _mv()
    old_default = l2s.NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all", equations=True
    )

    def completion(boxed: Any) -> list[Any]:
        norm = l2s.NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed=boxed, units=True
        )
        return [
            mv.LatexExtractionConfig(
                normalization_config=norm, boxed_match_priority=0, try_extract_without_anchor=False
            )
        ]

    gold_latex = [mv.LatexExtractionConfig(normalization_config=old_default)]
    return {
        "tina_accuracy": ([*gold_latex, mv.ExprExtractionConfig()], completion("all")),
        "tina_length": (gold_latex, completion(True)),
    }


def _tina_parse(text: str, targets: list[Any]) -> list[Any]:
    """``parse(text, targets, extraction_mode="first_match")`` with math-verify 0.5.2's behaviour (mv_compat)."""
    mv, _, _ = _mv()
    with legacy_052():
        found = mv.parse(
            text, targets, fallback_mode="first_match", extraction_mode="first_match", parsing_timeout=None
        )
    return old_percentages(found)


@lru_cache(maxsize=256)
def _tina_reward_gold(gold: str, grader: str) -> tuple[Any, ...]:
    return tuple(_tina_parse(gold, _tina_reward_targets()[grader][0]))


def _grade_tina_reward(completion: str, gold: str, grader: str) -> GradeResult:
    """One of Tina's reward-function gradings: "gold_unparsed" when Tina's gold parse found nothing.

    The accuracy reward calls ``verify(gold, answer)``, the others ``verify(answer, gold)``; math-verify's
    comparison is not symmetric (assignments, equations), so the order is kept. 0.5.2's ``precision=6`` is
    ``float_rounding=6`` now; its timeouts are off here (the pool enforces the time limit).
    """
    mv, _, _ = _mv()
    golds = list(_tina_reward_gold(gold, grader))
    if not golds:
        return False, None, "gold_unparsed"
    preds = _tina_parse(completion, _tina_reward_targets()[grader][1])
    first, second = (golds, preds) if grader == "tina_accuracy" else (preds, golds)
    with legacy_052():
        correct = bool(mv.verify(first, second, float_rounding=6, timeout_seconds=None))
    extracted = next((p for p in preds if isinstance(p, str)), None)
    if extracted is None and preds:
        extracted = str(preds[0])
    return correct, _clip(extracted), "ok" if preds else "no_answer"


def _brace_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}":
            depth = max(0, depth - 1)
    return deepest


@lru_cache(maxsize=256)
def parse_answer(answer: str) -> tuple[Any, ...]:
    """Parse one final-answer string (no surrounding prose) to sympy; () when it is not math.

    LaTeX first (after ``normalize_answer``), then the last equation of a chain ``a = b = c``, then a plain
    ASCII expression such as ``-1./3`` or ``10/13``.
    """
    mv, l2s, grader = _mv()
    if len(answer) > MAX_STRICT_ANSWER_CHARS or _brace_depth(answer) > MAX_STRICT_BRACE_DEPTH:
        return ()
    text = normalize_answer(answer)
    norm = l2s.NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all", equations=False
    )
    latex = l2s.normalize_latex(text, norm)
    tries = [latex]
    last_eq = mv.parser.get_last_eq(latex)
    if last_eq != latex:
        tries.append(last_eq)
    for candidate in tries:
        try:
            complex_ = grader.should_treat_as_complex(candidate)
            return (l2s.latex2sympy(candidate, is_real=not complex_, normalization_config=None),)
        except Exception:  # latex2sympy raises many kinds of errors on non-math text
            continue
    if _PLAIN_EXPR_RE.fullmatch(text):
        try:
            from sympy.parsing.sympy_parser import parse_expr

            return (parse_expr(text.replace("^", "**"), evaluate=False),)
        except Exception:  # not a valid expression after all
            pass
    return ()


def _same_scale(gold: Any, pred: Any) -> bool:
    """False when two plain numbers differ by more than STRICT_REL_TOL relative to the larger one.

    math-verify rounds floats to 5 decimals, so any two numbers below 5e-6 compare equal (a Minerva gold of
    2.88e-19 would accept 1.3e-27); this relative check closes that hole. Non-numbers pass through.
    """
    try:
        if not (getattr(gold, "is_number", False) and getattr(pred, "is_number", False)):
            return True
        a, b = complex(gold.evalf(30)), complex(pred.evalf(30))
    except Exception:  # not a finite number after all (sets, infinities, symbols hidden in functions)
        return True
    scale = max(abs(a), abs(b))
    return scale == 0 or abs(a - b) <= STRICT_REL_TOL * scale


def _strict_gold_answer(gold: str, mode: str) -> str:
    if mode == "latex":
        boxed = last_boxed(gold)
        if boxed is not None:
            return boxed
    return gold.strip()


def parse_gold(gold: str, mode: str, strict: bool = True) -> tuple[Any, ...]:
    """The gold answer as the checker reads it (sympy objects, or letters in "letter" mode); () if it does not parse.

    In-process and without a time limit: meant for dataset checks, not for untrusted text.
    """
    if mode == "letter":
        letter = gold.strip().upper() if strict else extract_letter_tina(gold)
        return (letter,) if letter and len(letter) == 1 and letter.isalpha() else ()
    if strict:
        return parse_answer(_strict_gold_answer(gold, mode))
    return _tina_gold(gold, mode)


def _grade_strict_math(completion: str, gold: str, mode: str) -> GradeResult:
    mv, _, _ = _mv()
    gold_answer = _strict_gold_answer(gold, mode)
    golds = parse_answer(gold_answer)
    pred_answer = find_final_answer(completion)
    if pred_answer is None:
        return False, None, "no_answer" if golds else "gold_unparsed"
    preds = parse_answer(pred_answer)
    correct = False
    if golds and preds:
        correct = bool(
            mv.verify(list(golds), list(preds), float_rounding=TINA_PRECISION, timeout_seconds=None)
        )
        correct = correct and _same_scale(golds[0], preds[0])
    if not correct and not (golds and preds):
        # One side is not math (a word, a name): compare spacing-insensitive strings.
        key = loose_string_key(normalize_answer(gold_answer))
        correct = bool(key) and key == loose_string_key(normalize_answer(pred_answer))
    return correct, _clip(pred_answer), "ok" if golds else "gold_unparsed"


def _grade_letter(completion: str, gold: str, strict: bool, letters: str) -> GradeResult:
    if strict:
        gold_letter = gold.strip().upper()
        if len(gold_letter) != 1 or gold_letter not in letters:
            return False, None, "gold_unparsed"
        pred = extract_letter_strict(completion, letters)
    else:
        gold_letter = extract_letter_tina(gold, letters) or ""
        pred = extract_letter_tina(completion, letters)
        if not gold_letter:
            return bool(pred) and pred == gold.strip(), pred, "gold_unparsed"
    if pred is None:
        return False, None, "no_answer"
    return pred == gold_letter, pred, "ok"


def grade(completion: str, gold: str, mode: str, strict: bool | str, letters: str = "ABCD") -> GradeResult:
    """Grade one completion against one gold answer, without a time limit.

    ``strict``: True/False (= "strict"/"lighteval") or one of ``GRADERS``. Returns ``(correct, extracted,
    status)``; status is "ok", "no_answer" (nothing extracted from the completion), "gold_unparsed" (the gold is
    not math: scored by string equality, or letter mismatch; for the Tina reward graders: Tina's gold parse found
    nothing) or "error" (an unexpected exception, scored wrong).
    """
    grader = strict if isinstance(strict, str) else ("strict" if strict else "lighteval")
    if grader not in GRADERS:
        raise ValueError(f"grader={grader!r} is not one of {list(GRADERS)}")
    try:
        if grader.startswith("tina_"):
            return _grade_tina_reward(completion, gold, grader)
        if mode == "letter":
            return _grade_letter(completion, gold, grader == "strict", letters)
        if grader == "strict":
            return _grade_strict_math(completion, gold, mode)
        return _grade_tina_math(completion, gold, mode)
    except RecursionError:
        return False, None, "error"
    except Exception:  # math-verify catches most of its own errors; anything left is a checker bug or OOM
        logging.getLogger(__name__).debug("grading failed", exc_info=True)
        return False, None, "error"
