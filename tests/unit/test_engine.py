"""The fault engine without a kernel: the state codes it writes, the pool's view it reads
entries through (entries.c, Pool.load's decoder too), and each fault's plan held against
the reference model (fault_model.py)."""
import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ufcram.store import pagetable
from ufcram._shim import ffi, lib
from ufcram.store.entries import lz4_decompress
from ufcram.errors import PoolError
from ufcram.store.pool import PAGE_SIZE, Pool

from . import fault_model as model
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
    """The fault engine and Pool.load read entries through one view (entries.c): rebuilt as
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


# --- the engine's decisions against the model (fault_model.py) ------------------------
BASE = 1 << 32
STATES = [pagetable.UNTOUCHED, pagetable.NORMAL, pagetable.DEMOTING, pagetable.DEMOTED,
          pagetable.READONLY, pagetable.WRITABLE]


def c_views(tables):
    """The tables as struct ufc_region_view, the engine's own input; the buffers are
    the tables' arrays, so a plan applied by hand shows in both."""
    keep, views = [], []
    for t in tables:
        v = ffi.new("struct ufc_region_view *")
        arrays = {"state": ("uint8_t[]", t.state), "entry": ("int64_t[]", t.entry),
                  "tally": ("int64_t[]", t.tally),
                  "referenced": ("uint8_t[]", np.zeros(len(t.state), np.uint8)),
                  "readahead": ("int64_t[]", t.cells)}
        for name, (ctype, array) in arrays.items():
            buf = ffi.from_buffer(ctype, array, require_writable=True)
            keep.append(buf)
            setattr(v, name, buf)
        v.base, v.npages = t.base, len(t.state)
        v.readahead_max, v.limit, v.budget = t.max_window, t.limit, t.budget
        views.append(v)
    keep.append(views)
    return ffi.new("struct ufc_region_view *[]", views), keep


def c_plan(tables, addr, flags, tid, freed, call):
    for t in tables:   # the model reads window and next; the engine its cells
        t.cells = np.array([t.window, t.next], np.int64)
    array, keep = c_views(tables)
    c = ffi.new("struct ufc_fault_call *")
    c.room, c.may_grant, c.throttle, c.cover = call.client_room, call.may_grant, \
        call.throttle, call.cover
    c.agent_tid, c.auto_grants, c.bounce_pages = call.agent_tid, call.auto_grants, \
        call.bounce_pages
    p = ffi.new("struct ufc_plan *")
    assert lib.ufc_plan_fault(array, len(tables), addr, flags, tid, freed, c, p) == p.action
    return model.Plan(p.action, p.region, p.page, p.count, p.window, p.state, bool(p.wp))


@st.composite
def faults(draw):
    """Page tables (one to three regions, gaps between them) in runs of any states, a
    fault mostly in them (sometimes around them, sometimes right after the last run so
    that readahead is sequential), and any numbers Python may hand over."""
    tables, base = [], BASE
    for _ in range(draw(st.integers(1, 3))):
        runs = draw(st.lists(st.tuples(st.sampled_from(STATES + [pagetable.DEMOTED,
                                                                 pagetable.UNTOUCHED] * 2),
                                       st.sampled_from([12, 4, 1])),
                             min_size=1, max_size=6))
        state = np.concatenate([np.full(n, s, np.uint8) for s, n in runs])
        n = len(state)
        held = (state == pagetable.DEMOTED) | (state == pagetable.DEMOTING) | (
            (state == pagetable.READONLY) & np.array(draw(st.lists(
                st.booleans(), min_size=n, max_size=n)), bool))
        entry = np.where(held, np.arange(n) + 100, -1).astype(np.int64)
        t = model.Table(base, state, entry, window=draw(st.sampled_from([1, 2, 4, 8, 16])),
                        max_window=draw(st.sampled_from([16, 4, 1])),
                        limit=draw(st.sampled_from([-1, -1, -1, 0, 8, 50])),
                        budget=draw(st.integers(-1, 30)))
        tables.append(t)
        base += (n + draw(st.integers(0, 3))) * PAGE_SIZE
    t = draw(st.sampled_from(tables))
    page = draw(st.integers(0, len(t.state) - 1))
    addr = t.base + page * PAGE_SIZE
    if draw(st.sampled_from([False] * 9 + [True])):   # around the regions: gaps, ends
        addr = draw(st.integers(BASE - PAGE_SIZE, base)) & ~(PAGE_SIZE - 1)
    t.next = draw(st.sampled_from([-1, page, page, page, page - 1, page - 3, page + 2]))
    addr += draw(st.integers(0, PAGE_SIZE - 1))
    flags = draw(st.sampled_from([0, model.WRITE, model.WP | model.WRITE]))
    tid = draw(st.sampled_from([7, 8]))
    page_addr = addr & ~(PAGE_SIZE - 1)
    freed = draw(st.one_of(st.just(model.FREED_NONE),
                           st.integers(page_addr, page_addr + 20 * PAGE_SIZE)
                           .map(lambda a: a & ~(PAGE_SIZE - 1))))
    call = model.Call(client_room=draw(st.sampled_from([1 << 62, 1 << 62, 64, 3, 0, -2])),
                      may_grant=draw(st.booleans()), throttle=draw(st.sampled_from([False] * 9 + [True])),
                      cover=draw(st.sampled_from([False] * 4 + [True])),
                      agent_tid=draw(st.sampled_from([0, 7])),
                      auto_grants=draw(st.integers(0, 3)),
                      bounce_pages=draw(st.sampled_from([16, 16, 1])))
    return tables, addr, flags, tid, freed, call


@settings(max_examples=3000, deadline=None)
@given(faults())
def test_every_fault_is_planned_as_the_model_says(fault):
    assert c_plan(*fault) == model.plan(*fault)


def apply(tables, plan):
    """What the engine books once the kernel has installed a plan's pages (apply())."""
    t = tables[plan.region]
    pages = slice(plan.page, plan.page + plan.count)
    np.subtract.at(t.tally, t.state[pages], 1)
    t.state[pages] = plan.state
    t.tally[plan.state] += plan.count
    if plan.window >= 0:
        t.window, t.next = plan.window, plan.page + plan.count


def scan(tables, pages, flags=0):
    """Fault at each page in turn as the engine would serve it; the runs it plans."""
    runs = []
    for p in pages:
        plan = c_plan(tables, BASE + p * PAGE_SIZE, flags, 1, model.FREED_NONE, model.Call())
        assert plan == model.plan(tables, BASE + p * PAGE_SIZE, flags, 1, model.FREED_NONE,
                                  model.Call())
        apply(tables, plan)
        runs.append(plan.count)
    return runs


def demoted(n, max_window=8):
    return [model.Table(BASE, np.full(n, pagetable.DEMOTED, np.uint8),
                        np.arange(n, dtype=np.int64), max_window=max_window)]


def test_readahead_grows_on_sequential_faults_and_resets_on_random_ones():
    tables = demoted(64)
    assert scan(tables, [10, 11, 13, 17, 25]) == [1, 2, 4, 8, 8]   # capped at 8
    assert scan(tables, [3]) == [1]                                 # random: one page
    assert scan(tables, [4, 6]) == [2, 4]


def test_readahead_stays_sequential_across_pages_still_in_memory():
    tables = demoted(64)
    tables[0].state[5] = pagetable.NORMAL          # in memory: a run stops before it
    tables[0].tally = np.bincount(tables[0].state, minlength=lib.UFC_NSTATES)
    assert scan(tables, [0, 1, 3]) == [1, 2, 2]     # 3, 4: cut short at 5
    tables[0].state[6:9] = pagetable.READONLY       # read through 5..8, then 9 faults
    tables[0].tally = np.bincount(tables[0].state, minlength=lib.UFC_NSTATES)
    assert scan(tables, [9]) == [8]                 # still sequential: the window grows
    assert scan(tables, [30]) == [1]                # further than a window: random
    assert scan(tables, [32]) == [1]                # 31 was not in memory: a stride


def test_first_touches_zero_fill_a_window_and_writes_take_one_page():
    tables = [model.Table(BASE, np.zeros(64, np.uint8), np.full(64, -1, np.int64))]
    assert scan(tables, [0, 1, 3, 7]) == [1, 2, 4, 8]
    assert (tables[0].state[:15] == pagetable.NORMAL).all()
    tables = demoted(16)
    assert scan(tables, [0, 1, 2], flags=model.WRITE) == [1, 1, 1]   # no write-around
