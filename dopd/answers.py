"""Final-answer extraction and equivalence for real-data tasks (JSONL, CHAMP), on top of math-verify.

math-verify bounds its sympy work with SIGALRM, which only works in the main thread: elsewhere (a dataloader or
evaluation thread) `signal.signal` raises ValueError and every answer would silently count as wrong. So the
timeout is used in the main thread only; in other threads it is off and inputs are length-capped instead.
"""

from __future__ import annotations

import functools
import logging
import re
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException

MAX_ANSWER_CHARS = 500  # longer "answers" are runaway generations; never hand them to sympy
TIMEOUT_S = 5
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_WORDS = {"yes", "no", "true", "false"}


class _DropTimeoutNotice(logging.Filter):
    """math-verify warns that its timeout is off; here that is deliberate (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


logging.getLogger("math_verify.utils").addFilter(_DropTimeoutNotice())


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none or it is unclosed."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_boxed_or_last(response: str) -> str | None:
    """The last \\boxed{} answer; failing that, the last number in the response (models that forget the box)."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(response)
    return numbers[-1].replace(",", "") if numbers else None


def _normalise(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _parse(s: str, timeout):
    return parse(s if "$" in s or "\\boxed" in s else f"${s}$", parsing_timeout=timeout)


@functools.lru_cache(maxsize=4096)
def _parse_gold(s: str, timeout):
    """Gold answers recur at every evaluation: parse each once (verify does not mutate the result)."""
    return tuple(_parse(s, timeout))


def math_equal(pred: str | None, gold: str) -> bool:
    """Whether `pred` states the same answer as `gold`: identical text, the same yes/no word, or equal for
    math-verify (numbers, fractions, expressions, sets, intervals, equations). Never raises."""
    if pred is None or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return False
    p, g = _normalise(pred), _normalise(gold)
    if p == g:
        return True
    if g in _WORDS:  # math-verify would read "yes" as the product y*e*s
        return re.split(r"[^a-z]", p, maxsplit=1)[0] == g
    timeout = TIMEOUT_S if _in_main_thread() else None
    try:
        gold_parsed, pred_parsed = list(_parse_gold(gold, timeout)), _parse(pred, timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # sympy failing or timing out (a BaseException) on odd input: not equal
        return False


def gold_parses(gold: str) -> bool:
    """Whether math-verify reads `gold` as math (a number, expression, set, interval, equation) or it is a yes/no
    word. If not, math-verify hands back only the text, and only a response with that exact text could score it."""
    g = gold.strip()
    if _normalise(g) in _WORDS or _NUMBER.fullmatch(g):
        return True
    try:
        parsed = _parse_gold(g, TIMEOUT_S if _in_main_thread() else None)  # also warms the cache math_equal uses
    except (Exception, TimeoutException):
        return False
    return any(not isinstance(x, str) for x in parsed)


def is_correct(response: str, golds: str | list[str] | tuple[str, ...]) -> bool:
    """Extract the response's final answer and compare it with any of the accepted gold forms."""
    pred = extract_boxed_or_last(response)
    return any(math_equal(pred, g) for g in ([golds] if isinstance(golds, str) else golds))
