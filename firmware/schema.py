"""Strict reading of TOML tables (device and slice files).

tomllib gives plain dicts; :class:`Table` reads them field by field so that every error
names the full dotted path of the field (``crossbar.port_bandwidth``), the limit it broke
and what was expected, and so that a misspelt key is an error rather than silently ignored.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from firmware.errors import ConfigError, RequestError

T = TypeVar("T")
_MISSING: Any = object()


def load_toml(path: Path | str, what: str) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error becomes a :class:`ConfigError`."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {p}", file=str(p)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}", file=str(p)) from None


class Table:
    """One TOML table being read. Call :meth:`done` to reject keys nobody asked for."""

    def __init__(self, data: object, path: str, *, request: bool = False) -> None:
        self.path = path
        #: a file is reported with ConfigError, an API request with RequestError
        self.request = request
        if not isinstance(data, dict):
            raise self.error("", f"expected a table, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self._seen: set[str] = set()

    def field(self, key: str) -> str:
        if not key:
            return self.path or "(top level)"
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str, **details: Any) -> ConfigError | RequestError:
        field = self.field(key)
        if self.request:
            return RequestError(field, message, **details)
        return ConfigError(f"{field}: {message}", field=field, **details)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, "missing (required)")
            return default
        return self.data[key]

    def integer(self, key: str, *, lo: int, hi: int, default: Any = _MISSING) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}", got=value)
        if not lo <= value <= hi:
            raise self.error(
                key, f"{value} is out of range [{lo}, {hi}]", got=value, limit=[lo, hi]
            )
        return value

    def text(self, key: str, default: Any = _MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty string, got {value!r}", got=value)
        return value

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}", got=value)
        return value

    def quantity(
        self, key: str, parse: Callable[[str, object], int], default: Any = _MISSING
    ) -> int:
        """A size or bandwidth (``"4 GiB"``, ``"25 Gbit/s"``) via ``parse``."""
        value = self.raw(key, default)
        try:
            return parse(self.field(key), value)
        except RequestError as e:
            if self.request:
                raise
            raise ConfigError(e.message, **e.details) from None

    def table(self, key: str, default: Any = _MISSING) -> Table:
        return Table(self.raw(key, default), self.field(key), request=self.request)

    def tables(self, key: str) -> list[Table]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            raise self.error(key, "expected an array of tables ([[...]])")
        return [
            Table(v, f"{self.field(key)}[{i}]", request=self.request) for i, v in enumerate(value)
        ]

    def done(self) -> None:
        """Reject keys that were never read: a typo must not be silently ignored."""
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise self.error(
                unknown[0],
                f"unknown key (known here: {', '.join(sorted(self._seen)) or 'none'})",
                unknown=unknown,
            )
