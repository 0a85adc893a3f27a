"""ufcram.protocol: framing and validation, no sockets or kernel needed."""
import json

import numpy as np
import pytest

from ufcram import protocol as P
from ufcram._shim import ffi
from ufcram.errors import ProtocolError

pytestmark = pytest.mark.timeout(10)


# each request's payload struct in native/common/protocol.h, its fields in order, and values
# that fill every byte of each field (high bits too)
C_PAYLOADS = {
    P.HELLO: ("ufc_req_hello", ("staging_bytes", "flags"), (1 << 40 | 3, -2)),
    P.REGISTER: ("ufc_req_register", ("start", "length", "resident_limit", "write_budget"),
                 (0x7F12_3456_7000, 1 << 33, P.NO_LIMIT, P.AUTO_BUDGET)),
    P.UNREGISTER: ("ufc_req_unregister", ("region", "restore"), (0xFEDC_BA98, 1)),
    P.DEMOTE: ("ufc_req_demote", ("region", "offset", "length"),
               (0x8000_0001, 1 << 45, (1 << 50) + 4096)),
    P.STATS: ("ufc_req_stats", ("region",), (P.NODE_SUMMARY,)),
    P.SET_CAPACITY: ("ufc_req_set_capacity", ("capacity",), ((1 << 63) + 5,)),
    P.LIMITS: ("ufc_req_limits", ("resident_limit", "group"), (P.NO_LIMIT, 0xABCD_0123_4567)),
}


@pytest.mark.parametrize("op", sorted(set(P.PAYLOADS) - {P.PING}))
def test_payloads_are_the_c_structs_the_preload_library_sends(op):
    """The contract between protocol.py's formats and protocol.h's structs: the same size,
    and each field, packed by Python, reads back through the C layout."""
    name, fields, values = C_PAYLOADS[op]
    layout = P.PAYLOADS[op]
    assert layout.size == ffi.sizeof(f"struct {name}")
    assert [f for f, _ in ffi.typeof(f"struct {name}").fields] == list(fields)
    packed = bytearray(layout.pack(*values))
    struct = ffi.cast(f"struct {name} *", ffi.from_buffer(packed))
    assert tuple(getattr(struct, f) for f in fields) == values
    assert P.unpack_request(op, bytes(packed)) == values


def test_every_request_with_a_payload_has_its_c_struct():
    assert set(C_PAYLOADS) == set(P.PAYLOADS) - {P.PING}
    assert P.PAYLOADS[P.PING].size == 0


def test_round_trip():
    payload = P.pack_request(P.DEMOTE, 3, 4096, 8192)
    op, seq, body = P.decode(P.encode(P.DEMOTE, 7, payload))
    assert (op, seq) == (P.DEMOTE, 7)
    assert P.unpack_request(op, body) == (3, 4096, 8192)


@pytest.mark.parametrize("frame,message", [
    (b"", "truncated"),
    (b"UFCR\x01\x00", "truncated"),
    (b"XXXX" + bytes(12), "bad magic"),
    (P.HEADER.pack(P.MAGIC, 99, P.STATS, 1, 0), "version 99"),
    (P.HEADER.pack(P.MAGIC, P.VERSION, P.STATS, 1, 4), "payload length"),
])
def test_malformed_frames_are_refused(frame, message):
    with pytest.raises(ProtocolError, match=message):
        P.decode(frame)


def test_unknown_op_and_wrong_payload_size():
    with pytest.raises(ProtocolError, match="unknown"):
        P.unpack_request(77, b"")
    with pytest.raises(ProtocolError, match="expected"):
        P.unpack_request(P.DEMOTE, b"\0" * 5)


def test_error_payload_round_trip():
    assert P.parse_error(P.error_payload(22, "bad range")) == (22, "bad range")


def test_json_payload_turns_numpy_scalars_into_plain_numbers():
    """The handler's counts come from numpy arrays: one that reaches a reply without
    int() must still encode (a STATS reply once failed on an int64 and dropped the
    client)."""
    reply = {"pages": np.int64(3), "small": np.uint8(7), "ratio": np.float64(0.5),
             "closed": np.bool_(True), "nested": {"list": [np.int32(-2), np.float32(1.5)]}}
    decoded = json.loads(P.json_payload(reply))
    assert decoded == {"pages": 3, "small": 7, "ratio": 0.5, "closed": True,
                       "nested": {"list": [-2, 1.5]}}
    assert type(decoded["pages"]) is int and type(decoded["closed"]) is bool


def test_json_payload_still_refuses_what_is_not_a_number():
    with pytest.raises(TypeError, match="not JSON serializable"):
        P.json_payload({"what": object()})
