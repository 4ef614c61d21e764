"""Every ```python block of README.md runs as pasted: each in a fresh interpreter, in an empty
temporary folder, and must exit 0.

Exceptions, kept to the minimum (each is listed here with its reason, matched by the section
heading above the block):
  * SLOW: blocks that take minutes run in the slow tier (``pytest -m slow``).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SLOW = {
    "Low-bit post-training quantization": "block reconstruction trains every unit (minutes on 2 cores)",
    "Sensitivity analysis": "quantizes every layer in turn and builds engines (tens of seconds)",
}
TIMEOUT_S = 900


def python_blocks(text: str) -> List[Tuple[str, str]]:
    """``(section heading, code)`` of every fenced python block, in order."""
    blocks, heading, fence, code = [], "(top)", None, []
    for line in text.splitlines():
        if fence is None and line.startswith("```"):
            fence, code = line[3:].strip(), []
        elif fence is not None and line.strip() == "```":
            if fence == "python":
                blocks.append((heading, "\n".join(code) + "\n"))
            fence = None
        elif fence is not None:
            code.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


def _params():
    params = []
    for n, (heading, code) in enumerate(python_blocks(README.read_text(encoding="utf-8"))):
        slow = next((reason for prefix, reason in SLOW.items() if heading.startswith(prefix)), None)
        marks = [pytest.mark.slow] if slow else []
        params.append(pytest.param(code, id=f"{n}-{re.sub(r'[^a-z0-9]+', '-', heading.lower()).strip('-')}",
                                   marks=marks))
    return params


def test_readme_has_python_blocks():
    headings = [h for h, _ in python_blocks(README.read_text(encoding="utf-8"))]
    assert "Quick start" in headings
    assert all(any(h.startswith(p) for h in headings) for p in SLOW), "a SLOW entry names no README section"


@pytest.mark.parametrize("code", _params())
def test_snippet_runs_as_pasted(code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, f"README snippet failed:\n{code}\n--- output ---\n" \
                                   f"{result.stdout[-2000:]}{result.stderr[-4000:]}"
