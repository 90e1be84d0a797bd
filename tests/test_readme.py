"""The README's Python snippets run as written (each on its own, on the shipped organisms, CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import organisms

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_opens_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert first is not None
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert len(SNIPPETS) >= 2


@organisms
@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets write under runs/
    exec(compile(code, f"{README}:snippet", "exec"), {"__name__": "readme"})
