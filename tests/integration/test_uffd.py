"""ufcram.uffd on the real kernel: each ioctl resolves or raises real faults."""
import mmap
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ufcram._shim import lib
from ufcram.app.uffd import FEATURES, FLAG_WP, FLAG_WRITE, PAGE_SIZE, REQUIRED, Uffd, address_of

from .faults import Resolver, page_addr, read_via_kernel, wait_for_blocked, write_via_kernel

pytestmark = pytest.mark.timeout(30)


# No event features here: an event (e.g. REMOVE from the demote primitive's drop) blocks
# its thread until read, and these tests read only faults.
FAULTS_ONLY = REQUIRED | FEATURES["THREAD_ID"]


@pytest.fixture
def area():
    """A registered anonymous area of 16 pages and its uffd."""
    uffd = Uffd.open(want=FAULTS_ONLY)
    mm = mmap.mmap(-1, 16 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = address_of(mm)
    uffd.register(base, len(mm))
    yield uffd, mm, base
    uffd.unregister(base, len(mm))
    mm.close()
    uffd.close()


def pattern(seed):
    return np.random.default_rng(seed).integers(0, 256, PAGE_SIZE, np.uint8)


def populate(uffd, addr, page):
    """Fill a missing page without faulting: touching it from this thread, which holds
    the GIL, would deadlock with an in-process resolver."""
    assert uffd.copy(addr, address_of(page), PAGE_SIZE) == PAGE_SIZE


def test_open_negotiates_write_protect():
    uffd = Uffd.open(want=REQUIRED)
    try:
        assert uffd.has("WP")
        assert not uffd.has("THREAD_ID")   # only what was asked for is enabled
    finally:
        uffd.close()


def test_missing_fault_resolved_by_copy(area):
    uffd, mm, base = area
    src = pattern(1)
    with Resolver(uffd, lambda u, m: u.copy(page_addr(m), address_of(src), PAGE_SIZE)) as r:
        got = read_via_kernel(base + 3 * PAGE_SIZE, PAGE_SIZE)
    assert got == src.tobytes()
    assert [page_addr(m) for m in r.seen] == [base + 3 * PAGE_SIZE]
    assert not int(r.seen[0]["arg0"]) & FLAG_WP


def test_missing_fault_resolved_by_zeropage(area):
    uffd, mm, base = area
    populate(uffd, base, np.zeros(PAGE_SIZE, np.uint8))   # page 0 present: no fault there
    with Resolver(uffd, lambda u, m: u.zeropage(page_addr(m), PAGE_SIZE)) as r:
        got = read_via_kernel(base + 5 * PAGE_SIZE, 2 * PAGE_SIZE)
    assert got == bytes(2 * PAGE_SIZE)
    assert sorted(page_addr(m) for m in r.seen) == [base + 5 * PAGE_SIZE, base + 6 * PAGE_SIZE]


def test_write_protect_fault_delivered_and_cleared(area):
    uffd, mm, base = area
    populate(uffd, base, pattern(2))
    uffd.writeprotect(base, PAGE_SIZE, protect=True)
    with Resolver(uffd, lambda u, m: u.writeprotect(page_addr(m), PAGE_SIZE, False)) as r:
        write_via_kernel(mm, 100, b"hello")
    assert mm[100:105] == b"hello"
    assert mm[:100] == pattern(2).tobytes()[:100]
    flags = int(r.seen[0]["arg0"])
    assert flags & FLAG_WP and flags & FLAG_WRITE


def test_copy_mode_wp_gives_readable_page_whose_write_faults(area):
    uffd, mm, base = area
    src = pattern(3)
    uffd.copy(base, address_of(src), PAGE_SIZE, wp=True)
    assert mm[:PAGE_SIZE] == src.tobytes()            # readable without a fault
    with Resolver(uffd, lambda u, m: u.writeprotect(page_addr(m), PAGE_SIZE, False)) as r:
        write_via_kernel(mm, 0, b"\xff" * 8)
    assert len(r.seen) == 1 and int(r.seen[0]["arg0"]) & FLAG_WP
    assert mm[:8] == b"\xff" * 8 and mm[8:PAGE_SIZE] == src.tobytes()[8:]


def test_copy_onto_present_page_is_benign(area):
    uffd, mm, base = area
    populate(uffd, base, np.frombuffer(b"keep" * 1024, np.uint8))
    src = pattern(4)
    assert uffd.copy(base, address_of(src), PAGE_SIZE) == 0
    assert mm[:4] == b"keep"


def test_multi_page_ioctls_stop_at_a_present_page_and_say_how_far(area):
    # fault-around marks only the pages a multi-page ioctl installed
    uffd, mm, base = area
    populate(uffd, base + 2 * PAGE_SIZE, np.frombuffer(b"keep" * 1024, np.uint8))
    assert uffd.zeropage(base, 4 * PAGE_SIZE) == 2 * PAGE_SIZE
    src = np.tile(pattern(5), 4)
    populate(uffd, base + 6 * PAGE_SIZE, np.frombuffer(b"keep" * 1024, np.uint8))
    assert uffd.copy(base + 4 * PAGE_SIZE, address_of(src), 4 * PAGE_SIZE) == 2 * PAGE_SIZE
    assert mm[:2 * PAGE_SIZE] == bytes(2 * PAGE_SIZE)
    assert mm[2 * PAGE_SIZE:2 * PAGE_SIZE + 4] == b"keep"
    assert mm[4 * PAGE_SIZE:6 * PAGE_SIZE] == src[:2 * PAGE_SIZE].tobytes()
    assert mm[6 * PAGE_SIZE:6 * PAGE_SIZE + 4] == b"keep"


def test_batched_read_of_many_faults(area):
    """Eight faults queued before the resolver starts arrive in one batched read."""
    import threading
    uffd, mm, base = area
    pages = {i: pattern(10 + i) for i in range(8)}

    def resolve(u, m):
        i = (page_addr(m) - base) // PAGE_SIZE
        u.copy(page_addr(m), address_of(pages[i]), PAGE_SIZE)

    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, read_via_kernel(base + i * PAGE_SIZE, PAGE_SIZE))) for i in pages]
    for t in threads:
        t.start()
    wait_for_blocked(len(threads))
    with Resolver(uffd, resolve) as r:
        for t in threads:
            t.join(10)
    assert {i: results[i] for i in pages} == {i: p.tobytes() for i, p in pages.items()}
    assert sorted(page_addr(m) for m in r.seen) == [base + i * PAGE_SIZE for i in pages]
    assert r.batches[0] == 8


def test_demote_primitive_round_trip(area):
    """The agent's demotion (write-protect, copy out, drop) leaves a missing page whose
    next read is a MISSING fault, never a silent zero page."""
    from ufcram._shim import ffi
    uffd, mm, base = area
    data = pattern(5).tobytes()
    populate(uffd, base + PAGE_SIZE, pattern(5))
    staging = bytearray(PAGE_SIZE)
    runs = ffi.new("struct ufc_run[1]", [(base + PAGE_SIZE, PAGE_SIZE)])
    out = ffi.new("uint64_t *")
    assert lib.ufc_agent_demote(uffd.fd, runs, 1, address_of(staging), PAGE_SIZE, out) == 0
    assert bytes(staging) == data and out[0] == PAGE_SIZE
    with Resolver(uffd, lambda u, m: u.copy(page_addr(m), address_of(staging), PAGE_SIZE)) as r:
        assert read_via_kernel(base + PAGE_SIZE, PAGE_SIZE) == data
    assert len(r.seen) == 1 and not int(r.seen[0]["arg0"]) & FLAG_WP


def test_demote_primitive_rejects_bad_runs(area):
    from ufcram._shim import ffi
    uffd, mm, base = area
    populate(uffd, base, np.full(PAGE_SIZE, ord("x"), np.uint8))
    staging = bytearray(PAGE_SIZE)
    out = ffi.new("uint64_t *")
    unaligned = ffi.new("struct ufc_run[1]", [(base + 1, PAGE_SIZE)])
    too_big = ffi.new("struct ufc_run[1]", [(base, 2 * PAGE_SIZE)])
    assert lib.ufc_agent_demote(uffd.fd, unaligned, 1, address_of(staging), PAGE_SIZE, out) \
        == -22
    assert lib.ufc_agent_demote(uffd.fd, too_big, 1, address_of(staging), PAGE_SIZE, out) == -7
    assert mm[:PAGE_SIZE] == b"x" * PAGE_SIZE   # untouched, still writable
    mm[0:1] = b"y"
    assert mm[:2] == b"yx"


RESOLVER_CHILD = textwrap.dedent("""
    import socket, sys, numpy as np
    from ufcram.app.uffd import Uffd, MSG_DTYPE, WANTED, address_of
    sock = socket.socket(fileno=int(sys.argv[1]))
    _, fds, _, _ = socket.recv_fds(sock, 16, 1)
    uffd = Uffd(fds[0], WANTED)
    buf = np.zeros(8, MSG_DTYPE)
    page = np.empty(4096, np.uint8)
    served = 0
    while served < int(sys.argv[2]):
        uffd.wait(5000)
        for m in buf[:uffd.read_msgs(buf)]:
            addr = int(m["arg1"]) & ~4095
            page[:] = (addr >> 12) & 0xFF     # each page's bytes name the page
            uffd.copy(addr, address_of(page), 4096)
            served += 1
    sock.send(b"done")
""")


def test_descriptor_passed_to_another_process_that_resolves_faults():
    """The architecture of ufcram: the faulting process holds the GIL while it reads a
    missing page through numpy; only a resolver in another process can serve it."""
    uffd = Uffd.open(want=FAULTS_ONLY)
    mm = mmap.mmap(-1, 4 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = address_of(mm)
    uffd.register(base, len(mm))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = subprocess.Popen([sys.executable, "-c", RESOLVER_CHILD, str(theirs.fileno()), "4"],
                             pass_fds=[theirs.fileno()])
    theirs.close()
    from ufcram._shim import ffi
    assert lib.ufc_send_fds(ours.fileno(), b"uffd", 4, ffi.new("int[1]", [uffd.fd]), 1) == 4
    view = np.frombuffer(mm, np.uint8).reshape(4, PAGE_SIZE)
    sums = [int(view[i].sum()) for i in range(4)]   # four faults, GIL held throughout
    assert ours.recv(8) == b"done"
    assert child.wait(10) == 0
    assert sums == [((base >> 12) + i & 0xFF) * PAGE_SIZE for i in range(4)]
    del view
    uffd.unregister(base, len(mm))
    mm.close()
    uffd.close()
    os.close(ours.detach())
