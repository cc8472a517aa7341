"""hostlib's exception tree: one root for everything the host driver raises on purpose.

::

    SlicefabError                    root; every error has .code, .message, .details
     ├── ProtocolError               the two ends do not speak the same ABI: malformed,
     │                               unsupported, payload_too_large, opcode_not_allowed, or a
     │                               response hostlib cannot decode
     ├── AuthError                   auth_failed, replay, or a response that does not verify
     │                               (wrong credential, not the firmware, a stale answer)
     ├── RateLimited                 rate_limited: too many bad requests on this mailbox
     ├── RequestError                invalid, config: a request field the device refuses (.field)
     ├── AllocationError             allocation: a valid request the device cannot satisfy now
     │    ├── InsufficientResources  insufficient: not enough free units of a resource
     │    └── ResourceConflict       conflict: a named unit is held by another slice
     ├── NotFound                    not_found: no such slice (or not this VM's)
     ├── PermissionDenied            denied: the slice is not this VM's
     ├── LifecycleError              lifecycle: an illegal slice state transition
     ├── IdempotencyConflict         request_id_reused: a request id re-used with other parameters
     ├── DeviceError                 ledger, fabric, internal, error: the device failed
     ├── CredentialError             the credential file is missing or unusable (.field)
     ├── NetSliceError               a network slice (hostlib.netslice) could not be made,
     │                               changed or removed on this host (.field)
     └── TransportError              the frame did not make the round trip
          ├── TransportTimeout       no answer in time
          ├── PeerClosed             the firmware closed the mailbox, or this client was closed
          ├── FrameTooLarge          a frame over the mailbox's capacity
          ├── MailboxLayoutError     a region that is not a Slicefab mailbox
          └── DeviceNotFound         discovery found no mailbox (no PCI device, no host file)

The device answers with return codes (``abi.retcodes``): :func:`error_from_dict` maps the
firmware-shaped error dict ``{"code", "message", "details"}`` that ``abi.commands``
decodes from a response to the class above, by ``code``.

**Transport errors.** :mod:`hostlib.transport` is shared with the firmware and has its own
root, ``hostlib.transport.TransportError``. The client re-raises every transport failure as
the class of the same name here (:func:`wrap_transport_error`), and each of those inherits
from *both* trees: ``except hostlib.errors.SlicefabError`` catches everything the client
raises, and code written against the transport (``except
hostlib.transport.TransportTimeout``) still works. The original is kept as ``__cause__``.

hostlib never imports ``firmware``: this tree restates the firmware's codes, it does not
share its classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from hostlib import transport as _t


class SlicefabError(Exception):
    """Root of every error hostlib raises on purpose.

    ``code`` is the firmware's machine-readable error code (``"insufficient"``, ``"replay"``,
    ...), ``message`` the human text, ``details`` what else is known (``field`` at least,
    when the device named one)."""

    code: str
    message: str
    details: dict[str, Any]
    #: the code an instance gets when none is given
    default_code: ClassVar[str] = "error"

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        # Exception.__init__ directly: the transport twins below also inherit from transport
        # classes whose __init__ wants other arguments (FrameTooLarge's length/capacity).
        Exception.__init__(self, message)
        self.code = code if code is not None else self.default_code
        self.message = message
        self.details = dict(details or {})

    @property
    def field(self) -> str:
        """The dotted name of the request field at fault; empty when none was named."""
        return str(self.details.get("field", "") or "")

    def __str__(self) -> str:
        where = f" [{self.field}]" if self.field and self.field not in self.message else ""
        return f"{self.code}: {self.message}{where}"

    def to_dict(self) -> dict[str, Any]:
        """``{"code", "message", "details"}``: the shape the firmware uses."""
        return {"code": self.code, "message": self.message, "details": dict(self.details)}


class ProtocolError(SlicefabError):
    """The device and this library disagree about the ABI: the device refused a frame as
    malformed, too large or not allowed on a VM mailbox, does not implement an opcode, or
    answered something this library cannot decode."""

    default_code = "malformed"


class AuthError(SlicefabError):
    """Authentication failed in either direction: the device refused the request's MAC
    (``auth_failed``) or its sequence number (``replay``), or the response does not verify
    with this VM's key, answers another request, or is not fresh. A wrong or revoked
    credential, or something other than the firmware answering the mailbox."""

    default_code = "auth_failed"


class RateLimited(SlicefabError):
    """The device stopped verifying requests on this mailbox for a while, after too many
    bad ones (docs/security.md, check 3). Wait, then retry."""

    default_code = "rate_limited"


class RequestError(SlicefabError):
    """A request field has the wrong type, range or alignment (``invalid``), or a spec
    the device's configuration cannot take (``config``). :attr:`field` names it."""

    default_code = "invalid"


class AllocationError(SlicefabError):
    """A valid request the device cannot satisfy right now."""

    default_code = "allocation"


class InsufficientResources(AllocationError):
    """Fewer free units of a resource than requested."""

    default_code = "insufficient"


class ResourceConflict(AllocationError):
    """A named unit (core id, lane group, key, port) is held by another slice."""

    default_code = "conflict"


class NotFound(SlicefabError):
    """No such slice, or none this VM may see."""

    default_code = "not_found"


class PermissionDenied(SlicefabError):
    """This VM may not act on that slice."""

    default_code = "denied"


class LifecycleError(SlicefabError):
    """The slice is in a state that does not allow the operation (e.g. resizing a freed
    slice)."""

    default_code = "lifecycle"


class IdempotencyConflict(SlicefabError):
    """A request id was re-used with different parameters: the device already executed
    another request under that id."""

    default_code = "request_id_reused"


class DeviceError(SlicefabError):
    """The device failed: its ledger (``ledger``), its crossbar (``fabric``) or anything
    else (``internal``, ``error``). The request may be retried with the same request id."""

    default_code = "internal"


class CredentialError(SlicefabError):
    """The credential file cannot be used: missing, unreadable, not TOML, or a field
    (:attr:`field`: ``vm``, ``key`` or ``mailbox``) missing or malformed."""

    default_code = "config"


class NetSliceError(SlicefabError):
    """The host refused a network slice operation (:mod:`hostlib.netslice`): a network
    namespace that is missing, interfaces left over under the slice's names, an address
    pool with no free /30, or a netlink request the kernel refused (``details["errno"]``).
    :attr:`field` names the setting at fault when one is."""

    default_code = "netslice"


class TransportError(SlicefabError, _t.TransportError):
    """The frame did not make the round trip. Also a ``hostlib.transport.TransportError``."""

    default_code = "transport"


class TransportTimeout(TransportError, _t.TransportTimeout):
    """No response before the deadline. Also a ``hostlib.transport.TransportTimeout``."""

    default_code = "timeout"


class PeerClosed(TransportError, _t.PeerClosed):
    """The firmware closed the mailbox (or was never there), or this client was closed.
    Also a ``hostlib.transport.PeerClosed``."""

    default_code = "closed"


class FrameTooLarge(TransportError, _t.FrameTooLarge):
    """A frame exceeds the mailbox's capacity. Also a ``hostlib.transport.FrameTooLarge``,
    with its ``length`` and ``capacity``."""

    default_code = "frame_too_large"

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
        length: int = -1,
        capacity: int = 0,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.length = length
        self.capacity = capacity


class MailboxLayoutError(TransportError, _t.MailboxLayoutError):
    """The region is not a Slicefab mailbox this code can use. Also a
    ``hostlib.transport.MailboxLayoutError``."""

    default_code = "mailbox_layout"


class DeviceNotFound(TransportError):
    """Discovery found no mailbox: no ivshmem PCI device carrying the mailbox signature,
    and no host file at the credential's ``mailbox`` path."""

    default_code = "no_device"


#: firmware error code -> the class it raises
ERROR_CLASSES: Mapping[str, type[SlicefabError]] = {
    "invalid": RequestError,
    "config": RequestError,
    "insufficient": InsufficientResources,
    "conflict": ResourceConflict,
    "allocation": AllocationError,
    "not_found": NotFound,
    "denied": PermissionDenied,
    "lifecycle": LifecycleError,
    "request_id_reused": IdempotencyConflict,
    "ledger": DeviceError,
    "fabric": DeviceError,
    "internal": DeviceError,
    "error": DeviceError,
    "auth_failed": AuthError,
    "replay": AuthError,
    "rate_limited": RateLimited,
    "opcode_not_allowed": ProtocolError,
    "payload_too_large": ProtocolError,
    "malformed": ProtocolError,
    "unsupported": ProtocolError,
}


def error_from_dict(d: Mapping[str, Any]) -> SlicefabError:
    """The exception for a firmware-shaped error dict ``{"code", "message", "details"}``
    (what ``abi.commands.decode_response`` returns as ``.error``). An unknown or missing
    code gives a :class:`DeviceError` that keeps the code it was given. Never raises."""
    code = str(d.get("code") or "error")
    details = d.get("details")
    cls = ERROR_CLASSES.get(code, DeviceError)
    return cls(
        str(d.get("message", "")),
        code=code,
        details=details if isinstance(details, Mapping) else None,
    )


_TRANSPORT_TWINS: tuple[tuple[type[_t.TransportError], type[TransportError]], ...] = (
    (_t.TransportTimeout, TransportTimeout),
    (_t.PeerClosed, PeerClosed),
    (_t.MailboxLayoutError, MailboxLayoutError),
)


def wrap_transport_error(e: _t.TransportError) -> TransportError:
    """The hostlib twin of a transport error (the same message; ``raise ... from e``).
    An error that already is one is returned as is."""
    if isinstance(e, TransportError):
        return e
    if isinstance(e, _t.FrameTooLarge):
        return FrameTooLarge(
            str(e),
            details={"length": e.length, "capacity": e.capacity},
            length=e.length,
            capacity=e.capacity,
        )
    for plain, twin in _TRANSPORT_TWINS:
        if isinstance(e, plain):
            return twin(str(e))
    return TransportError(str(e))


__all__ = [
    "ERROR_CLASSES",
    "AllocationError",
    "AuthError",
    "CredentialError",
    "DeviceError",
    "DeviceNotFound",
    "FrameTooLarge",
    "IdempotencyConflict",
    "InsufficientResources",
    "LifecycleError",
    "MailboxLayoutError",
    "NetSliceError",
    "NotFound",
    "PeerClosed",
    "PermissionDenied",
    "ProtocolError",
    "RateLimited",
    "RequestError",
    "ResourceConflict",
    "SlicefabError",
    "TransportError",
    "TransportTimeout",
    "error_from_dict",
    "wrap_transport_error",
]
