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


def _commands() -> list[str]:
    """Every ``reasonscope ...`` command line of the README's bash blocks (continuations joined, comments cut)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("reasonscope "):
                out.append(line)
    return out


def test_readme_commands_name_real_options():
    """Each README command resolves to a real command, and every ``--option`` it passes exists there."""
    import typer

    from reasonscope.cli import app

    commands = _commands()
    assert len(commands) >= 20
    for line in commands:
        words = line.split()[1:]
        cmd = typer.main.get_command(app)
        while words and not words[0].startswith("-") and hasattr(cmd, "commands"):
            assert words[0] in cmd.commands, f"README: {line!r}: no command {words[0]!r}"
            cmd = cmd.commands[words.pop(0)]
        names = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for w in words:
            flag = w.split("=")[0]
            if flag.startswith("--"):
                assert flag in names, f"README: {line!r}: {flag} is not an option of this command"
