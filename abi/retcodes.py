"""Return codes: CXL's, Slicefab's vendor extended status, and the error-detail payload.

A response carries two codes in its CCI header (CXL r3.1 Figure 7-19):

- ``return_code``: a CXL command return code, :class:`ReturnCode` — CXL r3.1
  §8.2.8.4.5.1, Table 8-34 "Command Return Codes". The values were checked against
  libcxlmi's ``enum cxlmi_cmd_retcode`` (src/libcxlmi.h) and QEMU's ``CXLRetCode``
  (include/hw/cxl/cxl_device.h), which agree on 00h-20h;
- ``ext_status``: the "vendor specific extended status", :class:`VendorStatus`, which
  says exactly which Slicefab error it was (one per firmware error ``code``).

CXL tooling sees a meaningful CXL code; hostlib maps the vendor status to its exception
tree. :data:`ERRORS` is the one table between firmware error codes (the ``code`` of
``firmware.errors`` and of the mailbox checks) and the pair of codes on the wire.

An error response's payload is empty or an :data:`ERROR_DETAIL` (the field at fault and
a human message), so a VM learns what to change without a second round trip.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from abi.errors import DecodeError
from abi.layout import Layout, Payload, Text


class ReturnCode(enum.IntEnum):
    """CXL r3.1 Table 8-34, Command Return Codes (libcxlmi ``CXLMI_RET_*``)."""

    SUCCESS = 0x00
    BACKGROUND_COMMAND_STARTED = 0x01
    INVALID_INPUT = 0x02
    UNSUPPORTED = 0x03
    INTERNAL_ERROR = 0x04
    RETRY_REQUIRED = 0x05
    BUSY = 0x06
    MEDIA_DISABLED = 0x07
    FW_TRANSFER_IN_PROGRESS = 0x08
    FW_TRANSFER_OUT_OF_ORDER = 0x09
    FW_VERIFICATION_FAILED = 0x0A
    INVALID_SLOT = 0x0B
    ACTIVATION_FAILED_FW_ROLLED_BACK = 0x0C
    ACTIVATION_FAILED_COLD_RESET_REQUIRED = 0x0D
    INVALID_HANDLE = 0x0E
    INVALID_PHYSICAL_ADDRESS = 0x0F
    INJECT_POISON_LIMIT_REACHED = 0x10
    PERMANENT_MEDIA_FAILURE = 0x11
    ABORTED = 0x12
    INVALID_SECURITY_STATE = 0x13
    INCORRECT_PASSPHRASE = 0x14
    UNSUPPORTED_MAILBOX_OR_CCI = 0x15
    INVALID_PAYLOAD_LENGTH = 0x16
    INVALID_LOG = 0x17
    INTERRUPTED = 0x18
    UNSUPPORTED_FEATURE_VERSION = 0x19
    UNSUPPORTED_FEATURE_SELECTION_VALUE = 0x1A
    FEATURE_TRANSFER_IN_PROGRESS = 0x1B
    FEATURE_TRANSFER_OUT_OF_ORDER = 0x1C
    RESOURCES_EXHAUSTED = 0x1D
    INVALID_EXTENT_LIST = 0x1E
    TRANSFER_OUT_OF_ORDER = 0x1F
    REQUEST_ABORT_NOT_SUPPORTED = 0x20


class VendorStatus(enum.IntEnum):
    """Slicefab's vendor extended status: which error it was (0 on success)."""

    NONE = 0
    INVALID = 1  # a request field has the wrong type, range or alignment
    INSUFFICIENT = 2  # not enough free units of a resource
    CONFLICT = 3  # a named unit (core, lane, key, port) is held by another
    NOT_FOUND = 4  # no such slice (or VM)
    DENIED = 5  # the caller does not own the slice
    LIFECYCLE = 6  # an illegal slice state transition
    REQUEST_ID_REUSED = 7  # a request id re-used with different parameters
    LEDGER = 8  # the durable ledger failed
    FABRIC = 9  # the crossbar refused or failed a reconfiguration
    CONFIG = 10  # a device or slice file is malformed
    AUTH_FAILED = 11  # the request's MAC does not verify
    REPLAY = 12  # a sequence number not above the last accepted
    RATE_LIMITED = 13  # too many bad requests on this channel
    OPCODE_NOT_ALLOWED = 14  # an opcode this role may not use (admin opcode on a VM mailbox)
    PAYLOAD_TOO_LARGE = 15  # a declared or actual payload over the cap
    MALFORMED = 16  # a frame or payload that does not decode
    UNSUPPORTED = 17  # an opcode the device does not implement
    ALLOCATION = 18  # a valid request that cannot be satisfied (no more specific reason)
    INTERNAL = 19  # any other firmware error


#: firmware error ``code`` -> (CXL return code, vendor extended status)
ERRORS: Mapping[str, tuple[ReturnCode, VendorStatus]] = MappingProxyType(
    {
        "invalid": (ReturnCode.INVALID_INPUT, VendorStatus.INVALID),
        "config": (ReturnCode.INVALID_INPUT, VendorStatus.CONFIG),
        "not_found": (ReturnCode.INVALID_INPUT, VendorStatus.NOT_FOUND),
        "denied": (ReturnCode.INVALID_INPUT, VendorStatus.DENIED),
        "lifecycle": (ReturnCode.INVALID_INPUT, VendorStatus.LIFECYCLE),
        "request_id_reused": (ReturnCode.INVALID_INPUT, VendorStatus.REQUEST_ID_REUSED),
        "malformed": (ReturnCode.INVALID_INPUT, VendorStatus.MALFORMED),
        # AllocationError and its subclasses: the device's resources, not the request
        "allocation": (ReturnCode.RESOURCES_EXHAUSTED, VendorStatus.ALLOCATION),
        "insufficient": (ReturnCode.RESOURCES_EXHAUSTED, VendorStatus.INSUFFICIENT),
        "conflict": (ReturnCode.RESOURCES_EXHAUSTED, VendorStatus.CONFLICT),
        "ledger": (ReturnCode.INTERNAL_ERROR, VendorStatus.LEDGER),
        "fabric": (ReturnCode.INTERNAL_ERROR, VendorStatus.FABRIC),
        "error": (ReturnCode.INTERNAL_ERROR, VendorStatus.INTERNAL),
        # the mailbox's own checks (docs/security.md), before any handler runs
        "auth_failed": (ReturnCode.INVALID_SECURITY_STATE, VendorStatus.AUTH_FAILED),
        "replay": (ReturnCode.INVALID_SECURITY_STATE, VendorStatus.REPLAY),
        "rate_limited": (ReturnCode.BUSY, VendorStatus.RATE_LIMITED),
        "opcode_not_allowed": (
            ReturnCode.UNSUPPORTED_MAILBOX_OR_CCI,
            VendorStatus.OPCODE_NOT_ALLOWED,
        ),
        "payload_too_large": (ReturnCode.INVALID_PAYLOAD_LENGTH, VendorStatus.PAYLOAD_TOO_LARGE),
        "unsupported": (ReturnCode.UNSUPPORTED, VendorStatus.UNSUPPORTED),
    }
)

_BY_STATUS: dict[int, str] = {int(vs): code for code, (_, vs) in ERRORS.items()}
_BY_RETURN: dict[int, str] = {}
for _code, (_rc, _) in ERRORS.items():
    _BY_RETURN.setdefault(int(_rc), _code)  # the first row for a return code is its default


def codes_for(code: str) -> tuple[ReturnCode, VendorStatus]:
    """The wire codes for a firmware error ``code``; an unknown code is an internal error
    (never a success)."""
    return ERRORS.get(code, ERRORS["error"])


def error_code(return_code: int, ext_status: int) -> str | None:
    """The firmware error ``code`` a response's codes stand for; ``None`` for success.

    The vendor status decides when Slicefab set it; a bare CXL return code (another
    device, or a status this table does not know) maps to the first row with that return
    code, and anything else to ``"error"``.
    """
    if return_code in (ReturnCode.SUCCESS, ReturnCode.BACKGROUND_COMMAND_STARTED):
        return None
    code = _BY_STATUS.get(ext_status)
    if code is not None and ERRORS[code][0] == return_code:
        return code
    return _BY_RETURN.get(return_code, "error")


#: the payload of an error response (or nothing): the field at fault and why
ERROR_DETAIL = Layout(
    "error",
    "field" / Text(255) * "dotted name of the field at fault; empty if none",
    "message" / Text(1024, prefix=2) * "what is wrong, in words for a person",
    doc="Optional payload of a response whose return code is not Success.",
)


def _clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, on a character boundary."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def error_payload(error: Mapping[str, Any]) -> tuple[ReturnCode, VendorStatus, bytes]:
    """Wire codes and detail payload for a firmware error dict
    (``SlicefabError.to_dict()``: ``{"code", "message", "details": {"field", ...}}``).
    Never raises: an over-long message is cut, an unknown code is an internal error."""
    rc, vs = codes_for(str(error.get("code", "error")))
    details = error.get("details") or {}
    field = details.get("field", "") if isinstance(details, Mapping) else ""
    payload = ERROR_DETAIL.build(
        {
            "field": _clip(str(field or ""), 255),
            "message": _clip(str(error.get("message", "")), 1024),
        }
    )
    return rc, vs, payload


def error_from_response(return_code: int, ext_status: int, payload: bytes) -> dict[str, Any]:
    """The firmware-shaped error dict (``{"code", "message", "details"}``) of an error
    response. An empty payload gives an empty message.

    Raises:
        DecodeError: the payload is neither empty nor an error detail.
    """
    if return_code == ReturnCode.SUCCESS:
        raise DecodeError("header.return_code", "not an error response", expected="non-zero")
    detail: Payload = ERROR_DETAIL.parse(payload) if payload else {"field": "", "message": ""}
    details: dict[str, Any] = {"field": detail["field"]} if detail["field"] else {}
    return {
        "code": error_code(return_code, ext_status) or "error",
        "message": detail["message"],
        "details": details,
    }


__all__ = [
    "ERRORS",
    "ERROR_DETAIL",
    "ReturnCode",
    "VendorStatus",
    "codes_for",
    "error_code",
    "error_from_response",
    "error_payload",
]
