"""The fault engine (native/engine/) on the real kernel: every fault it serves must give
its page its bytes, of every kind the pool stores, and leave limits, readahead, write
budgets and pool entries in the books as the design says. (tests/unit/test_engine.py
holds its decisions against a model, without a kernel.)"""
import ctypes

import numpy as np
import pytest

import ufcram
from ufcram import PAGE_SIZE
from ufcram import protocol as P

from .pages import filled, random_pages, text_pages

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
libc = ctypes.CDLL(None, use_errno=True)


def mixed_pages(n, seed=0):
    """Every kind of entry: lz4-compressed text, raw random bytes, zeros and pages
    filled with one 8-byte value (same-filled, stored as 0 bytes)."""
    pages = text_pages(n, seed)
    kind = np.arange(n) % 4
    pages[kind == 1] = random_pages(int((kind == 1).sum()), seed + 1)
    pages[kind == 2] = 0
    values = np.arange(int((kind == 3).sum()), dtype=np.uint64) * 0x0101
    pages.view(np.uint64)[kind == 3] = values[:, None]
    return pages


@pytest.fixture
def node(monkeypatch):
    monkeypatch.setenv("UFCRAM_FAULT_AROUND", "16")   # the page counts below assume it
    with ufcram.Node(capacity=64 * MiB) as n:
        yield n


def read_each(a, order):
    """Each page of a, read alone in this order (one fault each if demoted)."""
    return np.stack([a[p].copy() for p in order])


def test_random_reads_restore_every_kind_of_page(node):
    n = node
    data = mixed_pages(512)
    r, a = filled(n, data, write_budget=0)
    r.demote()
    before = r.stats()
    order = np.random.default_rng(1).permutation(len(data))
    assert np.array_equal(read_each(a, order), data[order])
    stats = r.stats()
    assert stats["readonly"] == len(data) and stats["demoted"] == 0
    assert stats["restores"] - before["restores"] == len(data)
    faults = stats["faults"] - before["faults"]
    assert len(data) // 2 < faults <= len(data)   # fault-around takes the odd neighbour
    del a
    r.close()


def spaced(count, gap=20):
    """count pages gap apart: none lands in the readahead window of the one before
    (UFCRAM_FAULT_AROUND pages), so each is a random read."""
    return list(range(0, gap * count, gap))


@pytest.mark.parametrize("scope", ["region", "client"])
def test_engine_hands_over_at_the_resident_limit(node, scope):
    """Up to the limit the engine restores what the window asks; the fault that crosses
    it brings its own page in, and Python demotes down to the low watermark."""
    n = node
    limit = 32
    data = text_pages(1024, seed=2)
    if scope == "client":   # what `ufcram run --resident-limit` sets: over all regions
        n.connection.call(P.LIMITS, limit * PAGE_SIZE, 0)
    kw = {"resident_limit": limit * PAGE_SIZE} if scope == "region" else {}
    r, a = filled(n, data, write_budget=0, **kw)
    r.demote()
    before = r.stats()   # the fill under a limit has restored a page or two already
    assert before["resident"] == 0
    order = spaced(limit + 1)
    for p in order[:limit]:
        assert np.array_equal(a[p], data[p])
    stats = r.stats()
    assert stats["resident"] == limit
    assert stats["faults"] - before["faults"] == limit
    # one load: the page is not touched again, so the demotion this read sets off
    # cannot take it and fault it back in
    assert a[order[-1], 7] == data[order[-1], 7]
    stats = r.stats()
    assert stats["faults"] - before["faults"] == limit + 1
    # (a page the demotion takes may come back: only at least one more restore here)
    assert stats["restores"] - before["restores"] > limit and stats["resident"] < limit
    del a
    r.close()


def mapped_pages(region):
    """Pages of region in memory now, as the kernel counts them (mincore)."""
    vec = (ctypes.c_ubyte * (region.nbytes // PAGE_SIZE))()
    assert libc.mincore(ctypes.c_void_p(region.address), region.nbytes, vec) == 0
    return int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1))


def test_a_burst_of_reads_is_demoted_as_it_goes(node):
    """The engine hands each fault past the limit to Python's demotion at once, so a
    burst of 250 reads ends near the limit, not 250 pages over it (the loop would
    serve them all before it let go: they come faster than it stops waiting)."""
    n = node
    limit = 32
    data = text_pages(1024, seed=12)
    r, a = filled(n, data, write_budget=0, resident_limit=limit * PAGE_SIZE)
    r.demote()
    burst = spaced(250, 3)[::-1]
    seen = [int(a[p, 5]) for p in burst]   # one load a page, nothing in between
    mapped = mapped_pages(r)
    assert seen == data[burst, 5].tolist()
    assert mapped <= 2 * limit   # ~limit: 250 over without the hand-over
    del a
    r.close()


def test_sequential_reads_restore_a_window_per_fault(node):
    """A scan restores a readahead window of pages per fault, and stays sequential
    where it reads through pages still in memory."""
    n = node
    data = text_pages(1024, seed=4)
    r, a = filled(n, data, write_budget=0)
    r.demote()
    assert np.array_equal(read_each(a, range(0, 512, 2)), data[0:512:2])   # every other
    r.demote(0, 256 * PAGE_SIZE)        # the first half: every page out again
    before = r.stats()
    assert np.array_equal(read_each(a, range(len(data))), data)
    stats = r.stats()
    # ~180: a window per 16 pages, a fault per page where every other one is in memory
    assert stats["faults"] - before["faults"] < len(data) // 4
    assert stats["restores"] - before["restores"] == len(data) - 128   # not those in memory
    del a
    r.close()


def test_scans_read_through_pages_still_in_memory(node):
    """Runs of 16 demoted pages between pairs of pages in memory: a scan that reads
    through each pair is still sequential, so each run comes in with one fault."""
    n = node
    data = text_pages(18 * 56, seed=7)
    r, a = filled(n, data, write_budget=0)
    r.demote()
    pairs = [p for p in range(len(data) - 1, -1, -1) if p % 18 >= 16]   # descending:
    assert np.array_equal(read_each(a, pairs), data[pairs])             # no readahead
    before = r.stats()
    assert np.array_equal(read_each(a, range(len(data))), data)
    # a window ramps up once (1, 2, 4, 8 pages), then one fault a run: ~60, not ~280
    assert r.stats()["faults"] - before["faults"] < 2 * 56
    del a
    r.close()


def test_pages_served_by_the_engine_demote_again(node):
    """The tables the engine moves are the ones demotion reads: pages written, dropped
    clean and demoted again, every byte stays."""
    n = node
    data = mixed_pages(256, seed=5)
    r, a = filled(n, data, write_budget=32)
    rng = np.random.default_rng(6)
    for round_ in range(3):
        r.demote()
        order = rng.permutation(len(data))
        assert np.array_equal(read_each(a, order), data[order])
        written = rng.choice(len(data), 64, replace=False)
        data[written, round_] += 1
        a[written, round_] += 1
        # more entries grow the pool's arrays and arenas under the engine's view
        extra = ufcram.Region(64 * PAGE_SIZE, node=n)
        extra.array()[:] = round_ + 1
        extra.demote()
        assert np.array_equal(a, data)
        extra.close()
    stats = r.stats()
    assert stats["clean_redemotions"] > 0 and stats["writable"] + stats["normal"] > 0
    del a
    r.close()


def entries_held(node):
    return node.stats()["pages_stored"]


@pytest.mark.parametrize("first_read", [False, True], ids=["demoted", "readonly"])
def test_writes_within_the_budget_then_promoted(node, first_read):
    """Writes to demoted pages (restored writable) or read-only ones (upgraded in place):
    writable within the budget, normal memory past it, each write's byte kept, and
    every written page's stale entry released."""
    n = node
    data = mixed_pages(256, seed=8)
    budget = 40
    r, a = filled(n, data, write_budget=budget)
    r.demote()
    if first_read:
        assert np.array_equal(read_each(a, spaced(128, 2)), data[0:256:2])
    before, held = r.stats(), entries_held(n)
    order = spaced(128, 2)[::-1]   # descending: no readahead
    for k, p in enumerate(order):
        a[p, 100] = data[p, 100] = k
    stats = r.stats()
    assert np.array_equal(a, data)
    assert stats["writable"] == budget and stats["normal"] == 128 - budget
    assert stats["promotions"] - before["promotions"] == 128 - budget
    assert stats["budget_refusals"] - before["budget_refusals"] == 128 - budget
    assert stats["faults"] - before["faults"] == 128
    assert entries_held(n) == held - 128
    del a
    r.close()


def test_auto_budgets_share_their_count_with_the_engine(node):
    """Pages the engine makes writable under auto budgets count in the node-wide tally
    the budgets read."""
    n = node
    datas = [text_pages(128, seed=s) for s in (9, 10)]
    regions = [filled(n, data, write_budget="auto") for data in datas]
    for (r, a), data in zip(regions, datas):
        r.demote()
        for p in spaced(64, 2):
            a[p, 0] ^= 1
            data[p, 0] ^= 1
    writable = sum(r.stats()["writable"] for r, _ in regions)
    assert writable > 0
    assert n.stats()["auto_budget_writable_pages"] == writable
    for (r, a), data in zip(regions, datas):
        assert np.array_equal(a, data)
        del a
        r.close()
    assert n.stats()["auto_budget_writable_pages"] == 0


def test_faults_find_their_region_among_many(node):
    """Regions come and go between faults: each fault is served in the region that
    holds it (the engine searches them by address), with that region's bytes."""
    n = node
    rng = np.random.default_rng(11)
    live = {}
    for step in range(60):
        if live and rng.random() < 0.3:   # one goes, the others stay where they are
            r, a, data = live.pop(int(rng.choice(list(live))))
            del a
            r.close()
        data = text_pages(int(rng.integers(1, 9)), seed=step)
        r, a = filled(n, data, write_budget=int(rng.integers(0, 3)))
        r.demote()
        live[step] = (r, a, data)
        for _, (r, a, data) in sorted(live.items(), key=lambda kv: rng.random()):
            p = int(rng.integers(0, len(data)))
            if rng.random() < 0.3:
                a[p, 1] = data[p, 1] = step
            assert np.array_equal(a[p], data[p])
    for r, a, data in live.values():
        assert np.array_equal(a, data)
        del a
        r.close()
