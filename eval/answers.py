"""Numeric answer extraction for generation benchmarks (MGSM-style).

The rule, in full (``extract_number``):

1. Scan the text for numbers: an optional minus sign (``-`` or ``−``) that is not glued to a
   preceding Latin letter, digit, dot or bracket (so ``3-5`` reads as 3 and 5, not 3 and -5,
   while ``答案是-5`` keeps its sign); then either digits grouped in threes by a thousands
   separator (``,``, no-break space or narrow no-break space: ``1,234,567``, ``1 234``) or a
   plain run of digits; then an optional decimal part ``.digits``. A bare ``.5`` reads as 0.5. Any Unicode decimal digits count (``４２`` = 42).
2. Take the **last** number in the text: chain-of-thought answers state the result at the end
   ("... so she has 12 apples. The answer is 42." gives 42), and a trailing unit, currency
   sign or period is never part of the number (``$18.``, ``10%``, ``5 km``).
3. Separators are removed and the number is returned as a float; no number gives ``None``.

Not handled, on purpose: a decimal comma (``3,5`` reads as 3 and 5, so 5), plain spaces as
thousands separators (``1 234`` with an ordinary space reads as 234), words for numbers and
scientific notation. MGSM's gold answers are integers written without decimals, so a model
that states its answer plainly at the end is always read correctly.
"""

from __future__ import annotations

import math
import re

_GROUP = "[,\u00a0\u202f]"
_NUMBER = re.compile(
    r"(?P<sign>(?<![0-9A-Za-z.)])[-\u2212])?"  # a sign unless glued to a Latin word or number
    rf"(?:(?P<int>\d{{1,3}}(?:{_GROUP}\d{{3}})+(?!\d)|\d+)(?P<frac>\.\d+)?"
    r"|(?P<bare>\.\d+))"
)


def extract_number(text: str) -> float | None:
    """The last number in ``text`` by the rule in the module docstring, or None."""
    last: float | None = None
    for match in _NUMBER.finditer(text):
        whole, frac = match.group("int"), match.group("frac") or match.group("bare")
        digits = re.sub(_GROUP, "", whole or "0") + (frac or "")
        try:
            value = float(digits)
        except ValueError:  # pragma: no cover - \d only matches what float() reads
            continue
        last = -value if match.group("sign") else value
    return last


def parse_gold(value: object) -> float:
    """A benchmark's gold answer (number or numeric string, separators allowed) as a float."""
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and value.strip():
        found = extract_number(value)
        cleaned = re.sub(_GROUP, "", value.strip()).replace("\u2212", "-")
        try:
            number = float(cleaned)
        except ValueError:
            raise ValueError(f"not a number: {value!r}") from None
        if found is None or found != number:
            raise ValueError(f"not a number: {value!r}")
    else:
        raise ValueError(f"not a number: {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def numbers_match(predicted: float | None, gold: float, rel_tol: float = 1e-6) -> bool:
    """Exact numeric match up to float noise (``18`` and ``18.0`` match; None never does)."""
    if predicted is None:
        return False
    return math.isclose(predicted, gold, rel_tol=rel_tol, abs_tol=1e-9)
