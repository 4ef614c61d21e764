"""What error messages echo: a user's value cut to a readable length, the names close to a misspelt one."""
from __future__ import annotations

import difflib
import reprlib
from typing import Any, Iterable

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` with long strings, deep nesting and long containers elided (``...``)."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def close_matches(word: str, candidates: Iterable[str]) -> str:
    """``'; close matches: a, b'`` for the candidates that look like ``word`` (or ``''``)."""
    if len(word) > 200:  # no name is that long; comparing it would only cost time
        return ""
    matches = difflib.get_close_matches(word, sorted(set(candidates)), n=3, cutoff=0.5)
    return f"; close matches: {', '.join(matches)}" if matches else ""
