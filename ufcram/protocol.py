"""The handler's socket protocol: versioned binary frames over SOCK_SEQPACKET, with
descriptors passed as SCM_RIGHTS. Every frame is validated before it is acted on.
"""
import json
import os
import socket
import struct

import numpy as np

from ._shim import lib
from .errors import ProtocolError

MAGIC = b"UFCR"
VERSION = lib.UFC_PROTO_VERSION
HEADER = struct.Struct("<4sHHII")   # magic, version, op, seq, payload length
MAX_FRAME = lib.UFC_PROTO_MAX_FRAME
MAX_FDS = lib.UFC_PROTO_MAX_FDS

# requests (numbered in native/common/protocol.h, which the preload library speaks too)
HELLO = lib.UFC_PROTO_HELLO                # fds: uffd, agent socket, staging memfd;
                                           # payload: staging bytes, flags
REGISTER = lib.UFC_PROTO_REGISTER          # start, length, resident limit, budget -> id
UNREGISTER = lib.UFC_PROTO_UNREGISTER      # region id, restore flag -> pages restored
DEMOTE = lib.UFC_PROTO_DEMOTE              # region id, offset, length -> pages demoted
STATS = lib.UFC_PROTO_STATS                # region id (or NODE[_SUMMARY]) -> JSON
SET_CAPACITY = lib.UFC_PROTO_SET_CAPACITY  # node capacity in bytes
LIMITS = lib.UFC_PROTO_LIMITS              # resident limit of the client's group
PING = lib.UFC_PROTO_PING                  # is the handler there? (no payload)
HELLO_COVERS = lib.UFC_PROTO_HELLO_COVERS  # HELLO flag: the client covers all its mappings
# replies
OK = lib.UFC_PROTO_OK
ERROR = lib.UFC_PROTO_ERROR

NODE = lib.UFC_PROTO_NODE                  # STATS: the node, with its largest clients
NODE_SUMMARY = lib.UFC_PROTO_NODE_SUMMARY  # STATS: the node's totals alone, O(1)
NO_LIMIT = lib.UFC_PROTO_NO_LIMIT          # REGISTER, LIMITS: no resident limit
AUTO_BUDGET = lib.UFC_PROTO_AUTO_BUDGET    # REGISTER: write budget "auto"

# the payload of each request, as protocol.h's structs lay it out (and the contract
# test in tests/unit/test_protocol.py checks, field by field)
PAYLOADS = {
    HELLO: struct.Struct("<Qi"),        # staging bytes, flags
    REGISTER: struct.Struct("<QQQq"),   # limit 2**64-1: none; budget -1: auto
    UNREGISTER: struct.Struct("<IB"),
    DEMOTE: struct.Struct("<IQQ"),
    STATS: struct.Struct("<I"),
    SET_CAPACITY: struct.Struct("<Q"),
    LIMITS: struct.Struct("<QQ"),       # limit (2**64-1: none), group (0: none)
    PING: struct.Struct("<"),
}
COUNT = struct.Struct("<Q")
ERRNO = struct.Struct("<i")


def encode(op, seq, payload=b""):
    return HEADER.pack(MAGIC, VERSION, op, seq, len(payload)) + payload


def decode(frame):
    """(op, seq, payload) of a frame; ProtocolError if it is not a well-formed frame."""
    if len(frame) < HEADER.size:
        raise ProtocolError(f"truncated frame ({len(frame)} bytes)")
    magic, version, op, seq, length = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a ufcram frame")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} unsupported (this side: {VERSION})")
    if length != len(frame) - HEADER.size:
        raise ProtocolError(f"payload length {length} != {len(frame) - HEADER.size} received")
    return op, seq, frame[HEADER.size:]


def unpack_request(op, payload):
    layout = PAYLOADS.get(op)
    if layout is None:
        raise ProtocolError(f"unknown request op {op}")
    if len(payload) != layout.size:
        raise ProtocolError(f"op {op}: payload of {len(payload)} bytes, expected {layout.size}")
    return layout.unpack(payload)


def pack_request(op, *fields):
    return PAYLOADS[op].pack(*fields)


def error_payload(errno_, message):
    return ERRNO.pack(errno_) + message.encode()[:MAX_FRAME - 64]


def parse_error(payload):
    (errno_,) = ERRNO.unpack_from(payload)
    return errno_, payload[ERRNO.size:].decode(errors="replace")


def json_payload(obj):
    return json.dumps(obj, default=plain).encode()


def plain(value):
    """json's fallback: a numpy scalar (an int64 count, a float64 ratio, a bool_ flag)
    as the Python number it holds. The handler's books are numpy arrays, and one count
    that slips through without int() must not fail the reply (and drop the client)."""
    if isinstance(value, np.generic) and not isinstance(value, (np.void, np.bytes_)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def recv_frame(sock, with_fds=False):
    """One frame (and its descriptors); b'' when the peer has gone."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_FRAME, MAX_FDS)
    if flags & socket.MSG_CTRUNC or flags & socket.MSG_TRUNC:
        close_all(fds)
        raise ProtocolError("oversized frame or too many descriptors")
    if fds and not with_fds:
        close_all(fds)
        raise ProtocolError("unexpected descriptors")
    return (data, fds) if with_fds else data


def close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
