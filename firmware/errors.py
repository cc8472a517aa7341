"""The firmware's exception tree.

::

    SlicefabError                 root: everything the firmware raises on purpose
     ├── ConfigError              a device or slice file is malformed or out of limits
     ├── RequestError             a request field is invalid (type, range, alignment)
     ├── AllocationError          the request is valid but cannot be satisfied
     │    ├── InsufficientResources   not enough free units of one resource
     │    └── ResourceConflict        a named unit (core, lane, key, port) is held by another
     ├── NotFound                 no such slice (or not visible to the caller)
     ├── PermissionDenied         the caller does not own the slice
     ├── LifecycleError           an illegal slice state transition
     ├── IdempotencyConflict      a request id re-used with different parameters
     ├── LedgerError              the durable ledger failed or is inconsistent
     └── FabricError              the crossbar refused or failed a reconfiguration

Every error carries a short machine-readable ``code`` (stable, used on the wire and in
``--json`` output) and ``details``: the field, the limit and what was expected, so that a
caller can tell exactly what to change.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SlicefabError(Exception):
    """Root of every error the firmware raises on purpose."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        """The error as a JSON-able object: ``{"code", "message", "details"}``."""
        return {"code": self.code, "message": self.message, "details": self.details}


class ConfigError(SlicefabError):
    """A device inventory or slice file is malformed or violates a limit."""

    code = "config"


class RequestError(SlicefabError):
    """A request field has the wrong type, range or alignment."""

    code = "invalid"

    def __init__(self, field: str, message: str, **details: Any) -> None:
        super().__init__(f"{field}: {message}", field=field, **details)
        self.field = field


class AllocationError(SlicefabError):
    """A valid request that the device cannot satisfy right now."""

    code = "allocation"


class InsufficientResources(AllocationError):
    """Fewer free units of ``resource`` than requested."""

    code = "insufficient"

    def __init__(
        self,
        resource: str,
        requested: int,
        available: int,
        unit: str = "",
        explanation: str = "",
        **details: Any,
    ) -> None:
        suffix = f" {unit}" if unit else ""
        message = f"{resource}: requested {requested}{suffix}, only {available}{suffix} available"
        super().__init__(
            f"{message}: {explanation}" if explanation else message,
            resource=resource,
            requested=requested,
            available=available,
            unit=unit,
            **details,
        )


class ResourceConflict(AllocationError):
    """A specific unit (a core id, a lane group, a key, a port) is already held."""

    code = "conflict"


class NotFound(SlicefabError):
    """No such slice, or none the caller is allowed to see."""

    code = "not_found"


class PermissionDenied(SlicefabError):
    """The caller may not act on this slice."""

    code = "denied"


class LifecycleError(SlicefabError):
    """An illegal slice state transition was attempted."""

    code = "lifecycle"


class IdempotencyConflict(SlicefabError):
    """A request id was re-used with different parameters."""

    code = "request_id_reused"


class LedgerError(SlicefabError):
    """The durable ledger failed, or its content contradicts the device."""

    code = "ledger"


class FabricError(SlicefabError):
    """The crossbar backend refused or failed a register write or commit."""

    code = "fabric"
