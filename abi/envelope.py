"""The authentication envelope around a CCI message on a VM mailbox.

CXL's CCI message has no room for authentication, and CXL tooling must still be able to
read our traffic, so the message travels unchanged and the envelope is a trailer after it::

    frame = message || seq (u64 LE) || tag (32 bytes)
    tag   = HMAC-SHA256(vm_key, domain || vm_id || 0x00 || seq (u64 LE) || message)

``domain`` separates directions (``SFAB1-REQ`` / ``SFAB1-RSP``), so a response can never be
replayed as a request. ``seq`` is the VM's request counter: strictly increasing, checked by
the firmware (a replayed or reordered request carries a number already seen) and echoed
in the response, which is sealed with the same key so the VM can trust it came from the
firmware and answers *this* request. The key is the VM's 32-byte credential, provisioned by
the administrator (``slicefab vm add``); the VM id is bound in the MAC so that one VM's
frame is never valid on another VM's mailbox, even if keys were equal.

Everything here is pure computation: no I/O, no clock, no state (the one cache, of each
key's HMAC pads, is a memo of a pure function).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct

KEY_BYTES = 32
TAG_BYTES = 32
SEQ_BYTES = 8
TRAILER_BYTES = SEQ_BYTES + TAG_BYTES
MAX_SEQ = (1 << 64) - 1

REQUEST_DOMAIN = b"SFAB1-REQ"
RESPONSE_DOMAIN = b"SFAB1-RSP"

_SEQ = struct.Struct("<Q")


class EnvelopeError(ValueError):
    """A frame too short for its trailer, or a key or sequence number out of range."""


class BadTag(EnvelopeError):
    """The MAC does not verify: wrong key, wrong VM, or a modified frame."""


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_BLOCK = 64  # SHA-256's block size


@functools.lru_cache(maxsize=4096)
def _states(key: bytes, domain: bytes, vm_id: str) -> tuple[hashlib._Hash, hashlib._Hash]:
    """SHA-256 states after absorbing ``key ^ ipad`` followed by ``domain || vm_id || 0x00``
    (the start of every MAC input of one VM and direction), and ``key ^ opad`` (RFC 2104;
    the key is KEY_BYTES long, shorter than a block). A tag then copies the two states
    instead of hashing the key twice, which makes it 1.1 µs against hmac.digest's 2.8 µs:
    it is on the path of every request and response, twice per side."""
    k = key.ljust(_BLOCK, b"\0")
    inner = hashlib.sha256(k.translate(_IPAD))
    inner.update(domain + vm_id.encode() + b"\x00")
    return inner, hashlib.sha256(k.translate(_OPAD))


def _tag(
    key: bytes, domain: bytes, vm_id: str, seq: bytes | memoryview, message: bytes | memoryview
) -> bytes:
    """HMAC-SHA256 of ``domain || vm_id || 0x00 || seq || message`` under ``key``
    (``seq`` already packed as in the trailer)."""
    inner, outer = _states(key, domain, vm_id)
    h = inner.copy()
    h.update(seq)
    h.update(message)
    o = outer.copy()
    o.update(h.digest())
    return o.digest()


def _check(key: bytes, seq: int) -> None:
    if len(key) != KEY_BYTES:
        raise EnvelopeError(f"key: expected {KEY_BYTES} bytes, got {len(key)}")
    if not 0 <= seq <= MAX_SEQ:
        raise EnvelopeError(f"seq: {seq} is outside 0..2^64-1")


def seal(key: bytes, domain: bytes, vm_id: str, seq: int, message: bytes) -> bytes:
    """``message || seq || tag`` for ``domain`` (REQUEST_DOMAIN or RESPONSE_DOMAIN)."""
    if len(key) != KEY_BYTES or not 0 <= seq <= MAX_SEQ:
        _check(key, seq)
    trailer_seq = _SEQ.pack(seq)
    return b"".join((message, trailer_seq, _tag(key, domain, vm_id, trailer_seq, message)))


def split(frame: bytes) -> tuple[bytes, int, bytes]:
    """``(message, seq, tag)`` of a frame, without verifying anything."""
    if len(frame) < TRAILER_BYTES:
        raise EnvelopeError(
            f"frame: {len(frame)} bytes is shorter than the {TRAILER_BYTES}-byte trailer"
        )
    message = frame[:-TRAILER_BYTES]
    (seq,) = _SEQ.unpack_from(frame, len(frame) - TRAILER_BYTES)
    return message, seq, frame[-TAG_BYTES:]


def verify(key: bytes, domain: bytes, vm_id: str, frame: bytes) -> int | None:
    """The sequence number of a sealed ``frame`` if its tag verifies (compared in
    constant time), else None: :func:`open_sealed` for a caller that already holds the
    message's bytes where it wants them and only needs the verdict. Raises
    EnvelopeError for a key of the wrong size or a frame shorter than its trailer."""
    n = len(frame) - TRAILER_BYTES
    if n < 0 or len(key) != KEY_BYTES:
        split(frame)
        _check(key, 0)
    view = memoryview(frame)
    tag = _tag(key, domain, vm_id, view[n : n + SEQ_BYTES], view[:n])
    if not hmac.compare_digest(view[n + SEQ_BYTES :], tag):
        return None
    (seq,) = _SEQ.unpack_from(frame, n)
    return int(seq)


def open_sealed(key: bytes, domain: bytes, vm_id: str, frame: bytes) -> tuple[bytes, int]:
    """Verify a sealed frame; returns ``(message, seq)``.

    Raises:
        EnvelopeError: the frame is too short or the key has the wrong size.
        BadTag: the tag does not verify (compared in constant time).
    """
    seq = verify(key, domain, vm_id, frame)
    if seq is None:
        raise BadTag("frame: authentication tag does not verify")
    return frame[:-TRAILER_BYTES], seq
