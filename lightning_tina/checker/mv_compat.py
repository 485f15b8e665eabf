"""math-verify 0.5.2 / latex2sympy2_extended 1.0.6 behaviour under the newer versions this project installs.

Tina trained with math-verify 0.5.2 and latex2sympy2_extended 1.0.6; the project pins newer ones (the evaluation
and strict grading want their fixes). For the "tina_*" graders (``grade.py``) the differences in the code paths
Tina's reward functions use are undone here, so that they give the values Tina trained on. The parity harness
(parity/rewards_parity.py) measures what is left. Differences handled (old behaviour restored):

* normalization table: "and"/"or" (also ``\\text{and}``) became "," instead of ";"; "percent" turned into a
  literal ``\\\\%`` (two backslashes, as 1.0.6's replacement string was not a template) and "percentage"/"pct"
  were left alone;
* unit words: 1.0.6's unit regex began with a look-ahead for whitespace followed by the unit word itself, so it
  only ever removed the unit " m east" (with the character after it); 1.11 strips a trailing unit word;
* ``\\boxed`` extraction with "last" (the plain ``\\boxed{...}`` match): 1.0.6 took earlier boxes only when
  nothing but "and"/"or"/"," (and spaces) stood between them, and never dropped repeated boxes;
* a LaTeX answer that fails to parse: math-verify 0.9 retries with the part after the last "="; 0.5.2 did not;
* symbols: 1.11 lower-cases them (``AB`` = ``ab``) and parses a unary ``\\pm`` (``x = \\pm 2``); 1.0.6 did not;
* comparison: 0.9 rounds any expression against a float (``\\sqrt{2}`` = 1.41421356), compares symbols of two or
  more letters case-blind and printed forms as a last resort, and dropped the ``doit()`` of the first test;
* percentages: 1.11 builds ``x * UnevaluatedExpr(1/100)`` and math-verify 0.9 then counts "9%" equal to 9;
  0.5.2 built ``Mul(x, 1/100, evaluate=False)``, which compares as 0.09. Parsed answers are rebuilt that way.

Not undone (measured by the harness, rare in practice): 0.9's connector ", and" between two ``$...$`` answers,
its stricter thousands-separator number regex (gold expressions only), the other changes inside ``verify``
(equations and relations: chains, assignments, solving both sides; sets against relations), and parser changes
that need the LaTeX grammar (e.g. ``3 \\pm 1`` is {2, 4} in 1.0.6 and an unevaluated {3-1, 3+1} in 1.11).

The old behaviour is installed by swapping module attributes for the duration of one grading call
(``legacy_052()``); that is safe because checker workers are single-threaded processes (``pool.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

_OLD_SEPARATOR = re.compile(r"\s*(?:and|or|,)\s*")  # 1.0.6: the whole gap between two boxes must be this
# 1.0.6's unit regex could only match the unit " m east" (see the module docstring); group 1 stays empty so that
# 1.11's ``units_regex.sub(r"\1", text)`` removes the match and the character after it, as 1.0.6 did.
_OLD_UNITS_REGEX = re.compile(r"()(?=\s) m east(?:s|es)?(?:$|\W)")
_OLD_REPLACEMENTS = {  # name -> (pattern, replacement) for the entries of 1.11's table that 1.0.6 had otherwise
    "and_or": (r"(?<!\w)(?:and|or)(?!\w)", ";"),
    "and_or_text": (r"(\\text{\s*(?:and|or)\s*})", ";"),
    "percent": (r"\s*percent", "\\\\%"),
    "percent_in_text": (r"\\text{percent}", "\\\\%"),
}
_NEW_ONLY = {"percentage", "percentage_in_text", "pct", "pct_in_text"}  # 1.11 additions


@lru_cache(maxsize=1)
def _old_replace_table() -> tuple[re.Pattern[str], dict[str, str]]:
    """1.0.6's LaTeX replacement regex and replacement strings, derived from 1.11's table (same order)."""
    from latex2sympy2_extended import math_normalization as mn

    entries = []
    for name, pattern, replacement in mn.to_replace_patterns:
        if name in _NEW_ONLY:
            continue
        pattern, replacement = _OLD_REPLACEMENTS.get(name, (pattern, replacement))
        entries.append((name, pattern, replacement))
    missing = set(_OLD_REPLACEMENTS) - {name for name, _, _ in entries}
    if missing:  # a future latex2sympy2_extended renamed entries: fail loudly rather than grade differently
        raise RuntimeError(f"latex2sympy2_extended's replacement table has no entries {sorted(missing)}")
    regex = re.compile("|".join(f"(?P<{name}>{pattern})" for name, pattern, _ in entries))
    return regex, {name: replacement for name, _, replacement in entries}


def _matching_brace(text: str, open_pos: int, limit: int) -> int | None:
    """Index of the brace that closes ``text[open_pos]`` before ``limit``, or None."""
    depth = 0
    for i in range(open_pos, limit):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def boxed_contents_052(text: str, mode: str = "last") -> str:
    """The ``\\boxed``/``\\fbox`` contents of ``text`` joined by "," (right to left scan), as 1.0.6 found them.

    "all": every box. "last": the last box plus earlier ones separated from it only by "and"/"or"/",".
    An unclosed last box yields everything after its brace; no box at all leaves ``text`` unchanged.
    """
    found: list[str] = []
    limit = len(text)
    later_start: int | None = None
    while True:
        start = max(text.rfind("\\boxed", 0, limit), text.rfind("\\fbox", 0, limit))
        if start < 0:
            break
        brace = start + (6 if text.startswith("\\boxed", start) else 5)
        while brace < limit and text[brace].isspace():
            brace += 1
        if brace >= limit:
            break
        close = _matching_brace(text, brace, limit) if text[brace] == "{" else None
        if close is None:
            if not found:
                found.append(text[brace:])
            break
        if mode == "last" and later_start is not None:
            if not _OLD_SEPARATOR.fullmatch(text[close + 1 : later_start]):
                break
        found.append(text[brace + 1 : close].strip())
        later_start = limit = start
    return ",".join(reversed(found)) if found else text


# A leading "\pm" ("\pm 2", "x = \pm 2"), which latex2sympy2_extended 1.0.6 could not parse
_UNARY_PM = re.compile(r"(?:^|[=(\[{,;:])\s*\\pm(?![a-zA-Z])")


@lru_cache(maxsize=20)
def _parse_latex_once(latex: str) -> Any:
    """math-verify 0.5.2's LaTeX parse: one try (no retry with the last equation), case kept, no unary ``\\pm``.

    1.11 lower-cases every symbol by default (``AB`` became ``a*b``, ``\\text{East}`` ``east``) and reads a
    leading ``\\pm 2`` as the set {-2, 2}; 1.0.6 did neither (the latter failed, leaving a string).
    """
    from latex2sympy2_extended import latex2sympy2 as l2s
    from math_verify.grader import should_treat_as_complex

    if _UNARY_PM.search(latex):
        raise ValueError("latex2sympy2_extended 1.0.6 had no unary \\pm")
    kwargs: dict[str, Any] = {}
    if "lowercase_symbols" in getattr(l2s.ConversionConfig, "__dataclass_fields__", {}):
        kwargs["conversion_config"] = l2s.ConversionConfig(lowercase_symbols=False)
    return l2s.latex2sympy(
        latex,
        is_real=not should_treat_as_complex(latex),
        convert_degrees=False,
        normalization_config=None,
        **kwargs,
    )


def _doit(expr: Any) -> Any:
    """``expr.doit()``, or ``expr`` itself when that fails (sympy raises many kinds of errors)."""
    try:
        return expr.doit()
    except Exception:
        return expr


def _is_number_or_percent(expr: Any, kind: type) -> bool:
    """``expr`` is a ``kind`` (Number, Float) or 0.5.2's percentage ``Mul(x, 1/100)`` of one."""
    import sympy

    if isinstance(expr, kind):
        return True
    return (
        isinstance(expr, sympy.Mul)
        and len(expr.args) == 2
        and expr.args[1] == sympy.Rational(1, 100)
        and isinstance(expr.args[0], kind)
    )


def _numeric_eq_052(a: Any, b: Any, float_rounding: int, numeric_precision: int = 15) -> bool:
    """0.5.2's numeric comparison: rounding only when one side is a float and BOTH end up plain numbers.

    0.9 rounds any two expressions when one is a float (so ``\\sqrt{2}`` equals 1.41421356) and calls "9%" and 9
    equal; 0.5.2 did neither. ``numeric_precision`` is unused (0.5.2 evaluated with sympy's default 15 digits).
    """
    import sympy
    from sympy.matrices.expressions import MatrixExpr

    matrices = (sympy.MatrixBase, MatrixExpr)
    if isinstance(a, matrices) and isinstance(b, matrices):
        a, b = _doit(a), _doit(b)
        if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase) and a.shape == b.shape:
            return all(_numeric_eq_052(x, y, float_rounding) for x, y in zip(a.flat(), b.flat(), strict=True))
        return False
    if _is_number_or_percent(a, sympy.Number) or _is_number_or_percent(b, sympy.Number):
        if not (_is_number_or_percent(a, sympy.Float) or _is_number_or_percent(b, sympy.Float)):
            return bool(_doit(a) == _doit(b))
        a, b = _doit(a), _doit(b)
        return (
            isinstance(a, sympy.Number)
            and isinstance(b, sympy.Number)
            and a.round(float_rounding) == b.round(float_rounding)
        )
    try:
        return bool((a - b).evalf(chop=True) == 0)
    except Exception:
        return False


def _str_eq_052(a: Any, b: Any) -> bool:
    """0.5.2's cheap first test: equal after ``doit()``, or equal printed forms (0.9: plain ``a == b``)."""
    a, b = _doit(a), _doit(b)
    try:
        return bool(a == b) or str(a).strip() == str(b).strip()
    except Exception:
        return False


def _symbols_eq_052(gold: Any, pred: Any) -> bool:
    """0.5.2's symbol comparison: case matters and the fallback is ``==`` (0.9 lower-cases names of two or more
    letters and compares printed forms). The special cases both versions share (a symbol "e" against Euler's
    number, a symbol against a product of single letters) are left to the installed function."""
    import sympy

    shared = (isinstance(gold, sympy.Symbol) and (pred == sympy.E or isinstance(pred, sympy.Mul))) or (
        isinstance(pred, sympy.Symbol) and (gold == sympy.E or isinstance(gold, sympy.Mul))
    )
    if shared:
        return bool(_INSTALLED["sympy_compare_symbols"](gold, pred))
    return bool(gold == pred)


_INSTALLED: dict[str, Any] = {}  # the installed functions that a swapped one delegates to


@contextmanager
def legacy_052() -> Iterator[None]:
    """Run the block with the 1.0.6 normalization pieces and 0.5.2's parse and comparison pieces installed."""
    import math_verify.grader as mg
    import math_verify.parser as mp
    from latex2sympy2_extended import math_normalization as mn

    regex, replacements = _old_replace_table()
    if mg.sympy_compare_symbols is not _symbols_eq_052:  # not inside another legacy_052 block
        _INSTALLED["sympy_compare_symbols"] = mg.sympy_compare_symbols
    swaps = [
        (mn, "to_replace_regex", regex),
        (mn, "replacements", replacements),
        (mn, "units_regex", _OLD_UNITS_REGEX),
        (mn, "extract_boxed_content", boxed_contents_052),
        (mp, "parse_latex_cached", _parse_latex_once),
        (mg, "sympy_numeric_eq", _numeric_eq_052),
        (mg, "sympy_str_eq", _str_eq_052),
        (mg, "sympy_compare_symbols", _symbols_eq_052),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
        for module, name, value in swaps:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def old_percentages(items: list[Any]) -> list[Any]:
    """Parsed answers with 1.11's ``x * UnevaluatedExpr(1/100)`` rebuilt as 0.5.2's ``Mul(x, 1/100)``."""
    return [_old_pct(x) for x in items]


def _old_pct(expr: Any) -> Any:
    import sympy

    if not isinstance(expr, sympy.Basic) or not expr.has(sympy.UnevaluatedExpr):
        return expr
    hundredth = sympy.UnevaluatedExpr(sympy.Rational(1, 100))
    if isinstance(expr, sympy.Mul) and len(expr.args) == 2 and expr.args[1] == hundredth:
        return sympy.Mul(_old_pct(expr.args[0]), sympy.Rational(1, 100), evaluate=False)
    args = [_old_pct(a) for a in expr.args]
    try:
        return expr.func(*args, evaluate=False)
    except TypeError:  # a class without the evaluate flag (sets, tuples)
        return expr.func(*args)
