"""ufcram.Region end to end on the real kernel: a handler process, the agent thread,
demotion into the pool and restore on fault. Every test checks the bytes."""
import threading
import time

import numpy as np
import psutil
import pytest

import ufcram
from ufcram import PAGE_SIZE, Region, RegionClosedError, RegionError

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


@pytest.fixture(scope="module")
def node():
    with ufcram.Node(capacity=256 * MiB) as n:
        yield n


def mixed_bytes(nbytes, seed=0):
    """Random, zero, repeated and text-like pages: every kind the pool treats apart."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, nbytes, np.uint8).reshape(-1, PAGE_SIZE)
    data[1::4] = 0
    data[2::4] = np.frombuffer(b"ufcram!!", np.uint8)[np.arange(PAGE_SIZE) % 8]
    data[3::4] = rng.choice(np.frombuffer(b"the quick brown fox ", np.uint8), (1, PAGE_SIZE))
    return data.reshape(-1)


def test_random_bytes_survive_demote_and_restore(node):
    with Region(4 * MiB, node=node) as r:
        a = r.array()
        data = mixed_bytes(r.nbytes)
        a[:] = data
        assert r.demote() == r.nbytes // PAGE_SIZE
        assert r.stats()["demoted"] == r.nbytes // PAGE_SIZE
        assert np.array_equal(a, data)
        s = r.stats()
        assert s["restores"] == r.nbytes // PAGE_SIZE and s["demoted"] == 0
        del a


def test_rss_drops_by_the_demoted_size(node):
    size = 32 * MiB
    proc = psutil.Process()
    with Region(size, node=node) as r:
        a = r.array()
        data = np.random.default_rng(1).integers(0, 256, size, np.uint8)
        a[:] = data
        before = proc.memory_info().rss
        assert r.demote() == size // PAGE_SIZE
        dropped = before - proc.memory_info().rss
        assert dropped >= 0.9 * size, f"RSS fell by {dropped / MiB:.1f} MiB of {size / MiB}"
        assert np.array_equal(a[::PAGE_SIZE], data[::PAGE_SIZE])   # every page restored...
        assert proc.memory_info().rss - before > -0.1 * size   # ...and resident again
        del a


def shmem_rss():
    with open("/proc/self/status") as f:
        return int(dict(line.split(":", 1) for line in f)["RssShmem"].split()[0]) * 1024


def test_staging_memory_is_given_back_after_a_demotion(node):
    # the staging buffer (shared with the handler) holds copies only while a batch
    # is in flight; kept, it would cost every client its whole size in memory
    with Region(2 * MiB, node=node) as r:
        a = r.array()
        data = mixed_bytes(r.nbytes, seed=3)
        a[:] = data
        before = shmem_rss()
        assert r.demote() == r.nbytes // PAGE_SIZE
        assert shmem_rss() <= before
        assert np.array_equal(a, data)
        del a


def test_staging_memory_is_given_back_once_limit_demotions_pause(monkeypatch):
    # demotions under a resident limit keep the staging buffer filled while they come;
    # the periodic scan gives it back
    monkeypatch.setenv("UFCRAM_SCAN_INTERVAL", "0.2")
    baseline = shmem_rss()
    with ufcram.Node(capacity=16 * MiB) as n, \
            Region(4 * MiB, node=n, resident_limit=1 * MiB) as r:
        a = r.array()
        data = mixed_bytes(r.nbytes, seed=4)
        a[:] = data                                   # the limit demotes as it fills
        assert r.stats()["demotions"] > 0
        deadline = time.monotonic() + 10
        while shmem_rss() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shmem_rss() <= baseline
        assert np.array_equal(a, data)
        del a


def test_python_thread_reads_demoted_page_through_numpy(node):
    """In-process this deadlocks: the reading thread holds the GIL while it faults."""
    with Region(64 * PAGE_SIZE, node=node) as r:
        a = r.array(np.int64)
        a[:] = np.arange(len(a))
        r.demote()
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("sum", int(a.sum())))
        t.start()
        t.join(20)
        assert not t.is_alive(), "a numpy read of a demoted page never completed"
        assert result["sum"] == int(np.arange(len(a)).sum())
        del a


def test_partial_demote_touches_only_its_range(node):
    with Region(16 * PAGE_SIZE, node=node) as r:
        a = r.array()
        data = mixed_bytes(r.nbytes, seed=3)
        a[:] = data
        assert r.demote(4 * PAGE_SIZE, 8 * PAGE_SIZE) == 8
        s = r.stats()
        assert (s["demoted"], s["normal"]) == (8, 8)
        assert r.demote(4 * PAGE_SIZE, 8 * PAGE_SIZE) == 0   # nothing resident left there
        assert np.array_equal(a, data)
        del a


def test_untouched_pages_are_not_demoted_and_read_as_zeros(node):
    with Region(8 * PAGE_SIZE, node=node) as r:
        assert r.demote() == 0
        assert r.stats()["untouched"] == 8
        a = r.array()
        assert not a.any()
        del a


def test_write_to_demoted_page_keeps_the_rest_of_it(node):
    with Region(4 * PAGE_SIZE, node=node) as r:
        a = r.array()
        data = mixed_bytes(r.nbytes, seed=4)
        a[:] = data
        r.demote()
        a[PAGE_SIZE + 7] = 0xAB
        data[PAGE_SIZE + 7] = 0xAB
        assert np.array_equal(a, data)
        del a


def test_repeated_cycles_keep_bytes(node):
    with Region(32 * PAGE_SIZE, node=node) as r:
        a = r.array(np.uint32)
        expect = np.zeros(len(a), np.uint32)
        rng = np.random.default_rng(5)
        for cycle in range(5):
            idx = rng.integers(0, len(a), 500)
            a[idx] = expect[idx] = cycle + 1
            r.demote()
            assert np.array_equal(a, expect)
        del a


def test_writer_racing_demotion_loses_nothing(node):
    """A thread keeps writing while pages are write-protected, copied and dropped: each
    write either lands before the copy or faults and lands after the restore."""
    with Region(64 * PAGE_SIZE, node=node) as r:
        a = r.array(np.uint64).reshape(64, -1)
        a[:] = 0
        stop = threading.Event()
        written = np.zeros(64, np.uint64)

        def writer():
            n = 0
            while not stop.is_set():
                n += 1
                page = n % 64
                a[page, :] = n
                written[page] = n

        t = threading.Thread(target=writer)
        t.start()
        for _ in range(20):
            r.demote()
        stop.set()
        t.join(20)
        assert not t.is_alive()
        assert np.array_equal(a, np.repeat(written[:, None], a.shape[1], 1))
        del a


def test_full_pool_refuses_and_keeps_data():
    with ufcram.Node(capacity=0) as tiny, Region(16 * PAGE_SIZE, node=tiny) as r:
        a = r.array()
        data = np.random.default_rng(6).integers(0, 256, r.nbytes, np.uint8)
        a[:] = data
        assert r.demote() == 0
        s = r.stats()
        assert s["refused_full"] == 16 and s["normal"] == 16
        assert np.array_equal(a, data)
        del a


def test_close_with_live_view_restores_its_bytes(node):
    r = Region(8 * PAGE_SIZE, node=node)
    a = r.array()
    data = mixed_bytes(r.nbytes, seed=7)
    a[:] = data
    r.demote()
    r.close()
    assert np.array_equal(a, data)
    a[:] = 1                         # plain memory now
    assert a.sum() == r.nbytes


def test_close_releases_pool_entries(node):
    before = node.stats()["pages_stored"]
    with Region(16 * PAGE_SIZE, node=node) as r:
        a = r.array()
        a[:] = np.random.default_rng(8).integers(0, 256, r.nbytes, np.uint8)
        r.demote()
        assert node.stats()["pages_stored"] == before + 16
        del a
    assert node.stats()["pages_stored"] == before


@pytest.mark.parametrize("offset,length", [
    (1, PAGE_SIZE), (0, PAGE_SIZE + 1), (0, 0), (-PAGE_SIZE, PAGE_SIZE),
    (0, 9 * PAGE_SIZE), (8 * PAGE_SIZE, PAGE_SIZE)])
def test_bad_ranges_are_refused_and_corrupt_nothing(node, offset, length):
    with Region(8 * PAGE_SIZE, node=node) as r:
        a = r.array()
        data = mixed_bytes(r.nbytes, seed=9)
        a[:] = data
        with pytest.raises(RegionError):
            r.demote(offset, length)
        assert r.stats()["demoted"] == 0
        assert np.array_equal(a, data)
        del a


@pytest.mark.parametrize("nbytes", [0, -1, 1.5, "4096", True])
def test_bad_sizes_are_refused(node, nbytes):
    with pytest.raises(RegionError):
        Region(nbytes, node=node)


def test_size_rounds_up_to_pages(node):
    with Region(PAGE_SIZE + 1, node=node) as r:
        assert r.nbytes == 2 * PAGE_SIZE


def test_array_views_are_checked(node):
    with Region(2 * PAGE_SIZE, node=node) as r:
        assert r.array(np.float64, (16, 64)).shape == (16, 64)
        with pytest.raises(RegionError):
            r.array(np.float64, (3, PAGE_SIZE))
        with pytest.raises(RegionError):
            r.array(offset=-1)


def test_use_after_close_raises(node):
    r = Region(PAGE_SIZE, node=node)
    r.close()
    r.close()   # idempotent
    for call in (r.demote, r.stats, r.array):
        with pytest.raises(RegionClosedError):
            call()


def test_closing_the_node_closes_its_regions():
    n = ufcram.Node(capacity=16 * MiB)
    r = Region(PAGE_SIZE, node=n)
    n.close()
    assert r.closed and n.closed
    with pytest.raises(RegionClosedError):
        Region(PAGE_SIZE, node=n)
    assert n.process.returncode == 0


DEAD_HANDLER = """
import numpy as np, ufcram
n = ufcram.Node(capacity=16 << 20)
r = ufcram.Region(4 * 4096, node=n)
a = r.array()
a[:] = 7
n.process.kill()
n.process.wait(10)
for call in (r.demote, n.close):
    try:
        call()
        print("no error")
    except ufcram.HandlerError as e:
        print("exited" in str(e))
print(bool((a == 7).all()), n.closed, r.closed)
"""


def test_dead_handler_is_a_clear_error_not_zeros():
    """Requests after the handler died fail loudly, naming it; resident data stays, and
    the process still exits. In its own process: that process keeps its uffd open on
    purpose (lost pages must block, not read zeros), which would stall later forks."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", DEAD_HANDLER], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True", "True", "True"]
