"""The pool's accounting: metadata costs, ratio percentiles, physical use and orphaned
entries."""
import lz4.block
import numpy as np
import pytest

from ufcram.errors import PoolError
from ufcram.store.pool import PAGE_SIZE, Pool

from .test_pool import make_page, rows

pytestmark = pytest.mark.timeout(120)


def test_metadata_costs_at_most_32_bytes_per_entry():
    pool = Pool(0)
    zeros = np.zeros((1000, PAGE_SIZE), np.uint8)
    for _ in range(100):
        pool.store_many(zeros)
    s = pool.stats()
    assert s["pages_stored"] == 100_000 and s["arena_bytes"] == 0
    per_entry = pool._location.nbytes + pool._size.nbytes + pool._free_handles.nbytes   # allocated sizes
    assert s["meta_bytes"] >= per_entry                                     # all counted
    assert (s["mem_used_total"] - s["arena_bytes"]) / s["pages_stored"] <= 32


def test_metadata_with_churn_including_free_slot_lists_stays_under_32_bytes():
    pool = Pool(1 << 30)
    pages = rows(*[make_page(("text", "numbers")[i % 2], i % 50) for i in range(1000)])
    hs = np.concatenate([pool.store_many(pages) for _ in range(20)])
    pool.free_many(hs[::2])                    # 10 000 freed slots on the class stacks
    for _ in range(10):
        pool.store_many(pages)
    s = pool.stats()
    assert s["pages_stored"] == 20_000
    assert s["meta_bytes"] / s["pages_stored"] <= 32


def test_ratio_percentiles_see_the_tail():
    pool = Pool(1 << 22)
    text, rnd = make_page("text", 1), make_page("random", 2)
    assert pool.ratio_percentile(99.99999) == 1.0           # nothing seen: pessimistic
    handles = [pool.store(text) for _ in range(99)] + [pool.store(rnd)]
    n = len(lz4.block.compress(text, store_size=False))
    r = pool.stats()["ratio_percentiles"]
    assert list(r) == ["p50", "p90", "p99", "p99.9", "p99.99", "p99.999", "p99.9999",
                       "p99.99999"]
    assert r["p50"] == r["p99"] == n / PAGE_SIZE < 0.5
    assert r["p99.9"] == r["p99.99999"] == pool.ratio_percentile(100) == 1.0
    assert pool.ratio_percentile(0) == n / PAGE_SIZE
    pool.free(handles[-1])                                   # cumulative: the tail stays
    assert pool.ratio_percentile(99.99999) == 1.0
    pool.store_many(np.zeros((900, PAGE_SIZE), np.uint8))
    assert pool.ratio_percentile(50) == 0.0 and pool.ratio_percentile(99.99999) == 1.0
    assert pool.ratio_percentile(90) == 0.0 and pool.ratio_percentile(91) == n / PAGE_SIZE
    assert pool.ratio_percentile(90.01) == n / PAGE_SIZE     # nearest rank: ceil(900.1)
    for bad in (-1, 100.5, float("nan"), "50", None, True):
        with pytest.raises(PoolError):
            pool.ratio_percentile(bad)


def test_mem_used_total_and_orphans():
    pool = Pool(1 << 20)
    handles = pool.store_many(np.random.default_rng(0).integers(0, 256, (4, PAGE_SIZE),
                                                                np.uint8))
    assert pool.mem_used_total == pool.stats()["mem_used_total"]
    assert pool.orphans(handles[:2]).tolist() == sorted(handles[2:].tolist())
    assert pool.orphans(np.append(handles, -1)).tolist() == []
    pool.free(int(handles[3]))
    assert pool.orphans(handles[:2]).tolist() == [int(handles[2])]
