"""docs/abi/commands.md is generated from the opcode table and must not be stale."""

from __future__ import annotations

from pathlib import Path

import pytest

from abi import gen_docs
from abi.commands import COMMANDS


def test_generated_reference_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    rc = gen_docs.main(["--check"])
    assert rc == 0, capsys.readouterr().out + "\nrun: .venv/bin/python -m abi.gen_docs"


def test_check_fails_with_a_diff_when_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "commands.md"
    stale.write_text(gen_docs.render().replace("ALLOCATE", "ALLOCATE_OLD", 1))
    assert gen_docs.main(["--check", "--output", str(stale)]) == 1
    diff = capsys.readouterr().out
    assert "-" in diff and "ALLOCATE_OLD" in diff
    assert gen_docs.main(["--output", str(stale)]) == 0  # regenerates
    assert gen_docs.main(["--check", "--output", str(stale)]) == 0


def test_every_command_and_field_is_documented() -> None:
    text = gen_docs.render()
    for cmd in COMMANDS.values():
        assert f"### {cmd.opcode:04X}h {cmd.name}" in text
        assert cmd.doc in text
        for layout in (cmd.request, cmd.response):
            for field in layout.fields:
                assert f"`{field.name}`" in text, (cmd.name, field.name)
