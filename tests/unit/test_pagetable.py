"""ufcram.pagetable: range validation, state counts and run splitting."""
import numpy as np
import pytest

from ufcram.store import pagetable
from ufcram.errors import RegionError, StateError
from ufcram.store.pagetable import (DEMOTED, DEMOTING, NORMAL, PAGE_SIZE, READONLY, STATE_NAMES,
                              UNTOUCHED, WRITABLE, PageTable, SharedTally, bridged, pages_of,
                              runs_of)

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def any_move(monkeypatch):
    """For tests of the books (counts, copies, queries): they set states up directly, by
    moves the state machine never makes."""
    monkeypatch.setattr(pagetable, "CHECK_STATES", False)


@pytest.fixture
def checked(monkeypatch):
    monkeypatch.setattr(pagetable, "CHECK_STATES", True)


def test_the_moves_of_the_state_machine_go_through(checked):
    t = PageTable(0, 4)
    t.set(np.arange(4), NORMAL)                   # zero-fill
    t.set(np.arange(4), DEMOTING)                 # a dirty demotion
    t.set(np.array([0, 1, 2]), DEMOTED)           # stored
    t.set(3, NORMAL)                              # put back (the batch failed there)
    t.set(0, READONLY)                            # a read fault
    t.set(1, WRITABLE)                            # a write fault, within the budget
    t.set(np.array([0, 2]), DEMOTING)             # a clean drop, across a demoted page
    t.set(np.array([0, 2]), DEMOTED)
    t.set(1, NORMAL)                              # promoted in place
    t.set(np.arange(4), UNTOUCHED)                # freed
    assert t.counts()["untouched"] == 4


@pytest.mark.parametrize("old,new", [(UNTOUCHED, DEMOTED), (UNTOUCHED, READONLY),
                                     (NORMAL, READONLY), (NORMAL, DEMOTED),
                                     (DEMOTING, DEMOTING), (READONLY, DEMOTED),
                                     (WRITABLE, READONLY)])
def test_other_moves_are_refused_and_change_nothing(checked, monkeypatch, old, new):
    t = PageTable(0x40000, 4)
    with monkeypatch.context() as m:
        m.setattr(pagetable, "CHECK_STATES", False)
        t.set(np.array([1, 2]), old)
    before = t.state.copy(), t.tally.copy()
    message = f"2 page\\(s\\) of the region at 0x40000, first 1, moved {STATE_NAMES[old]} " \
              f"-> {STATE_NAMES[new]}"
    with pytest.raises(StateError, match=message):
        t.set(np.array([1, 2]), new)
    with pytest.raises(StateError):
        t.set(2, new)                             # a fault's page: the scalar path
    assert np.array_equal(t.state, before[0]) and np.array_equal(t.tally, before[1])


def test_page_range_and_addresses():
    t = PageTable(0x10000, 8)
    assert t.page_range(PAGE_SIZE, 2 * PAGE_SIZE) == (1, 3)
    assert t.page_of(0x10000 + 3 * PAGE_SIZE + 5) == 3
    assert t.address_of(2) == 0x10000 + 2 * PAGE_SIZE
    assert t.end == 0x10000 + 8 * PAGE_SIZE


@pytest.mark.parametrize("offset,length,message", [
    (1, PAGE_SIZE, "aligned"), (0, 100, "aligned"), (0, 0, "length > 0"),
    (-PAGE_SIZE, PAGE_SIZE, "offset must be"), (PAGE_SIZE, 8 * PAGE_SIZE, "past the region")])
def test_bad_ranges(offset, length, message):
    with pytest.raises(RegionError, match=message):
        PageTable(0, 8).page_range(offset, length)


def test_clean_needs_a_node_copy_and_dirty_is_memory_only(any_move):
    t = PageTable(0, 6)
    t.set(np.array([0, 1]), READONLY)
    t.entry[0] = 7                      # page 1: read-only but its entry gone
    t.set(np.array([2]), NORMAL)
    t.set(np.array([3]), WRITABLE)
    t.set(np.array([4]), DEMOTED)
    t.entry[4] = 8
    pages = np.arange(6)
    assert t.clean(pages).tolist() == [True, False, False, False, False, False]
    assert t.dirty(pages).tolist() == [False, False, True, True, False, False]


def test_counts_and_state_queries(any_move):
    t = PageTable(0, 6)
    t.set(np.array([1, 2]), NORMAL)
    t.set(4, DEMOTED)
    t.set(np.array([2, 5]), READONLY)
    assert t.counts() == {"untouched": 2, "normal": 1, "demoting": 0, "demoted": 1,
                          "readonly": 2, "writable": 0}
    assert t.tally.tolist() == np.bincount(t.state, minlength=6).tolist()
    assert t.pages_in_state(READONLY, 3, 6).tolist() == [5]
    assert t.resident == 3 and t.present().tolist() == [0, 1, 1, 0, 0, 1]


def test_copy_moves_state_to_a_new_base(any_move):
    t = PageTable(0x10000, 3)
    t.set(1, DEMOTED)
    t.entry[1] = 42
    c = t.copy(base=0x90000)
    assert c.base == 0x90000 and c.entry.tolist() == [-1, 42, -1]
    assert c.counts() == t.counts()


def test_runs_of():
    assert runs_of(np.array([1, 2, 3, 7, 9, 10])).tolist() == [[1, 3], [7, 1], [9, 2]]
    assert runs_of(np.array([], np.int64)).shape == (0, 2)


def test_bridged_joins_runs_only_across_pages_in_the_given_state():
    D, N, R = DEMOTED, NORMAL, READONLY
    state = np.array([R, D, R, D, D, R, N, R, R, D, R], np.uint8)
    runs = runs_of(np.array([0, 2, 5, 7, 8, 10]))
    # 0..5 only cross demoted pages; page 6 (normal) breaks; 8..10 cross page 9
    assert bridged(runs, state, DEMOTED).tolist() == [[0, 6], [7, 4]]
    assert bridged(runs[:1], state, DEMOTED).tolist() == [[0, 1]]
    assert bridged(runs, np.full(11, N, np.uint8), DEMOTED).tolist() == runs.tolist()


def test_bridged_takes_at_most_so_many_spare_pages_a_gap():
    D, N, R = DEMOTED, NORMAL, READONLY
    state = np.array([R, R, D, R, N, R, R, R, R, R], np.uint8)
    def spare(pages):
        return state[pages] == R
    runs = runs_of(np.array([0, 3, 5, 9]))
    # gap 1..2 holds one spare page and a demoted one; gap 4 is normal; 6..8 holds 3
    assert bridged(runs, state, DEMOTED, spare, 1).tolist() == [[0, 4], [5, 1], [9, 1]]
    assert bridged(runs, state, DEMOTED, spare, 3).tolist() == [[0, 4], [5, 5]]
    assert bridged(runs, state, DEMOTED, spare, 0).tolist() == [[0, 1], [3, 1], [5, 1],
                                                                [9, 1]]


def test_pages_of_lists_every_page_of_the_runs():
    assert pages_of(np.array([[3, 2], [7, 1], [10, 3]])).tolist() == [3, 4, 7, 10, 11, 12]
    assert pages_of(np.empty((0, 2), np.int64)).tolist() == []


def test_shared_tally_follows_every_change_of_its_tables(any_move):
    rng = np.random.default_rng(9)
    shared = SharedTally(WRITABLE)
    tables = [PageTable(0x10000 * (i + 1), 64) for i in range(3)]
    tables[0].join(shared)
    tables[1].join(shared)
    for step in range(300):
        t = tables[rng.integers(3)]
        state = int(rng.integers(len(STATE_NAMES)))
        if rng.random() < 0.5:
            t.set(int(rng.integers(64)), state)                     # a fault's page
        else:
            t.set(rng.choice(64, rng.integers(1, 10), replace=False), state)
        if step == 150:
            tables[1].leave()                                        # a region goes
            tables[2].join(shared)                                   # another comes
        joined = [x for x in tables if x.shared is shared]
        assert shared.pages == sum(int((x.state == WRITABLE).sum()) for x in joined)


@pytest.mark.parametrize("one", [True, False], ids=["a page", "pages"])
def test_shared_tally_stays_a_plain_int_when_the_state_is_a_numpy_scalar(any_move, one):
    """States read back from a table are numpy scalars (np.unique of a batch's states
    before a demotion failed): the count they change must stay an int, for it goes
    into the node's JSON statistics."""
    shared = SharedTally(WRITABLE)
    table = PageTable(0x10000, 8)
    table.join(shared)
    table.set(np.int64(2) if one else np.arange(3), np.uint8(WRITABLE))
    assert shared.pages == (1 if one else 3) and type(shared.pages) is int


def test_pages_taken_from_another_table_keep_their_states_and_count(checked):
    shared = SharedTally(WRITABLE)
    t = PageTable(0x10000, 6)
    t.join(shared)
    t.take(np.array([1, 2, 3]), np.array([DEMOTED, WRITABLE, DEMOTING], np.uint8),
           np.array([7, -1, -1]))
    assert t.state.tolist() == [UNTOUCHED, DEMOTED, WRITABLE, DEMOTING, UNTOUCHED, UNTOUCHED]
    assert t.entry.tolist() == [-1, 7, -1, -1, -1, -1]
    assert t.tally.tolist() == np.bincount(t.state, minlength=6).tolist()
    assert shared.pages == 1
    with pytest.raises(StateError, match="in use"):   # only onto pages left untouched
        t.take(np.array([3, 4]), np.array([NORMAL, NORMAL], np.uint8), np.array([-1, -1]))
    assert t.state[4] == UNTOUCHED
