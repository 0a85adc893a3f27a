"""Helpers that make faults happen without holding the GIL, so that a resolver thread in
the same Python process can run: the kernel touches the memory inside a system call."""
import os
import threading

import numpy as np

from ufcram._shim import lib
from ufcram.tools.stress import threads_in_faults
from ufcram.app.uffd import MSG_DTYPE, PAGE_SIZE, address_of


def read_via_kernel(addr, length):
    """Read memory at addr through process_vm_readv on ourselves (a read fault)."""
    out = bytearray(length)
    n = lib.ufc_process_vm_readv(os.getpid(), address_of(out), addr, length)
    assert n == length, f"process_vm_readv returned {n}"
    return bytes(out)


def write_via_kernel(mm, offset, data):
    """Write data into the mapping at offset through read(2) from a pipe (a write fault)."""
    r, w = os.pipe()
    try:
        os.write(w, data)
        view = memoryview(mm)[offset:offset + len(data)]
        try:
            assert os.readv(r, [view]) == len(data)
        finally:
            view.release()
    finally:
        os.close(r)
        os.close(w)


class Resolver(threading.Thread):
    """Reads fault messages from a uffd and hands each to `resolve(uffd, msg)`."""

    def __init__(self, uffd, resolve):
        super().__init__(daemon=True)
        self.uffd, self.resolve = uffd, resolve
        self.seen = []
        self.batches = []
        self.stop = threading.Event()

    def run(self):
        buf = np.zeros(64, MSG_DTYPE)
        while not self.stop.is_set():
            if not self.uffd.wait(50):
                continue
            n = self.uffd.read_msgs(buf)
            self.batches.append(n)
            for msg in buf[:n].copy():
                self.seen.append(msg)
                self.resolve(self.uffd, msg)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(5)


def page_addr(msg):
    return int(msg["arg1"]) & ~(PAGE_SIZE - 1)


def threads_blocked_in_faults():
    """How many of our threads the kernel holds in handle_userfault right now."""
    return threads_in_faults(os.getpid())


def wait_for_blocked(n, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while threads_blocked_in_faults() < n:
        assert time.monotonic() < deadline, f"{n} threads never blocked in faults"
        time.sleep(0.01)
