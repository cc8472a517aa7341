"""The credential file: what the firmware writes, hostlib reads; every bad field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware.vms import VmCredential, write_credential_file
from hostlib.credentials import (
    DEFAULT_PATH,
    Credential,
    default_credential_path,
    load_credential,
)
from hostlib.errors import CredentialError, SlicefabError

KEY = bytes(range(32))
GOOD = {"vm": '"vm-a"', "key": f'"{KEY.hex()}"', "mailbox": '"/dev/shm/slicefab-vm-a.mbox"'}


def write(tmp_path: Path, **fields: str | None) -> Path:
    values = {**GOOD, **fields}
    path = tmp_path / "credential.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in values.items() if v is not None))
    return path


def test_reads_the_file_the_firmware_writes(tmp_path: Path) -> None:
    path = tmp_path / "vm-a.toml"
    write_credential_file(path, VmCredential("vm-a", KEY, "/dev/shm/slicefab-vm-a.mbox"))
    cred = load_credential(path)
    assert cred == Credential("vm-a", KEY, "/dev/shm/slicefab-vm-a.mbox", path)


def test_the_key_never_shows_in_repr(tmp_path: Path) -> None:
    cred = load_credential(write(tmp_path))
    assert "key=" not in repr(cred) and repr(KEY)[2:20] not in repr(cred)
    assert "vm='vm-a'" in repr(cred)


def test_the_default_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SLICEFAB_CREDENTIALS", raising=False)
    assert default_credential_path() == DEFAULT_PATH == Path("/etc/slicefab/credential.toml")
    path = write(tmp_path)
    monkeypatch.setenv("SLICEFAB_CREDENTIALS", str(path))
    assert default_credential_path() == path
    assert load_credential().vm == "vm-a"


def test_a_missing_file_names_the_path_and_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SLICEFAB_CREDENTIALS", str(tmp_path / "nope.toml"))
    with pytest.raises(CredentialError) as e:
        load_credential()
    assert "nope.toml" in e.value.message and "SLICEFAB_CREDENTIALS" in e.value.message
    assert e.value.field == "" and isinstance(e.value, SlicefabError)


def test_a_file_that_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("vm = \n")
    with pytest.raises(CredentialError, match="not a TOML file"):
        load_credential(path)


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"vm": None}, "vm", "missing"),
        ({"key": None}, "key", "missing"),
        ({"mailbox": None}, "mailbox", "missing"),
        ({"vm": "3"}, "vm", "non-empty string"),
        ({"mailbox": '""'}, "mailbox", "non-empty string"),
        ({"vm": '"-dash"'}, "vm", "not a VM id"),
        ({"vm": '"' + "a" * 65 + '"'}, "vm", "not a VM id"),
        ({"key": '"abcd"'}, "key", "64 hex digits, got 4"),
        ({"key": '"' + "zz" * 32 + '"'}, "key", "hex digits only"),
        ({"key": "7"}, "key", "non-empty string"),
    ],
)
def test_each_bad_field_is_named(
    tmp_path: Path, fields: dict[str, str | None], field: str, words: str
) -> None:
    with pytest.raises(CredentialError) as e:
        load_credential(write(tmp_path, **fields))
    assert e.value.field == field
    assert words in e.value.message
    assert str(tmp_path) in e.value.message
    assert "zz" * 32 not in str(e.value)  # a secret-looking value is never echoed


def test_a_credential_built_in_code_is_checked_too() -> None:
    with pytest.raises(CredentialError) as e:
        Credential("vm-a", b"short", "/x")
    assert e.value.field == "key"
