"""ufcram.uffd without a userfaultfd: error mapping, message layout, fd passing."""
import errno
import os
import socket
import struct

import numpy as np
import pytest

from ufcram._shim import ffi, lib
from ufcram.errors import UffdError, UffdPermissionError, UffdRetry
from ufcram.app.uffd import EVENT_PAGEFAULT, FLAG_WP, MSG_DTYPE, _raise, feature_names

pytestmark = pytest.mark.timeout(10)


def test_permission_errors_say_what_to_do():
    with pytest.raises(UffdPermissionError) as e:
        _raise(-errno.EPERM, "userfaultfd")
    text = str(e.value)
    for grant in ("root", "/dev/userfaultfd", "vm.unprivileged_userfaultfd=1",
                  "UFFD_USER_MODE_ONLY", "EFAULT"):
        assert grant in text
    assert e.value.errno == errno.EPERM


def test_eagain_is_a_retry_and_others_are_errors():
    with pytest.raises(UffdRetry):
        _raise(-errno.EAGAIN, "UFFDIO_COPY")
    with pytest.raises(UffdError) as e:
        _raise(-errno.ENOENT, "UFFDIO_COPY")
    assert not isinstance(e.value, UffdRetry) and e.value.errno == errno.ENOENT


def test_message_layout_matches_the_kernel():
    """struct uffd_msg: u8 event, 7 reserved bytes, then flags, address, ptid."""
    raw = struct.pack("<B7xQQI4x", EVENT_PAGEFAULT, FLAG_WP, 0x7F0000001000, 4242) * 2
    msgs = np.frombuffer(raw, MSG_DTYPE)
    assert ffi.sizeof("struct ufc_run") == 16 and MSG_DTYPE.itemsize == 32
    assert msgs["event"].tolist() == [EVENT_PAGEFAULT] * 2
    assert int(msgs[1]["arg0"]) == FLAG_WP and int(msgs[1]["arg1"]) == 0x7F0000001000
    assert int(msgs[1]["arg2"]) & 0xFFFFFFFF == 4242


def test_feature_names():
    assert feature_names(lib.UFFD_FEATURE_MOVE | lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP) == \
        ["WP", "MOVE"]


def test_native_fd_passing_round_trip():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        assert lib.ufc_send_fds(a.fileno(), b"hi", 2, ffi.new("int[1]", [w]), 1) == 2
        buf, fds, nfds = ffi.new("char[8]"), ffi.new("int[4]"), ffi.new("int *")
        assert lib.ufc_recv_fds(b.fileno(), buf, 8, fds, 4, nfds) == 2
        assert ffi.string(buf) == b"hi" and nfds[0] == 1
        os.write(fds[0], b"through the passed fd")
        os.close(fds[0])
        assert os.read(r, 64) == b"through the passed fd"
        assert lib.ufc_send_fds(a.fileno(), b"x", 1, ffi.NULL, 9) == -errno.EINVAL
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_closed_descriptor_is_a_clear_error():
    from ufcram.app.uffd import Uffd
    with pytest.raises(UffdError) as e:
        Uffd(9999, 0).register(0x10000, 4096)
    assert e.value.errno == errno.EBADF and "UFFDIO_REGISTER" in str(e.value)
