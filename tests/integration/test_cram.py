"""CRAM semantics on the real kernel: every transition of the page state machine, the
write budget, overflow, resident limits, reaping, fork, and a shared node. Each test
checks the bytes, not only the counters. Races with a demotion in flight are in
test_in_flight.py."""
import ctypes
import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ufcram
from ufcram import PAGE_SIZE, Region

from .pages import filled, random_pages, text_pages

pytestmark = pytest.mark.timeout(90)
MiB = 1 << 20
libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def node():
    with ufcram.Node(capacity=64 * MiB) as n:
        yield n


def test_read_fault_maps_read_only_and_keeps_the_entry(node):
    data = text_pages(8)
    r, a = filled(node, data)
    stored = node.stats()["pages_stored"]
    assert r.demote() == 8
    assert node.stats()["pages_stored"] == stored + 8
    assert np.array_equal(a, data)
    s = r.stats()
    assert (s["readonly"], s["demoted"], s["restores"]) == (8, 0, 8)
    assert node.stats()["pages_stored"] == stored + 8     # entries kept while mapped R/O
    faults = r.stats()["faults"]
    a[3, 0] ^= 0xFF                                       # the kernel really maps it R/O:
    assert r.stats()["faults"] == faults + 1              # a write faults, exactly once
    assert r.stats()["readonly"] == 7
    del a
    r.close()


def test_clean_read_only_pages_are_demoted_again_without_recompression(node):
    data = text_pages(8, seed=1)
    r, a = filled(node, data)
    r.demote()
    assert np.array_equal(a, data)                      # now read-only
    before = node.stats()
    assert r.demote() == 8
    s = r.stats()
    assert (s["clean_redemotions"], s["demotions"], s["demoted"]) == (8, 8, 8)
    after = node.stats()
    assert after["pages_stored"] == before["pages_stored"]
    assert after["compr_data_size"] == before["compr_data_size"]
    assert np.array_equal(a, data)
    del a
    r.close()


def test_clean_drop_reaches_across_demoted_pages_and_spares_the_rest(node):
    # read-only pages between demoted ones go in one drop (its span crosses the
    # demoted pages); a written page in between must keep its bytes, and so must all
    data = text_pages(16, seed=4)
    r, a = filled(node, data)
    r.demote()
    assert np.array_equal(a[0:16:2, 0], data[0:16:2, 0])      # even pages: read-only
    a[6, 1] ^= 0xFF                                          # page 6: written
    data[6, 1] ^= 0xFF
    before = r.stats()
    assert r.demote() == 8                                   # 7 clean drops, 1 dirty
    s = r.stats()
    assert s["clean_redemotions"] - before["clean_redemotions"] == 7
    assert s["demotions"] - before["demotions"] == 1
    assert (s["demoted"], s["readonly"], s["resident"]) == (16, 0, 0)
    assert np.array_equal(a, data)
    del a
    r.close()


def test_write_under_budget_makes_the_page_writable_on_the_node(node):
    data = text_pages(4, seed=2)
    r, a = filled(node, data, write_budget=4)
    r.demote()
    assert np.array_equal(a, data)                      # read-only
    stored = node.stats()["pages_stored"]
    a[1, 10] ^= 0xFF                                    # write fault on a read-only page
    data[1, 10] ^= 0xFF
    s = r.stats()
    assert (s["writable"], s["readonly"], s["promotions"]) == (1, 3, 0)
    assert node.stats()["pages_stored"] == stored - 1  # the stale copy is reaped
    assert np.array_equal(a, data)
    assert r.demote() == 4                              # 3 clean drops, 1 recompressed
    s = r.stats()
    assert (s["writable"], s["clean_redemotions"], s["demotions"]) == (0, 3, 5)
    assert np.array_equal(a, data)
    del a
    r.close()


def test_write_to_demoted_page_goes_straight_to_writable(node):
    data = text_pages(2, seed=3)
    r, a = filled(node, data, write_budget=8)
    r.demote()
    a[0, 0] = 42                                        # MISSING fault with write intent
    data[0, 0] = 42
    s = r.stats()
    assert (s["writable"], s["demoted"], s["readonly"]) == (1, 1, 0)
    assert np.array_equal(a, data)
    del a
    r.close()


def test_exhausted_budget_promotes(node):
    data = text_pages(10, seed=4)
    r, a = filled(node, data, write_budget=4)
    r.demote()
    a[:, 5] = 7
    data[:, 5] = 7
    s = r.stats()
    assert (s["writable"], s["promotions"], s["budget_refusals"]) == (4, 6, 6)
    assert s["normal"] == 6
    assert np.array_equal(a, data)
    del a
    r.close()


def test_zero_budget_is_read_only_cram(node):
    data = text_pages(3, seed=5)
    r, a = filled(node, data, write_budget=0)
    r.demote()
    assert np.array_equal(a, data)
    a[2, :] = 1
    data[2, :] = 1
    s = r.stats()
    assert (s["writable"], s["promotions"], s["readonly"]) == (0, 1, 2)
    assert np.array_equal(a, data)
    del a
    r.close()


def test_auto_budget_never_lets_capacity_be_exceeded():
    """Incompressible data written into writable node pages: however they are demoted
    again, the pool stays within its physical capacity and no byte is lost."""
    cap = 2 * MiB
    with ufcram.Node(capacity=cap) as n:
        data = random_pages(256, seed=6)                # 1 MiB, stored raw
        r, a = filled(n, data, write_budget="auto")
        assert r.demote() == 256
        assert np.array_equal(a, data)                  # read-only now
        a[:, 0] ^= 1                                    # every page written
        data[:, 0] ^= 1
        s, ns = r.stats(), n.stats()
        assert s["writable"] + s["promotions"] == 256
        assert s["writable"] * (PAGE_SIZE + 32) <= cap - ns["mem_used_total"] + PAGE_SIZE + 32
        r.demote()
        ns = n.stats()
        assert ns["mem_used_total"] <= cap and ns["mem_used_max"] <= cap
        assert np.array_equal(a, data)
        del a
        r.close()


def test_auto_budgets_share_one_count_of_writable_pages():
    # the count every auto budget reads is kept as pages change; it must equal the
    # regions' own tallies through writes, demotions and regions coming and going
    with ufcram.Node(capacity=64 * MiB) as n:
        def check():
            ns = n.stats()
            stats = [x.stats() for x in regions]
            auto = sum(s["writable"] for s in stats if s["write_budget"] == "auto")
            assert ns["auto_budget_writable_pages"] == auto
        regions = []
        for budget in ("auto", 8, "auto"):
            data = text_pages(32, seed=len(regions))
            r, a = filled(n, data, write_budget=budget)
            r.demote()
            a[::2, 0] ^= 1                              # writes onto node pages
            data[::2, 0] ^= 1
            assert np.array_equal(a, data)
            regions.append(r)
            del a
        check()
        regions[0].demote(0, 8 * PAGE_SIZE)
        check()
        regions.pop(0).close()
        check()
        assert n.stats()["auto_budget_writable_pages"] > 0
        for r in regions:
            r.close()
        regions.clear()
        check()


def test_overflow_closes_the_node_promotes_and_loses_nothing():
    with ufcram.Node(capacity=1 * MiB) as n:
        data = random_pages(512, seed=7)                # 2 MiB incompressible: cannot fit
        r, a = filled(n, data)
        demoted = r.demote()
        ns = n.stats()
        assert 0 < demoted < 512
        s = r.stats()
        assert ns["overflow_events"] == 1 and s["refused_full"] + s["refused_closed"] > 0
        assert np.array_equal(a, data)
        n.set_capacity(MiB // 4)                        # shrink below use: promote back
        r.stats()                                       # (a round trip: relief has run)
        ns = n.stats()
        assert ns["mem_used_total"] <= MiB // 4 and not ns["node_closed"]
        assert ns["overflow_events"] == 1               # already closed: no new event
        assert r.stats()["promotions"] > 0
        assert np.array_equal(a, data)
        del a
        r.close()


def test_resident_limit_demotes_the_coldest_pages(node):
    limit = 64 * PAGE_SIZE
    with Region(512 * PAGE_SIZE, node=node, resident_limit=limit) as r:
        a = r.array(np.uint8, (512, PAGE_SIZE))
        data = text_pages(512, seed=8)
        for i in range(0, 512, 32):                      # touch in chunks, as a program would
            a[i:i + 32] = data[i:i + 32]
        s = r.stats()
        assert s["resident"] <= 64 + 32 and s["demotions"] > 0
        assert np.array_equal(a, data)
        assert r.stats()["resident"] <= 64 + 32
        del a


def test_madvise_dontneed_reaps_entries_and_reads_zeros(node):
    data = text_pages(8, seed=9)
    r, a = filled(node, data)
    r.demote()
    stored = node.stats()["pages_stored"]
    r._mm.madvise(mmap.MADV_DONTNEED, 2 * PAGE_SIZE, 4 * PAGE_SIZE)
    assert r.stats()["reaped"] == 4
    assert node.stats()["pages_stored"] == stored - 4
    data[2:6] = 0
    assert np.array_equal(a, data)
    del a
    r.close()


def test_munmap_reaps_entries(node):
    data = text_pages(8, seed=10)
    r, a = filled(node, data)
    r.demote()
    stored = node.stats()["pages_stored"]
    assert libc.munmap(ctypes.c_void_p(r.address + 6 * PAGE_SIZE), 2 * PAGE_SIZE) == 0
    assert r.stats()["reaped"] == 2
    assert node.stats()["pages_stored"] == stored - 2
    assert np.array_equal(a[:6], data[:6])
    del a
    r.close()


def test_forked_child_reads_the_parents_demoted_pages(node):
    data = text_pages(16, seed=11)
    r, a = filled(node, data, write_budget=2)
    r.demote()
    a[0]                                                 # page 0 read-only in the parent
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                         # the child: no Python state used
        ok = np.array_equal(a, data)
        a[3, :] = 9                                      # the child's write stays its own
        ok = ok and bool((a[3] == 9).all())
        os.write(wfd, b"1" if ok else b"0")
        os._exit(0)
    os.close(wfd)
    assert os.read(rfd, 1) == b"1", "the child saw different bytes"
    os.close(rfd)
    assert os.waitpid(pid, 0)[1] == 0
    assert np.array_equal(a, data)                       # the parent's data undisturbed
    del a
    r.close()


def test_region_requests_from_a_forked_child_are_refused(node):
    r = Region(PAGE_SIZE, node=node)
    pid = os.fork()
    if pid == 0:
        try:
            r.demote()
            os._exit(1)
        except ufcram.HandlerError:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert r.stats()["pages"] == 1                       # the parent's stream is intact
    r.close()


CLIENT = textwrap.dedent("""
    import sys, numpy as np, ufcram
    from ufcram import protocol as P
    node = ufcram.Node.connect(sys.argv[1])
    r = ufcram.Region(64 * 4096, node=node)
    a = r.array()
    a[:] = np.random.default_rng(1).integers(0, 256, r.nbytes, np.uint8)
    r.demote()
    print(r.id, flush=True)
    if sys.argv[2] == "probe":       # region ids that exist only in the other client
        for rid in (2, 3):
            for op, fields in ((P.STATS, (rid,)), (P.DEMOTE, (rid, 0, 4096)),
                               (P.UNREGISTER, (rid, 1))):
                try:
                    node.connection.call(op, *fields)
                    print("LEAK", op, rid, flush=True)
                except ufcram.HandlerError as e:
                    print("refused" if "no region" in str(e) else f"other {e}", flush=True)
    sys.stdin.read()
""")


def spawn_client(path, mode):
    p = subprocess.Popen([sys.executable, "-c", CLIENT, str(path), mode], text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return p, p.stdout.readline().strip()


def test_killed_client_entries_are_freed(tmp_path):
    path = tmp_path / "node.sock"
    with ufcram.Node(capacity=16 * MiB, path=path) as n:
        base = n.stats()["pages_stored"]
        p, _ = spawn_client(path, "idle")
        assert n.stats()["pages_stored"] == base + 64
        p.kill()
        p.wait(10)
        for _ in range(100):
            if n.stats()["pages_stored"] == base:
                break
        assert n.stats()["pages_stored"] == base


def test_two_clients_on_one_node_cannot_reach_each_other(tmp_path):
    path = tmp_path / "node.sock"
    with ufcram.Node(capacity=16 * MiB, path=path) as n:
        mine = [Region(16 * PAGE_SIZE, node=n) for _ in range(3)]   # ids 1, 2, 3 here
        views = [r.array() for r in mine]
        data = [random_pages(16, seed=20 + i).reshape(-1) for i in range(3)]
        for v, d, r in zip(views, data, mine):
            v[:] = d
            r.demote()
        p, rid = spawn_client(path, "probe")            # the other has only its id 1
        answers = [p.stdout.readline().strip() for _ in range(6)]
        p.stdin.close()
        p.wait(10)
        assert rid == "1" and answers == ["refused"] * 6
        for v, d, r in zip(views, data, mine):
            assert r.stats()["demoted"] == 16           # untouched by the other client
            assert np.array_equal(v, d)
        assert {c["pid"] for c in n.stats()["per_client"]} == {os.getpid()}
        del views, v
        for r in mine:
            r.close()


MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]


def move_pages(old, length):
    """mremap [old, old + length) to a fresh address; returns the new address."""
    spot = libc.mmap(None, length, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    new = libc.mremap(ctypes.c_void_p(old), length, length,
                      MREMAP_MAYMOVE | MREMAP_FIXED, ctypes.c_void_p(spot))
    assert new == spot, f"mremap failed: errno {ctypes.get_errno()}"
    return new


@pytest.mark.parametrize("moved_pages", [8, 4])
def test_mremap_moves_demoted_pages_with_their_entries(node, moved_pages):
    """The whole region, or its second half, moves; its demoted pages come back at
    the new address, and what stayed keeps its bytes."""
    data = text_pages(8, seed=30)
    r, a = filled(node, data)
    r.demote()
    stored = node.stats()["pages_stored"]
    start = r.address + (8 - moved_pages) * PAGE_SIZE
    new = move_pages(start, moved_pages * PAGE_SIZE)
    moved = np.frombuffer(ctypes.string_at(new, moved_pages * PAGE_SIZE), np.uint8)
    assert np.array_equal(moved.reshape(moved_pages, PAGE_SIZE), data[8 - moved_pages:])
    assert np.array_equal(a[:8 - moved_pages], data[:8 - moved_pages])
    assert node.stats()["pages_stored"] == stored   # nothing reaped, nothing leaked
    del a
    r.close()
    libc.munmap(ctypes.c_void_p(new), moved_pages * PAGE_SIZE)


def test_scan_reaps_an_exited_forked_child(monkeypatch):
    """A fork gives the child a client of its own; nothing tells the handler when it
    exits, so the periodic scan finds out and releases the child's hold."""
    monkeypatch.setenv("UFCRAM_SCAN_INTERVAL", "0.1")
    with ufcram.Node(capacity=16 * MiB) as n:
        data = text_pages(4, seed=40)
        r, a = filled(n, data)
        r.demote()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.read(rfd, 1)                   # exit when the parent says so
            os._exit(0)
        full, summary = n.stats(), n.stats(summary=True)
        forked = [c for c in full["per_client"] if c["forked"]]
        assert len(forked) == 1 and forked[0]["demoted"] == 4
        # the summary `ufcram run` samples: the totals, counted over forked children too
        assert "per_client" not in summary
        assert summary["demoted_pages"] == sum(c["demoted"] for c in full["per_client"]) == 8
        assert summary["pages_stored"] == full["pages_stored"]
        os.write(wfd, b"x")
        os.waitpid(pid, 0)
        for _ in range(200):
            if not any(c["forked"] for c in n.stats()["per_client"]):
                break
            import time
            time.sleep(0.02)
        assert not any(c["forked"] for c in n.stats()["per_client"])
        assert np.array_equal(a, data)        # the parent's entries were not released
        a[0, 0] ^= 1                           # ...and are writable and freeable as before
        data[0, 0] ^= 1
        assert np.array_equal(a, data)
        del a
        r.close()
        assert n.stats()["pages_stored"] == 0
        os.close(rfd)
        os.close(wfd)


@pytest.mark.root
def test_a_shared_node_is_reachable_only_by_its_user(tmp_path):
    """Needs root to become another user (nobody) for the attempt."""
    path = tmp_path / "node.sock"
    os.chmod(tmp_path, 0o755)
    with ufcram.Node(capacity=MiB, path=path) as n:
        ufcram.Node.connect(path).close()     # the owner can (and the socket exists)
        pid = os.fork()
        if pid == 0:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(str(path))
                os._exit(1)
            except PermissionError:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0, "another user could connect"
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert len(n.stats()["per_client"]) == 1


def test_fault_around_restores_sequential_runs_and_not_random_ones(node):
    data = text_pages(256, seed=50)
    r, a = filled(node, data)
    r.demote()
    before = r.stats()["faults"]
    assert np.array_equal(a, data)                    # a sequential scan
    s = r.stats()
    assert s["readonly"] == 256 and s["faults"] - before <= 256 // 4
    r.demote()
    before = r.stats()["faults"]
    for start in (0, 1):                               # every other page: never sequential
        for p in range(start, 256, 2):
            assert np.array_equal(a[p], data[p])
    assert r.stats()["faults"] - before == 256
    del a
    r.close()
