"""``short_repr``: the repr of a user's value, cut to a readable length for error messages."""
from __future__ import annotations

import reprlib
from typing import Any

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` with long strings, deep nesting and long containers elided (``...``)."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
