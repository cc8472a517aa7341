"""The VM credential file: who this VM is, its key, and where its mailbox is.

The administrator provisions a VM with ``slicefab vm add VM`` and hands it the file that
command writes (mode 0600, docs/security.md "Key handling")::

    # Slicefab VM credential: keep secret. Anyone holding it can act as this VM.
    vm = "vm-a"
    key = "<64 hex digits: the 32-byte HMAC key>"
    mailbox = "/dev/shm/slicefab-vm-a.mbox"

``mailbox`` is the firmware's file on the host. Inside a QEMU guest that path does not
exist; discovery (:mod:`hostlib.discovery`) finds the PCI device instead and uses the path
only as the fallback.

Where the file is looked for when no path is given: ``$SLICEFAB_CREDENTIALS``, else
:data:`DEFAULT_PATH`.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from abi.envelope import KEY_BYTES
from abi.vendor import OWNER_BYTES
from hostlib.errors import CredentialError

ENV_VAR = "SLICEFAB_CREDENTIALS"
DEFAULT_PATH = Path("/etc/slicefab/credential.toml")

# the firmware's VM id rule (firmware.slices.OWNER_RE), restated: hostlib never imports it
_VM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX_RE = re.compile(r"[0-9A-Fa-f]*")


@dataclass(frozen=True)
class Credential:
    """One VM's credential. ``key`` never appears in ``repr()`` (it ends up in logs)."""

    vm: str
    key: bytes = field(repr=False)
    mailbox: str
    #: the file it was read from, if any
    path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise CredentialError(
                f"key: expected {KEY_BYTES} bytes, got {len(self.key)}",
                details={"field": "key"},
            )
        if not _VM_RE.fullmatch(self.vm) or len(self.vm.encode()) > OWNER_BYTES:
            raise CredentialError(
                f"vm: {self.vm!r} is not a VM id (1-64 of A-Z a-z 0-9 _ . -, "
                "not starting with a symbol)",
                details={"field": "vm"},
            )


def default_credential_path() -> Path:
    """``$SLICEFAB_CREDENTIALS`` if set (and not empty), else :data:`DEFAULT_PATH`."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def _fail(path: Path, fld: str, message: str) -> CredentialError:
    return CredentialError(
        f"{path}: {fld + ': ' if fld else ''}{message}",
        details={"field": fld, "path": str(path)} if fld else {"path": str(path)},
    )


def load_credential(path: str | os.PathLike[str] | None = None) -> Credential:
    """Read a credential file (``path``, or :func:`default_credential_path`).

    Raises:
        CredentialError: the file cannot be read or is not TOML (``field`` empty), or
            ``vm``, ``key`` (64 hex digits) or ``mailbox`` is missing or malformed
            (``field`` names it; the message never contains the key).
    """
    p = Path(path) if path is not None else default_credential_path()
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        hint = "" if path is not None else f" (set ${ENV_VAR} or ask the administrator)"
        raise _fail(p, "", f"no credential file{hint}") from None
    except OSError as e:
        raise _fail(p, "", f"cannot read credential file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise _fail(p, "", f"not a TOML file: {e}") from None
    values: dict[str, str] = {}
    for fld in ("vm", "key", "mailbox"):
        value = data.get(fld)
        if value is None:
            raise _fail(p, fld, "missing")
        if not isinstance(value, str) or not value:
            raise _fail(p, fld, f"expected a non-empty string, got {type(value).__name__}")
        values[fld] = value
    key_hex = values["key"]
    # say what is wrong without echoing the secret
    if len(key_hex) != 2 * KEY_BYTES:
        raise _fail(p, "key", f"expected {2 * KEY_BYTES} hex digits, got {len(key_hex)} characters")
    if not _HEX_RE.fullmatch(key_hex):
        raise _fail(p, "key", "expected hex digits only (0-9, a-f)")
    try:
        return Credential(values["vm"], bytes.fromhex(key_hex), values["mailbox"], p)
    except CredentialError as e:
        raise _fail(p, e.field, e.message.split(": ", 1)[-1]) from None


__all__ = ["DEFAULT_PATH", "ENV_VAR", "Credential", "default_credential_path", "load_credential"]
