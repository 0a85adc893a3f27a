"""Compressed pool: exact bytes back, capacity refusals, misuse (compaction and accounting
have test files of their own)."""
import threading
from collections import Counter

import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ufcram.errors import PoolError, PoolFullError
from ufcram.store.pool import CLASS_STEP, HANDLE_NONE, PAGE_SIZE, Pool

pytestmark = pytest.mark.timeout(120)

KINDS = ("zero", "word", "text", "random", "partial", "almost_zero", "numbers", "tiny")
WORDS = np.array("alpha beta gamma delta pool page fault handler arena slot class".split())


def make_page(kind, seed):
    """One 4096-byte page of a kind; seed varies its content."""
    rng = np.random.default_rng(seed)
    if kind == "zero":
        return bytes(PAGE_SIZE)
    if kind == "word":
        return rng.bytes(8) * (PAGE_SIZE // 8)
    if kind == "text":
        text = " ".join(rng.choice(WORDS, 900)).encode() + rng.bytes(int(rng.integers(0, 300)))
        return text[:PAGE_SIZE].ljust(PAGE_SIZE, b".")
    if kind == "random":
        return rng.bytes(PAGE_SIZE)
    if kind == "partial":
        k = int(rng.integers(1, PAGE_SIZE))
        return rng.bytes(k) + bytes(PAGE_SIZE - k)
    if kind == "tiny":                 # 8 random bytes then zeros: all in one size class
        return rng.bytes(8) + bytes(PAGE_SIZE - 8)
    if kind == "almost_zero":          # same-filled but for one byte: must not be "same"
        page = bytearray(PAGE_SIZE)
        page[int(rng.integers(0, PAGE_SIZE))] = int(rng.integers(1, 256))
        return bytes(page)
    return np.cumsum(rng.integers(0, 5, 512)).astype(np.int64).tobytes()   # numbers


def is_same(page):
    return page[8:] == page[:-8]


def stored_size(page, threshold=3072):
    """What the pool must count for page in compr_data_size."""
    if is_same(page):
        return 0
    n = len(lz4.block.compress(page, store_size=False))
    return PAGE_SIZE if n > threshold or n >= PAGE_SIZE else n


def check_exact(pool, model):
    """Every live entry loads to its bytes, one by one and in one batch."""
    for h, page in model.items():
        assert pool.load(h) == page
    if model:
        hs = np.fromiter(model, np.int64, len(model))
        out = pool.load_many(hs, np.empty((len(hs), PAGE_SIZE), np.uint8))
        assert out.tobytes() == b"".join(model[h] for h in hs.tolist())


def comparable(stats):
    return {k: v for k, v in stats.items() if k != "mem_used_max"}


def rows(*pages):
    return np.frombuffer(b"".join(pages), np.uint8).reshape(len(pages), PAGE_SIZE).copy()


class PoolMachine(RuleBasedStateMachine):
    """Random store/load/free/compact/capacity sequences against a dict model."""

    def __init__(self):
        super().__init__()
        # tiny arenas and capacity so that full pools, many arenas and compaction occur
        self.pool = Pool(48 * PAGE_SIZE, arena_size=self.ARENA)
        self.model = {}
        self.high = 0   # the most memory seen in use: mem_used_max may never fall below it

    ARENA = 2 * PAGE_SIZE

    def _arenas_needed(self):
        """The fewest arenas that hold the model's entries: per slot size (stored bytes
        rounded up to CLASS_STEP), its entries over the slots one arena has."""
        slots = Counter(-(-n // CLASS_STEP) * CLASS_STEP
                        for n in map(stored_size, self.model.values()) if n)
        return sum(-(-count // (self.ARENA // slot)) for slot, count in slots.items())

    def _arena_check(self, before):
        after = self.pool.stats()["arena_bytes"]
        assert after <= before or after <= self.pool.capacity

    @rule(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32))
    def store(self, kind, seed):
        page = make_page(kind, seed)
        before = self.pool.stats()
        try:
            h = self.pool.store(page)
        except PoolFullError:
            assert not is_same(page)
            assert comparable(self.pool.stats()) == comparable(before)
            return
        assert h not in self.model and h != HANDLE_NONE
        self.model[h] = page
        self._arena_check(before["arena_bytes"])

    @rule(kinds=st.lists(st.sampled_from(KINDS), max_size=10), seed=st.integers(0, 2**32))
    def store_many(self, kinds, seed):
        pages = [make_page(k, seed + i) for i, k in enumerate(kinds)]
        before = self.pool.stats()["arena_bytes"]
        hs = self.pool.store_many(rows(*pages) if pages else np.empty((0, PAGE_SIZE), np.uint8))
        assert hs.dtype == np.int64 and len(hs) == len(pages)
        for h, page in zip(hs.tolist(), pages):
            if h == HANDLE_NONE:
                assert not is_same(page)       # same-filled pages always fit
            else:
                assert h not in self.model
                self.model[h] = page
        self._arena_check(before)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def load_into(self, data):
        h = data.draw(st.sampled_from(sorted(self.model)))
        out = np.full(PAGE_SIZE, 0xAA, np.uint8)
        assert self.pool.load(h, out) is out
        assert out.tobytes() == self.model[h]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        h = data.draw(st.sampled_from(sorted(self.model)))
        self.pool.free(h)
        del self.model[h]
        assert h not in self.pool
        with pytest.raises(PoolError):
            self.pool.free(h)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free_many(self, data):
        hs = data.draw(st.lists(st.sampled_from(sorted(self.model)), unique=True))
        self.pool.free_many(np.array(hs, np.int64))
        for h in hs:
            del self.model[h]

    @rule()
    def compact(self):
        before = self.pool.stats()
        released = self.pool.compact()
        after = self.pool.stats()
        # never grows: evacuating into the current arena's untouched tail adds bytes
        assert released >= 0
        assert after["arena_bytes"] == before["arena_bytes"] - released
        # complete: no size class keeps an arena its entries could be moved out of
        assert after["arena_bytes"] <= self.ARENA * self._arenas_needed()
        moved = after["pages_compacted"] - before["pages_compacted"]
        assert 0 <= moved <= len(self.model) and (released > 0 or moved == 0)

    @rule(pages=st.integers(0, 96))
    def set_capacity(self, pages):
        self.pool.capacity = pages * PAGE_SIZE
        assert self.pool.capacity == pages * PAGE_SIZE

    @invariant()
    def matches_model(self):
        s = self.pool.stats()
        sizes = [stored_size(p) for p in self.model.values()]
        assert len(self.pool) == s["pages_stored"] == len(self.model)
        assert s["orig_data_size"] == PAGE_SIZE * len(self.model)
        assert s["same_pages"] == sizes.count(0)
        assert s["huge_pages"] == sizes.count(PAGE_SIZE)
        assert s["compr_data_size"] == sum(sizes)
        assert s["mem_used_total"] == s["arena_bytes"] + s["meta_bytes"]
        self.high = max(self.high, s["mem_used_total"])
        assert s["mem_used_max"] >= self.high     # a high-water mark: a free keeps it
        assert self.pool.over_capacity == (s["arena_bytes"] > self.pool.capacity)
        check_exact(self.pool, self.model)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=50, deadline=None,
                                    database=None,
                                    suppress_health_check=[HealthCheck.too_slow])


def fill_with_random(pool, seed=0):
    """Store raw-stored (random) pages until the pool refuses one: the model, the refused page."""
    model, i = {}, 0
    while True:
        page = make_page("random", seed * 100000 + i)
        i += 1
        try:
            model[pool.store(page)] = page
        except PoolFullError:
            return model, page


def test_full_pool_refuses_whole_store_and_recovers_after_free():
    pool = Pool(64 * PAGE_SIZE, arena_size=16 * PAGE_SIZE)
    model, refused = fill_with_random(pool)
    assert len(model) == 64                       # one raw page per 4 KiB of capacity
    before = pool.stats()
    for page in (refused, make_page("text", 1), make_page("numbers", 2)):
        with pytest.raises(PoolFullError):
            pool.store(page)
    assert comparable(pool.stats()) == comparable(before)
    check_exact(pool, model)
    victim = next(iter(model))
    pool.free(victim)
    del model[victim]
    model[pool.store(refused)] = refused          # reuses the freed slot: no new memory
    assert pool.stats()["arena_bytes"] == before["arena_bytes"]
    check_exact(pool, model)


def test_store_many_on_full_pool_stores_only_what_fits():
    pool = Pool(64 * PAGE_SIZE, arena_size=16 * PAGE_SIZE)
    model, refused = fill_with_random(pool)
    freed = list(model)[:1]
    pool.free_many(freed)
    del model[freed[0]]
    before = pool.stats()
    big, zero, word = make_page("random", 10**9), make_page("zero", 0), make_page("word", 3)
    text = make_page("text", 5)
    hs = pool.store_many(rows(big, refused, zero, text, word))
    # the first raw page takes the freed slot; the second and the compressible page need
    # new memory; the same-filled pages need none
    assert hs[0] >= 0 and hs[1] == HANDLE_NONE and hs[3] == HANDLE_NONE
    assert hs[2] >= 0 and hs[4] >= 0
    s = pool.stats()
    assert s["arena_bytes"] == before["arena_bytes"]
    assert s["pages_stored"] == before["pages_stored"] + 3
    assert s["compr_data_size"] == before["compr_data_size"] + PAGE_SIZE
    model.update({int(hs[0]): big, int(hs[2]): zero, int(hs[4]): word})
    check_exact(pool, model)


def test_shrinking_capacity_below_use_refuses_new_memory_only():
    pool = Pool(1 << 20, arena_size=64 * PAGE_SIZE)
    model = {pool.store(p): p for p in (make_page("random", i) for i in range(40))}
    used = pool.stats()["arena_bytes"]
    pool.capacity = used // 2
    assert pool.over_capacity
    with pytest.raises(PoolFullError):
        pool.store(make_page("text", 9))
    h = next(iter(model))
    pool.free(h)
    model.pop(h)
    page = make_page("random", 99)
    model[pool.store(page)] = page                # a freed slot needs no new memory
    model[pool.store(bytes(PAGE_SIZE))] = bytes(PAGE_SIZE)
    check_exact(pool, model)
    pool.capacity = used
    assert not pool.over_capacity


def test_same_filled_pages_take_no_arena_space():
    pool = Pool(0)                               # no arena memory at all is allowed
    words = [0, 1, -1, 2**63 - 1, -(2**63), 0x0123456789ABCDEF]
    pages = [np.int64(w).tobytes() * 512 for w in words] * 100
    model = {pool.store(p): p for p in pages[:300]}
    hs = pool.store_many(rows(*pages[300:]))
    model.update(zip(hs.tolist(), pages[300:]))
    s = pool.stats()
    assert s["same_pages"] == len(pages) == len(model)
    assert s["arena_bytes"] == 0 and s["compr_data_size"] == 0
    assert s["mem_used_total"] == s["meta_bytes"]
    assert s["ratio_percentiles"]["p99.99999"] == 0.0
    check_exact(pool, model)
    with pytest.raises(PoolFullError):           # one differing byte: a real page
        pool.store(make_page("almost_zero", 1))


def test_huge_pages_are_raw_counted_and_exact():
    pool = Pool(1 << 22)
    pages = [make_page("random", i) for i in range(30)]
    model = {pool.store(p): p for p in pages[:10]}
    model.update(zip(pool.store_many(rows(*pages[10:])).tolist(), pages[10:]))
    s = pool.stats()
    assert s["huge_pages"] == 30 and s["compr_data_size"] == 30 * PAGE_SIZE
    assert s["arena_bytes"] == 30 * PAGE_SIZE
    check_exact(pool, model)
    pool.free_many(list(model)[:5])
    assert pool.stats()["huge_pages"] == 25


def test_huge_threshold_is_a_constructor_argument():
    page = make_page("text", 3)
    n = len(lz4.block.compress(page, store_size=False))
    low, high = Pool(1 << 20, huge_threshold=n - 1), Pool(1 << 20, huge_threshold=n)
    hl, hh = low.store(page), high.store(page)
    assert low.stats()["huge_pages"] == 1 and low.stats()["compr_data_size"] == PAGE_SIZE
    assert high.stats()["huge_pages"] == 0 and high.stats()["compr_data_size"] == n
    assert low.load(hl) == high.load(hh) == page
    for bad in (0, PAGE_SIZE + 1, 1.5):
        with pytest.raises(PoolError):
            Pool(1 << 20, huge_threshold=bad)


def test_buffers_of_every_kind_store_and_load():
    pool = Pool(1 << 22)
    page = make_page("numbers", 4)
    arr = np.frombuffer(page, np.uint8).copy()
    inputs = [page, bytearray(page), memoryview(page), arr, arr.view(np.float64),
              rows(page, page)[1]]
    for value in inputs:
        h = pool.store(value)
        assert pool.load(h) == page
        out = bytearray(PAGE_SIZE)
        assert pool.load(h, out) is out and bytes(out) == page
        row = np.zeros((1, PAGE_SIZE), np.uint8)
        out = row[0]
        assert pool.load(h, out) is out and row.tobytes() == page
    wide = np.zeros((2, 2 * PAGE_SIZE), np.uint8)
    wide[:, :PAGE_SIZE] = arr                     # rows that are not contiguous
    hs = pool.store_many(wide[:, :PAGE_SIZE])
    assert pool.load_many(hs, np.empty((2, PAGE_SIZE), np.uint8)).tobytes() == page * 2


@pytest.fixture
def used_pool():
    pool = Pool(1 << 22)
    pages = [make_page(k, i) for i, k in enumerate(KINDS * 3)]
    model = {pool.store(p): p for p in pages}
    freed = pool.store(make_page("text", 77))
    pool.free(freed)
    return pool, model, freed


@pytest.mark.parametrize("bad", [b"x" * 4095, b"x" * 4097, b"", 42, "x" * 4096,
                                 np.zeros(8192, np.uint8)[::2], None])
def test_store_rejects_wrong_pages(used_pool, bad):
    pool, model, _ = used_pool
    before = pool.stats()
    with pytest.raises(PoolError):
        pool.store(bad)
    assert comparable(pool.stats()) == comparable(before)
    check_exact(pool, model)


@pytest.mark.parametrize("bad", [np.zeros((2, 4095), np.uint8), np.zeros(4096, np.uint8),
                                 np.zeros((2, 2048), np.uint16), np.zeros((1, 1, 4096), np.uint8),
                                 [bytes(4096)], bytes(4096)])
def test_store_many_rejects_wrong_shapes(used_pool, bad):
    pool, model, _ = used_pool
    with pytest.raises(PoolError):
        pool.store_many(bad)
    check_exact(pool, model)


def bad_handles(pool, freed):
    return [freed, -1, HANDLE_NONE, -5, len(pool) + 1000, 2**40, 1.0, True, "1", None]


def test_load_and_free_reject_unknown_or_freed_handles(used_pool):
    pool, model, freed = used_pool
    for bad in bad_handles(pool, freed):
        for call in (pool.load, pool.free):
            with pytest.raises(PoolError):
                call(bad)
        assert bad not in pool
    check_exact(pool, model)
    h = next(iter(model))
    pool.free(h)
    with pytest.raises(PoolError, match="freed"):          # double free
        pool.free(h)
    with pytest.raises(PoolError):
        pool.load(h)
    del model[h]
    check_exact(pool, model)


def test_batch_calls_with_one_bad_handle_change_nothing(used_pool):
    pool, model, freed = used_pool
    good = list(model)[:4]
    for bad in ([*good, freed], [*good, -1], [*good, 10**9], [*good, good[0]], [[1, 2]],
                np.array([1.0, 2.0])):
        before = pool.stats()
        with pytest.raises(PoolError):
            pool.free_many(bad)
        assert comparable(pool.stats()) == comparable(before)
        check_exact(pool, model)
        if len(bad) == 5 and bad[-1] != good[0]:
            with pytest.raises(PoolError):
                pool.load_many(bad, np.empty((5, PAGE_SIZE), np.uint8))
    for out in (np.empty((3, PAGE_SIZE), np.uint8), np.empty((4, PAGE_SIZE), np.int8),
                np.empty((4, PAGE_SIZE), np.uint8)[:, ::-1], np.empty((4, PAGE_SIZE), np.uint8).T,
                np.frombuffer(bytes(4 * PAGE_SIZE), np.uint8).reshape(4, PAGE_SIZE)):
        with pytest.raises(PoolError):
            pool.load_many(good, out)
    for out in (bytearray(4095), bytes(PAGE_SIZE), np.zeros(PAGE_SIZE + 1, np.uint8)):
        with pytest.raises(PoolError):
            pool.load(good[0], out)
    check_exact(pool, model)


@pytest.mark.parametrize("bad", [-1, 1.5, "4096", None, True, 2.0**40])
def test_capacity_must_be_a_non_negative_int(used_pool, bad):
    pool, model, _ = used_pool
    with pytest.raises(PoolError):
        pool.capacity = bad
    assert pool.capacity == 1 << 22
    with pytest.raises(PoolError):
        Pool(bad)
    check_exact(pool, model)


def test_single_owner_is_enforced_and_transferable(used_pool):
    pool, model, _ = used_pool
    h = next(iter(model))
    calls = {
        "store": lambda: pool.store(bytes(PAGE_SIZE)),
        "store_many": lambda: pool.store_many(np.zeros((1, PAGE_SIZE), np.uint8)),
        "load": lambda: pool.load(h), "free": lambda: pool.free(h),
        "load_many": lambda: pool.load_many([h], np.empty((1, PAGE_SIZE), np.uint8)),
        "free_many": lambda: pool.free_many([h]), "compact": pool.compact,
        "stats": pool.stats, "len": lambda: len(pool), "contains": lambda: h in pool,
        "capacity": lambda: pool.capacity, "over_capacity": lambda: pool.over_capacity,
        "set_capacity": lambda: setattr(pool, "capacity", 0),
        "ratio_percentile": lambda: pool.ratio_percentile(50),
    }
    errors = {}

    def other_thread():
        for name, call in calls.items():
            try:
                call()
            except PoolError as e:
                errors[name] = str(e)
        pool.transfer_owner()
        errors["after_transfer"] = pool.load(h)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert set(calls) <= set(errors)
    assert all("single-owner" in errors[name] for name in calls)
    assert errors["after_transfer"] == model[h]
    with pytest.raises(PoolError, match="single-owner"):      # now the old owner is refused
        pool.load(h)
    pool.transfer_owner()
    assert pool.capacity == 1 << 22
    check_exact(pool, model)
