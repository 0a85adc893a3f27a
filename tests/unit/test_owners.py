"""Pool.share and Pool.release (store/owners.py): an entry held by several page tables (a
forked child's and its parent's) is freed with its last owner, never before."""
import numpy as np
import pytest

from ufcram.store.pool import PAGE_SIZE, Pool

pytestmark = pytest.mark.timeout(30)


def stored(pool, n):
    pages = np.arange(n, dtype=np.uint8)[:, None].repeat(PAGE_SIZE, 1)
    pages[:, 1:] = np.random.default_rng(n).integers(0, 256, (n, PAGE_SIZE - 1))
    return pool.store_many(pages), pages


def test_an_entry_is_freed_with_its_last_owner():
    pool = Pool(1 << 22)
    handles, pages = stored(pool, 6)
    pool.share(handles[:3])            # a forked child's table takes the first three
    pool.share(handles[:1])            # and a grandchild's the first
    assert [pool.owners(int(h)) for h in handles] == [3, 2, 2, 1, 1, 1]
    pool.release(handles)              # the parent lets go of all six
    assert [pool.owners(int(h)) for h in handles] == [2, 1, 1, 0, 0, 0]
    assert len(pool) == 3
    out = np.empty(PAGE_SIZE, np.uint8)
    assert np.array_equal(pool.load(int(handles[0]), out), pages[0])   # still whole
    pool.release(handles[:3])
    pool.release(handles[:1])
    assert len(pool) == 0 and pool.owners(int(handles[0])) == 0


def test_a_reused_handle_starts_with_one_owner():
    """A freed entry's owner count goes with it: the handle's next entry is not kept
    alive by the old one's owners."""
    pool = Pool(1 << 22)
    handles, _ = stored(pool, 4)
    pool.share(handles)
    orphans = pool.orphans(np.empty(0, np.int64))   # no table refers to them any more
    pool.free_many(orphans)
    again, _ = stored(pool, 4)
    assert sorted(again.tolist()) == sorted(handles.tolist())   # handles reused
    assert [pool.owners(int(h)) for h in again] == [1] * 4
    pool.release(again)
    assert len(pool) == 0


def test_releasing_nothing_is_nothing():
    pool = Pool(1 << 20)
    pool.share(np.empty(0, np.int64))
    pool.release(np.empty(0, np.int64))
    assert len(pool) == 0
