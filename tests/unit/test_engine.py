"""What the fault fast path relies on, without a kernel: the state codes it writes, and
the pool's view it reads entries through (entries.c, Pool.load's decoder too)."""
import mmap

import numpy as np
import pytest

from ufcram.store import pagetable
from ufcram._shim import ffi, lib
from ufcram.store.entries import lz4_decompress
from ufcram.errors import PoolError
from ufcram.store.pool import PAGE_SIZE, Pool

from .test_pool import make_page, rows

pytestmark = pytest.mark.timeout(60)


def test_page_states_and_size_are_one_list_shared_with_c():
    """The page tables take their states and page size from ufcram_native.h: the codes
    are pinned (the names, the presence mask and the tallies are indexed by them), and
    the page is this machine's."""
    codes = {name: getattr(lib, f"UFC_STATE_{name.upper()}") for name in pagetable.STATE_NAMES}
    assert codes == {"untouched": 0, "normal": 1, "demoting": 2, "demoted": 3,
                     "readonly": 4, "writable": 5}
    assert lib.UFC_NSTATES == len(pagetable.STATE_NAMES)
    assert [name for name, code in codes.items() if pagetable.PRESENT[code]] == \
        ["normal", "demoting", "readonly", "writable"]
    assert pagetable.PAGE_SIZE == lib.UFC_PAGE_SIZE == mmap.PAGESIZE


def test_the_pool_view_follows_growth_and_compaction():
    """engine/faults.c and Pool.load read entries through one view (entries.c): rebuilt as
    the arrays grow and arenas come and go, never pointing at memory gone."""
    assert lz4_decompress() is not None, "no LZ4_decompress_safe to decode entries with"
    pool = Pool(1 << 30, arena_size=16 * PAGE_SIZE)
    first = pool.view()
    assert pool.view().location == first.location      # no change, no rebuild
    kinds = ("zero", "word", "text", "random", "partial", "numbers", "tiny")
    pages = [make_page(kinds[i % len(kinds)], i) for i in range(2000)]
    handles = pool.store_many(rows(*pages)).tolist()
    grown = pool.view()
    assert grown.nhandles >= 2000 and grown.location != ffi.NULL
    pool.free_many(handles[1::3])
    narenas = sum(1 for a in pool.layout()[2] if a)
    assert pool.compact() > 0
    assert sum(1 for a in pool.layout()[2] if a) < narenas   # arenas went
    view = pool.view()
    assert pool.layout()[1][handles[1]] == -1          # freed: no entry
    page = np.empty(PAGE_SIZE, np.uint8)
    assert lib.ufc_load_entry(view, handles[1], ffi.from_buffer(page)) == -1
    for handle, data in list(zip(handles, pages))[::3]:
        assert lib.ufc_load_entry(view, handle, ffi.from_buffer(page)) == 0
        assert page.tobytes() == data


def test_an_entry_that_does_not_decode_is_an_error_not_a_page():
    pool = Pool(1 << 20)
    text = make_page("text", 3)
    handle = pool.store(text)
    location, size, _ = pool.layout()
    arena = pool._arena_view[int(location[handle]) >> 32]
    start = int(location[handle]) & 0xFFFFFFFF
    arena[start:start + int(size[handle])] = b"\xff" * int(size[handle])   # not lz4 any more
    with pytest.raises(PoolError, match=f"entry {handle} does not decode"):
        pool.load(handle)
    with pytest.raises(PoolError, match=f"entry {handle} does not decode"):
        pool.load_many([handle], np.empty((1, PAGE_SIZE), np.uint8))
