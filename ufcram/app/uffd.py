"""Python face of the native userfaultfd shim: open with feature negotiation, ioctls
that raise UffdError subclasses with a message that says what to do, and batched reads.
"""
import errno
import os

import numpy as np

from ufcram._shim import ffi, lib
from ufcram.errors import UffdError, UffdPermissionError, UffdRetry, UffdUnsupportedError
from ufcram.store.pagetable import PAGE_SIZE

# A uffd_msg is 32 packed bytes; the meaning of arg0..arg2 depends on the event:
# PAGEFAULT (flags, address, ptid), FORK (ufd), REMAP (from, to, len), REMOVE/UNMAP (start, end).
MSG_DTYPE = np.dtype([("event", "u1"), ("_pad", "u1", (7,)),
                      ("arg0", "<u8"), ("arg1", "<u8"), ("arg2", "<u8")])
assert MSG_DTYPE.itemsize == 32

EVENT_PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
EVENT_FORK = lib.UFFD_EVENT_FORK
EVENT_REMAP = lib.UFFD_EVENT_REMAP
EVENT_REMOVE = lib.UFFD_EVENT_REMOVE
EVENT_UNMAP = lib.UFFD_EVENT_UNMAP
FLAG_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
FLAG_WP = lib.UFFD_PAGEFAULT_FLAG_WP

FEATURES = {
    "WP": lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    "EVENT_FORK": lib.UFFD_FEATURE_EVENT_FORK,
    "EVENT_REMAP": lib.UFFD_FEATURE_EVENT_REMAP,
    "EVENT_REMOVE": lib.UFFD_FEATURE_EVENT_REMOVE,
    "EVENT_UNMAP": lib.UFFD_FEATURE_EVENT_UNMAP,
    "SIGBUS": lib.UFFD_FEATURE_SIGBUS,
    "THREAD_ID": lib.UFFD_FEATURE_THREAD_ID,
    "EXACT_ADDRESS": lib.UFFD_FEATURE_EXACT_ADDRESS,
    "WP_UNPOPULATED": lib.UFFD_FEATURE_WP_UNPOPULATED,
    "POISON": lib.UFFD_FEATURE_POISON,
    "WP_ASYNC": lib.UFFD_FEATURE_WP_ASYNC,
    "MOVE": lib.UFFD_FEATURE_MOVE,
}
# Write-protect on anonymous memory is the heart of CRAM's read-only mappings.
REQUIRED = FEATURES["WP"]
# THREAD_ID tells the agent's faults apart; the events let the handler reap entries of
# freed memory, follow mremap, and serve forked children; MOVE lets the agent demote by
# moving pages out (Linux 6.8+).
WANTED = REQUIRED | FEATURES["THREAD_ID"] | FEATURES["EVENT_REMOVE"] | \
    FEATURES["EVENT_UNMAP"] | FEATURES["EVENT_REMAP"] | FEATURES["EVENT_FORK"] | \
    FEATURES["MOVE"]

PERMISSION_HINT = (
    "userfaultfd is not permitted for this user. Any one of these grants it: run as root; "
    "give this user read/write access to /dev/userfaultfd (Linux 6.1+, e.g. a group or "
    "ACL); or set `sysctl vm.unprivileged_userfaultfd=1`. UFFD_USER_MODE_ONLY "
    "(UFCRAM_USER_MODE_ONLY=1) also works without a grant, but then system calls that "
    "touch a demoted page (read, write, recv, send...) fail with EFAULT, so ufcram never "
    "uses it unless asked."
)


def feature_names(mask):
    return [name for name, bit in FEATURES.items() if mask & bit]


def _raise(rc, what):
    err = -rc
    if err == errno.EAGAIN:
        raise UffdRetry(err, f"{what}: mappings are changing; read events and retry")
    if err in (errno.EPERM, errno.EACCES):
        raise UffdPermissionError(err, f"{what}: {os.strerror(err)}. {PERMISSION_HINT}")
    raise UffdError(err, f"{what}: {os.strerror(err)}")


def _check(rc, what):
    if rc < 0:
        _raise(rc, what)
    return rc


def _open_fd(user_mode_only):
    """A raw, not yet negotiated, userfaultfd: the syscall first, then /dev/userfaultfd."""
    if user_mode_only:
        return _check(lib.ufc_uffd_open_syscall(lib.UFFD_USER_MODE_ONLY),
                      "userfaultfd(UFFD_USER_MODE_ONLY)")
    fd = lib.ufc_uffd_open_syscall(0)
    if fd >= 0:
        return fd
    dev = lib.ufc_uffd_open_dev(0)
    if dev >= 0:
        return dev
    if -fd in (errno.EPERM, errno.EACCES) or -dev in (errno.EPERM, errno.EACCES):
        _raise(-errno.EPERM, "userfaultfd")
    _raise(fd, "userfaultfd (syscall and /dev/userfaultfd both failed)")


def supported_features(user_mode_only=False):
    """What this kernel offers: UFFDIO_API with no request reports every feature."""
    fd = _open_fd(user_mode_only)
    try:
        feats, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        _check(lib.ufc_uffd_api(fd, 0, feats, ioctls), "UFFDIO_API")
        return int(feats[0])
    finally:
        os.close(fd)


class Uffd:
    """One userfaultfd context. Addresses are integers; lengths are multiples of a page."""

    def __init__(self, fd, features):
        self.fd = fd
        self.features = features
        self._done = ffi.new("int64_t *")   # out-parameter of installs, reused per fault

    @classmethod
    def open(cls, want=WANTED, require=REQUIRED, user_mode_only=None):
        """Open and negotiate: UFFDIO_API may be called once per descriptor, so the
        supported set is probed on a throwaway descriptor first."""
        if user_mode_only is None:
            user_mode_only = os.environ.get("UFCRAM_USER_MODE_ONLY", "0") == "1"
        have = supported_features(user_mode_only)
        missing = require & ~have
        if missing:
            raise UffdUnsupportedError(errno.EOPNOTSUPP, "this kernel's userfaultfd lacks "
                                       f"{', '.join(feature_names(missing))}; ufcram needs "
                                       "Linux 5.19+ for write-protect on anonymous memory")
        fd = _open_fd(user_mode_only)
        feats, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        rc = lib.ufc_uffd_api(fd, want & have, feats, ioctls)
        if rc < 0:
            os.close(fd)
            _raise(rc, "UFFDIO_API")
        # the kernel echoes everything it supports; what is enabled is what we asked for
        return cls(fd, want & have)

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def has(self, name):
        return bool(self.features & FEATURES[name])

    def register(self, start, length, missing=True, wp=True):
        mode = (lib.UFFDIO_REGISTER_MODE_MISSING if missing else 0) | \
               (lib.UFFDIO_REGISTER_MODE_WP if wp else 0)
        ioctls = ffi.new("uint64_t *")
        _check(lib.ufc_uffd_register(self.fd, start, length, mode, ioctls),
               f"UFFDIO_REGISTER {start:#x}+{length:#x}")
        return int(ioctls[0])

    def unregister(self, start, length):
        _check(lib.ufc_uffd_unregister(self.fd, start, length),
               f"UFFDIO_UNREGISTER {start:#x}+{length:#x}")

    def copy(self, dst, src, length, wp=False, wake=True):
        """Install pages at dst from src (in this process); returns bytes installed.
        A page already present (EEXIST: another fault won the race) is not an error:
        the waiters are woken and 0 is returned."""
        mode = (lib.UFFDIO_COPY_MODE_WP if wp else 0) | \
               (0 if wake else lib.UFFDIO_COPY_MODE_DONTWAKE)
        rc = lib.ufc_uffd_copy(self.fd, dst, src, length, mode, self._done)
        return self._installed(rc, int(self._done[0]), dst, length, wake, "UFFDIO_COPY")

    def _installed(self, rc, done, start, length, wake, what):
        """Bytes a multi-page install put in. The kernel stops at a page already present:
        EEXIST there at the first page, else EAGAIN with the bytes done so far (it has
        woken their waiters); neither is an error to the caller, who marks only those."""
        if rc == -errno.EEXIST:
            if wake:
                self.wake(start, length)
            return max(done, 0)
        if rc == -errno.EAGAIN and done > 0:
            return done
        _check(rc, f"{what} {start:#x}+{length:#x}")
        return done

    def copy_many(self, dsts, srcs, wp=False):
        """Install one page at each dsts[i] from srcs[i] in one native call; a page that
        is already present is skipped as in copy()."""
        dsts = np.ascontiguousarray(dsts, np.uint64)
        srcs = np.ascontiguousarray(srcs, np.uint64)
        lens = np.full(len(dsts), PAGE_SIZE, np.uint64)
        results = np.zeros(len(dsts), np.int32)
        mode = lib.UFFDIO_COPY_MODE_WP if wp else 0
        lib.ufc_uffd_copy_batch(self.fd, ffi.from_buffer("uint64_t[]", dsts),
                                ffi.from_buffer("uint64_t[]", srcs),
                                ffi.from_buffer("uint64_t[]", lens), len(dsts), mode,
                                ffi.from_buffer("int32_t[]", results))
        for i in np.flatnonzero(results == -errno.EEXIST):
            self.wake(int(dsts[i]), PAGE_SIZE)
        bad = np.flatnonzero((results < 0) & (results != -errno.EEXIST))
        if len(bad):
            first = int(dsts[bad[0]])
            _raise(int(results[bad[0]]), f"UFFDIO_COPY of {len(bad)} pages, first {first:#x}")

    def zeropage(self, start, length, wake=True):
        mode = 0 if wake else lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        rc = lib.ufc_uffd_zeropage(self.fd, start, length, mode, self._done)
        return self._installed(rc, int(self._done[0]), start, length, wake, "UFFDIO_ZEROPAGE")

    def writeprotect(self, start, length, protect=True, wake=True):
        mode = (lib.UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | \
               (0 if wake else lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
        _check(lib.ufc_uffd_writeprotect(self.fd, start, length, mode),
               f"UFFDIO_WRITEPROTECT {start:#x}+{length:#x}")

    def wake(self, start, length):
        _check(lib.ufc_uffd_wake(self.fd, start, length), f"UFFDIO_WAKE {start:#x}")

    def move(self, dst, src, length, wake=True, allow_src_holes=False):
        mode = (0 if wake else lib.UFFDIO_MOVE_MODE_DONTWAKE) | \
               (lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0)
        done = ffi.new("int64_t *")
        _check(lib.ufc_uffd_move(self.fd, dst, src, length, mode, done),
               f"UFFDIO_MOVE {src:#x}->{dst:#x}+{length:#x}")
        return int(done[0])

    def poison(self, start, length, wake=True):
        """Make the pages raise SIGBUS on access: a loud failure instead of lost data."""
        done = ffi.new("int64_t *")
        mode = 0 if wake else lib.UFFDIO_POISON_MODE_DONTWAKE
        _check(lib.ufc_uffd_poison(self.fd, start, length, mode, done),
               f"UFFDIO_POISON {start:#x}+{length:#x}")
        return int(done[0])

    def read_msgs(self, buf):
        """Fill the MSG_DTYPE array buf with queued messages, without blocking."""
        assert buf.dtype == MSG_DTYPE and buf.flags.c_contiguous
        return _check(lib.ufc_uffd_read_msgs(self.fd, ffi.from_buffer(buf), len(buf)),
                      "read(userfaultfd)")

    def wait(self, timeout_ms):
        """True when messages are queued; False on timeout."""
        return bool(_check(lib.ufc_wait_readable(self.fd, timeout_ms), "poll(userfaultfd)"))


def address_of(buffer):
    """The address of a writable or read-only Python buffer (mmap, numpy array)."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buffer)))
