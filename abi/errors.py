"""The ABI's exception tree.

::

    AbiError                  root: everything abi/ raises on purpose
     ├── DecodeError          bytes that are not a valid message or payload
     │    └── UnknownOpcode   a well-formed header naming an opcode the table lacks
     └── EncodeError          a value that cannot be put on the wire

Both carry the *field* (a dotted path such as ``header.payload_length`` or
``request.cores.ids``), and, where they are known, the byte *offset* at which the field
starts, the *limit* that was exceeded and what was *expected* — so the firmware can answer
with a precise error and a fuzzer can tell which check fired. A decoder in ``abi`` raises
nothing but :class:`DecodeError` for bad input; an encoder nothing but :class:`EncodeError`.
"""

from __future__ import annotations


class AbiError(Exception):
    """Root of every error the ABI layer raises on purpose."""

    def __init__(
        self,
        field: str,
        message: str,
        *,
        offset: int | None = None,
        limit: int | None = None,
        expected: str | None = None,
    ) -> None:
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{field}{where}: {message}")
        self.field = field
        self.message = message
        self.offset = offset
        self.limit = limit
        self.expected = expected

    def details(self) -> dict[str, object]:
        """The known details as a JSON-able dict (``field`` always, the rest when known)."""
        d: dict[str, object] = {"field": self.field}
        for key in ("offset", "limit", "expected"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        return d


class DecodeError(AbiError):
    """Bytes that are not a valid CCI message or payload (truncated, oversize, a length
    that disagrees with the data, a reserved bit set, an unknown enumeration value)."""


class UnknownOpcode(DecodeError):
    """A well-formed header whose opcode is not in :data:`abi.commands.COMMANDS`
    (answered *Unsupported*, CXL r3.1 §8.2.8.4.5.1)."""


class EncodeError(AbiError):
    """A value that cannot be encoded: a missing or unknown field, an integer out of its
    field's range, a string or list longer than its limit, a payload over the cap."""


__all__ = ["AbiError", "DecodeError", "EncodeError", "UnknownOpcode"]
