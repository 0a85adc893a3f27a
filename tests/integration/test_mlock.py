"""Locked memory in managed regions: the kernel refuses to drop it (MADV_DONTNEED gives
EINVAL), so the handler pins it (resident, never demoted again) and every byte holds,
also for the pages of a batch that the refusal stopped midway. A Region in this process,
then an unmodified C program under `ufcram run` that locks part of its buffer."""
import ctypes
import errno
import time

import numpy as np
import pytest

import ufcram
from ufcram import PAGE_SIZE

from .pages import filled, text_pages
from .launch import assert_ok, ufcram_run

pytestmark = pytest.mark.timeout(90)
MiB = 1 << 20
MLOCK_ONFAULT = 1
libc = ctypes.CDLL(None, use_errno=True)


def lock(address, length, onfault=False):
    """mlock (it brings every page in, with write faults), or mlock2(MLOCK_ONFAULT),
    which locks what is there and brings nothing in."""
    rc = (libc.mlock2(ctypes.c_void_p(address), ctypes.c_size_t(length), MLOCK_ONFAULT)
          if onfault else libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(length)))
    if rc:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.ENOMEM):
            pytest.skip(f"cannot lock {length} bytes here: {errno.errorcode[err]}")
        raise OSError(err, "mlock")


def unlock(address, length):
    assert libc.munlock(ctypes.c_void_p(address), ctypes.c_size_t(length)) == 0


def resident(address, npages):
    """mincore of the pages: which are in memory."""
    vec = (ctypes.c_ubyte * npages)()
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(npages * PAGE_SIZE), vec) == 0
    return np.frombuffer(vec, np.uint8) & 1 == 1


@pytest.fixture
def node(monkeypatch):
    monkeypatch.setenv("UFCRAM_SCAN_INTERVAL", "0.1")   # the scan that notices munlock
    with ufcram.Node(capacity=64 * MiB) as n:
        yield n


def test_dirty_batch_stopped_by_a_locked_range_keeps_every_byte(node):
    """One batch, one span over three mappings (mlock split the region): the agent drops
    the first, the kernel refuses the locked one and the last stays. Every page goes
    back, the locked ones are pinned, the rest is demoted; after munlock (the scan
    notices) they can be demoted too."""
    data = text_pages(64, seed=60)
    r, a = filled(node, data)
    locked = r.address + 16 * PAGE_SIZE, 16 * PAGE_SIZE
    lock(*locked)
    assert r.demote() == 48
    s = r.stats()
    assert (s["pinned"], s["normal"], s["demoted"]) == (16, 16, 48), s
    assert resident(r.address, 64)[16:32].all()
    assert np.array_equal(a, data)
    a[16:32] ^= 0x5A                                  # locked pages: plain memory
    data[16:32] ^= 0x5A
    assert r.demote() == 48 and r.stats()["pinned"] == 16
    assert np.array_equal(a, data)
    unlock(*locked)
    deadline = time.monotonic() + 20
    while r.stats()["pinned"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.stats()["pinned"] == 0
    assert r.demote() == 64
    assert np.array_equal(a, data)
    del a
    r.close()


def test_pages_locked_after_demotion_come_back_promoted_and_stay(node):
    """mlock of demoted pages brings them in with write faults (writable on the node
    under the auto budget); once pinned they are normal memory, and no demotion is
    asked of the agent for them again."""
    data = text_pages(32, seed=61)
    r, a = filled(node, data)
    assert r.demote() == 32
    lock(r.address + 8 * PAGE_SIZE, 8 * PAGE_SIZE)
    assert r.stats()["writable"] == 8
    assert r.demote() == 0                            # the agent refused: pinned
    s = r.stats()
    assert (s["pinned"], s["normal"], s["writable"], s["demoted"]) == (8, 8, 0, 24), s
    assert r.demote() == 0 and r.stats()["demotions"] == 32
    assert resident(r.address, 32)[8:16].all()
    assert np.array_equal(a, data)
    del a
    r.close()


def test_clean_drop_stopped_by_a_locked_range_keeps_every_byte(node):
    """Read-only pages locked where they are (MLOCK_ONFAULT brings nothing in): the
    clean drop of one span stops at the locked mapping; the unlocked pages are dropped
    all the same, and the locked ones stay, pinned and promoted."""
    data = text_pages(16, seed=62)
    r, a = filled(node, data)
    r.demote()
    assert np.array_equal(a, data)                    # read back: read-only
    lock(r.address + 8 * PAGE_SIZE, 4 * PAGE_SIZE, onfault=True)
    assert r.stats()["readonly"] == 16
    assert r.demote() == 12
    s = r.stats()
    assert (s["pinned"], s["normal"], s["demoted"], s["readonly"]) == (4, 4, 12, 0), s
    assert resident(r.address, 16)[8:12].all()
    assert np.array_equal(a, data)
    a[8:12] ^= 0x33                                   # promoted: writes need no fault
    data[8:12] ^= 0x33
    assert np.array_equal(a, data)
    del a
    r.close()


def test_program_that_locks_part_of_its_demoted_buffer(build):
    """preload_progs/mlock.c: 32 MiB under a 12 MiB limit, read back, 8 MiB of it locked,
    then rewritten and verified three times; it checks every byte and that the locked
    range stays resident (mincore). The refused demotion is handled, not repeated:
    no error line from the handler, and the summary comes as ever."""
    done = ufcram_run(build("mlock"), "--demoted", limit="12M")
    assert_ok(done, "mlock")
    assert done.stdout == b"ok\n"
    assert "Invalid argument" not in done.stderr and "Traceback" not in done.stderr, \
        done.stderr
    assert done.counters()["demoted"] > 0


def test_clean_drop_does_not_reach_across_locked_demoted_pages(node):
    """Demoted pages locked where they are (MLOCK_ONFAULT): a clean drop span that
    reached across them to join the read-only pages on both sides would be refused
    whole, every time. Read back later, they are promoted by the scan."""
    data = text_pages(16, seed=63)
    r, a = filled(node, data)
    r.demote()
    for page in [*range(15, 9, -1), *range(5, -1, -1)]:   # backwards: no fault-around
        assert np.array_equal(a[page], data[page])
    lock(r.address + 6 * PAGE_SIZE, 4 * PAGE_SIZE, onfault=True)
    assert (r.stats()["readonly"], r.stats()["demoted"]) == (12, 4)
    assert r.demote() == 12
    s = r.stats()
    assert (s["pinned"], s["demoted"], s["readonly"]) == (4, 16, 0), s
    assert np.array_equal(a, data)                    # the locked ones come in read-only
    deadline = time.monotonic() + 20
    while r.stats()["normal"] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.stats()["normal"] == 4 and resident(r.address, 16)[6:10].all()
    assert r.demote() == 12
    assert np.array_equal(a, data)
    del a
    r.close()
