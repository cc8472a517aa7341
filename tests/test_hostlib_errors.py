"""hostlib's exception tree: the device's codes, the wire, and the transport twins."""

from __future__ import annotations

import pytest

import hostlib.transport as t
from abi.cci import Category, Message
from abi.commands import BY_NAME, decode_response, encode_error
from abi.retcodes import ERRORS
from hostlib import errors as e

#: code -> class, restated here so a change of mapping in hostlib fails a test
EXPECTED: dict[str, type[e.SlicefabError]] = {
    "invalid": e.RequestError,
    "config": e.RequestError,
    "insufficient": e.InsufficientResources,
    "conflict": e.ResourceConflict,
    "allocation": e.AllocationError,
    "not_found": e.NotFound,
    "denied": e.PermissionDenied,
    "lifecycle": e.LifecycleError,
    "request_id_reused": e.IdempotencyConflict,
    "ledger": e.DeviceError,
    "fabric": e.DeviceError,
    "internal": e.DeviceError,
    "error": e.DeviceError,
    "auth_failed": e.AuthError,
    "replay": e.AuthError,
    "rate_limited": e.RateLimited,
    "opcode_not_allowed": e.ProtocolError,
    "payload_too_large": e.ProtocolError,
    "malformed": e.ProtocolError,
    "unsupported": e.ProtocolError,
}


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_error_from_dict_maps_each_code(code: str) -> None:
    err = e.error_from_dict(
        {"code": code, "message": "why", "details": {"field": "cores.count", "limit": 3}}
    )
    assert type(err) is EXPECTED[code]
    assert (err.code, err.message, err.field) == (code, "why", "cores.count")
    assert err.details == {"field": "cores.count", "limit": 3}
    assert err.to_dict() == {"code": code, "message": "why", "details": err.details}
    assert code in str(err) and "why" in str(err)


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_every_code_on_the_wire_comes_back_as_its_class(code: str) -> None:
    request = Message(Category.REQUEST, 7, BY_NAME["ALLOCATE"].opcode)
    wire = encode_error(request, {"code": code, "message": "m", "details": {"field": "f"}})
    err = e.error_from_dict(decode_response(wire).error or {})
    assert type(err) is EXPECTED[code] and err.code == code and err.field == "f"


def test_every_wire_code_is_mapped_explicitly() -> None:
    assert set(ERRORS) <= set(e.ERROR_CLASSES)


def test_an_unknown_or_missing_code_is_a_device_error_that_keeps_it() -> None:
    err = e.error_from_dict({"code": "flux_capacitor", "message": "x"})
    assert type(err) is e.DeviceError and err.code == "flux_capacitor" and err.details == {}
    bare = e.error_from_dict({})
    assert type(bare) is e.DeviceError and bare.code == "error" and bare.field == ""
    odd = e.error_from_dict({"code": "invalid", "details": "not a mapping"})
    assert odd.details == {}


def test_the_tree() -> None:
    assert issubclass(e.InsufficientResources, e.AllocationError)
    assert issubclass(e.ResourceConflict, e.AllocationError)
    for cls in {*EXPECTED.values(), e.CredentialError, e.TransportError, e.DeviceNotFound}:
        assert issubclass(cls, e.SlicefabError)
    assert not issubclass(e.AllocationError, e.RequestError)
    # the default code of a class raised by hostlib itself
    assert e.AuthError("x").code == "auth_failed" and e.ProtocolError("x").code == "malformed"


@pytest.mark.parametrize(
    ("plain", "twin"),
    [
        (t.TransportError("x"), e.TransportError),
        (t.TransportTimeout("x"), e.TransportTimeout),
        (t.PeerClosed("x"), e.PeerClosed),
        (t.MailboxLayoutError("x"), e.MailboxLayoutError),
        (t.FrameTooLarge("x", length=9000, capacity=4096), e.FrameTooLarge),
    ],
)
def test_transport_errors_are_wrapped_into_both_trees(
    plain: t.TransportError, twin: type[e.TransportError]
) -> None:
    wrapped = e.wrap_transport_error(plain)
    assert type(wrapped) is twin
    assert isinstance(wrapped, e.SlicefabError)
    assert isinstance(wrapped, type(plain))  # `except hostlib.transport.X` still catches it
    assert wrapped.message == "x"
    assert e.wrap_transport_error(wrapped) is wrapped


def test_a_wrapped_frame_too_large_keeps_its_sizes() -> None:
    wrapped = e.wrap_transport_error(t.FrameTooLarge("big", length=9000, capacity=4096))
    assert isinstance(wrapped, e.FrameTooLarge) and isinstance(wrapped, t.FrameTooLarge)
    assert (wrapped.length, wrapped.capacity) == (9000, 4096)
    assert wrapped.details == {"length": 9000, "capacity": 4096}


def test_device_not_found_is_a_transport_error_of_both_trees() -> None:
    err = e.DeviceNotFound("nothing")
    assert isinstance(err, e.TransportError) and isinstance(err, t.TransportError)
