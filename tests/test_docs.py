"""Every ```python block of README.md and docs/*.md runs as written.

Blocks are found automatically (also indented ones inside list items). The blocks of one page
run in order in one namespace, as a reader runs them, in a temporary working directory; a
failing block is reported with its page and line. Code that cannot run offline belongs in a
```text or ```bash block.
"""

from __future__ import annotations

import re
import textwrap
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPEN = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The (first code line number, dedented source) of each ```python block of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        close = re.compile(rf"^{re.escape(match['indent'])}```[ \t]*$")
        start = i + 1
        end = start
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.name}:{i + 1}: ```python block is never closed")
        blocks.append((start + 1, textwrap.dedent("\n".join(lines[start:end]))))
        i = end + 1
    return blocks


def test_blocks_are_found():
    readme = python_blocks(ROOT / "README.md")
    assert len(readme) >= 4  # the set-up and the three quick starts


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[p.name for p in PAGES_WITH_CODE])
def test_python_blocks_run(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, source in python_blocks(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        # line numbers in tracebacks point into the page
        code = compile("\n" * (line - 1) + source, str(page), "exec")
        try:
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
        except Exception:
            pytest.fail(f"the ```python block at {where} failed:\n{traceback.format_exc()}")
