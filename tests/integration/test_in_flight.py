"""Races with a demotion in flight, on the real kernel: the application writes, frees
or holds an event unread while the agent moves out, or copies and drops, its pages. Each
test checks the bytes of every page afterwards."""
import ctypes
import mmap
import os
import threading

import numpy as np
import pytest

import ufcram
from ufcram import PAGE_SIZE, Region

from .faults import write_via_kernel
from .pages import filled, text_pages

pytestmark = pytest.mark.timeout(90)
MiB = 1 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@pytest.fixture(scope="module", params=["1", "0"], ids=["move", "copy"])
def node(request):
    """A node that demotes dirty pages by moving them out (UFFDIO_MOVE), or by copy."""
    old = os.environ.get("UFCRAM_MOVE")
    os.environ["UFCRAM_MOVE"] = request.param   # read by the handler as it starts
    try:
        n = ufcram.Node(capacity=64 * MiB)
    finally:
        os.environ.pop("UFCRAM_MOVE")
        if old is not None:
            os.environ["UFCRAM_MOVE"] = old
    with n:
        yield n


def test_refused_pages_come_back_while_events_are_pending():
    """The pool refuses a batch while another thread keeps a REMOVE event pending: the
    kernel answers the put-back's UFFDIO_COPY with EAGAIN until the event is read.
    Every refused page must still come back with its bytes, none left in flight."""
    with ufcram.Node(capacity=8 * PAGE_SIZE) as n:      # refuses nearly every store
        r = Region(16 * MiB, node=n, write_budget=0)
        other = Region(PAGE_SIZE, node=n)
        a = r.array()
        data = np.random.default_rng(0).integers(0, 256, r.nbytes, np.uint8)
        a[:] = data
        stop = threading.Event()

        def remover():   # no GIL held inside madvise: the handler is another process
            while not stop.is_set():
                libc.madvise(other.address, PAGE_SIZE, mmap.MADV_DONTNEED)
        t = threading.Thread(target=remover, daemon=True)
        t.start()
        try:
            for _ in range(3):
                r.demote()
                assert r.stats()["demoting"] == 0
        finally:
            stop.set()
            t.join(5)
        assert np.array_equal(a, data)
        del a
        r.close()
        other.close()


def demote_while(region, step):
    """region.demote(), while another thread calls step() over and over: the demotion
    goes to the agent in batches, so steps land while batches are in flight."""
    stop = threading.Event()

    def repeat():
        while not stop.is_set():
            step()
    t = threading.Thread(target=repeat, daemon=True)
    t.start()
    try:
        region.demote()
    finally:
        stop.set()
        t.join(10)


def test_pages_written_while_earlier_batches_demote_keep_their_bytes(node):
    """A demotion of many read-only pages goes to the agent in batches, and faults are
    served while each batch waits on it. A page written meanwhile (read-only, then
    writable with its entry reaped) must be demoted as the dirty page it now is, not
    dropped with a later batch as the clean one it was when the demotion began."""
    npages = 4096
    data = text_pages(npages, seed=9)
    r, a = filled(node, data)
    flat = r.array()
    rng, written = np.random.default_rng(1), []

    def write():   # through the kernel: no GIL held while its fault waits
        page = 2 * int(rng.integers(npages // 4, npages // 2))   # later batches
        value = bytes([int(rng.integers(0, 256))])
        write_via_kernel(flat, page * PAGE_SIZE + 7, value)
        data[page, 7] = value[0]
        written.append(page)
    for _ in range(4):
        r.demote()
        # even pages read-only, odd ones demoted: one run per page, so the read-only
        # pages take several agent batches (256 runs each)
        assert np.array_equal(a[::2, 0], data[::2, 0])
        demote_while(r, write)
        assert r.stats()["demoting"] == 0
    assert written, "the writer never ran"
    bad = np.flatnonzero((a != data).any(axis=1))
    assert len(bad) == 0, f"{len(bad)} pages wrong, first {bad[:5]}"
    del a, flat
    r.close()


def test_pages_freed_while_demoted_read_zeros(node):
    """The application frees pages while a demotion copies them out: each must read
    zeros after, never its staged copy. A free of exactly one run being copied must
    not be taken for the agent's own drop of it."""
    npages = 2048
    data = text_pages(npages, seed=11)
    r, a = filled(node, data)
    r.demote()
    dirty = np.arange(1, npages, 2)   # one-page runs: each a run of the copy
    for round_ in range(6):
        a[dirty, 0] = round_           # written: dirty, between demoted pages
        data[dirty, 0] = round_
        rng, freed = np.random.default_rng(round_), []

        def free():   # madvise through ctypes: no GIL held while its event waits
            page = int(rng.choice(dirty))
            libc.madvise(r.address + page * PAGE_SIZE, PAGE_SIZE, mmap.MADV_DONTNEED)
            freed.append(page)
        demote_while(r, free)
        freed = np.unique(freed)   # a slow demotion sees the same pages freed many times
        data[freed] = 0
        assert len(freed), "the freer never ran"
        bad = np.flatnonzero((a != data).any(axis=1))
        assert len(bad) == 0, f"{len(bad)} pages wrong, first {bad[:5]}"
        a[freed] = data[freed] = text_pages(len(freed), seed=round_)
    del a
    r.close()
