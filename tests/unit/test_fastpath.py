"""What the fault fast path relies on, without a kernel: the state codes it writes,
the pool layout it loads entries by, and the lz4 function it decompresses with."""
import mmap

import numpy as np
import pytest

from ufcram import pagetable
from ufcram._shim import ffi, lib
from ufcram.pool import PAGE_SIZE, Pool
from ufcram.fastpath import lz4_decompress

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


def load_by_layout(pool, handle, decompress):
    """A page as fastpath.c's load_entry reads it: from layout() alone."""
    location, size, arenas = pool.layout()
    n, loc = int(size[handle]), int(location[handle])
    if n == 0:
        return np.full(PAGE_SIZE // 8, loc, np.int64).tobytes()
    src = ffi.cast("char *", int(arenas[loc >> 32]) + (loc & 0xFFFFFFFF))
    if n == PAGE_SIZE:
        return ffi.buffer(src, PAGE_SIZE)[:]
    out = ffi.new("char[]", PAGE_SIZE)
    assert decompress(src, out, n, PAGE_SIZE) == PAGE_SIZE
    return ffi.buffer(out)[:]


def test_layout_gives_every_page_back_after_growth_and_compaction():
    fn = lz4_decompress()
    assert fn is not None, "the lz4 package no longer exports LZ4_decompress_safe"
    decompress = ffi.cast("int (*)(const char *, char *, int, int)", fn)
    pool = Pool(1 << 30, arena_size=16 * PAGE_SIZE)
    generation = pool.layout_generation
    kinds = ("zero", "word", "text", "random", "partial", "numbers", "tiny")
    pages = [make_page(kinds[i % len(kinds)], i) for i in range(2000)]
    handles = pool.store_many(rows(*pages)).tolist()
    assert pool.layout_generation != generation        # arrays grew, arenas came
    pool.free_many(handles[1::3])
    generation = pool.layout_generation
    assert pool.compact() > 0
    assert pool.layout_generation != generation        # arenas went
    assert pool.layout()[1][handles[1]] == -1          # freed: no entry
    for handle, page in list(zip(handles, pages))[::3]:
        assert load_by_layout(pool, handle, decompress) == page
