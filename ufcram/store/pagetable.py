"""Per-page state of one managed region, in numpy arrays indexed by page number.

A page is in exactly one state; the handler moves it on faults and policy decisions.
"""
import numpy as np

from ufcram import config
from ufcram._shim import lib
from ufcram.errors import RegionError, StateError

# The page and its states are C's (native/common/ufcram_native.h), one list for both sides.
PAGE_SIZE = lib.UFC_PAGE_SIZE

UNTOUCHED = lib.UFC_STATE_UNTOUCHED   # never populated (or freed): reads as zeros
NORMAL = lib.UFC_STATE_NORMAL         # present and writable: normal memory
DEMOTING = lib.UFC_STATE_DEMOTING     # in flight to the node: write-protected, being
                                      # copied out or dropped
DEMOTED = lib.UFC_STATE_DEMOTED       # absent from memory; its bytes live in the pool
                                      # entry (CRAM entry)
READONLY = lib.UFC_STATE_READONLY     # mapped read-only from the node; the entry is
                                      # kept, so a clean page is demoted again by a drop
WRITABLE = lib.UFC_STATE_WRITABLE     # writable on the node under the write budget;
                                      # its stale entry reaped
STATE_NAMES = ("untouched", "normal", "demoting", "demoted", "readonly", "writable")
PRESENT = np.zeros(lib.UFC_NSTATES, bool)   # by state: mapped in the application
PRESENT[[NORMAL, DEMOTING, READONLY, WRITABLE]] = True

NO_ENTRY = -1

# The moves the state machine makes, LEGAL[old, new]; any other is a bug of ours, which
# PageTable.set refuses under UFCRAM_CHECK_STATES=1 (the test suite) and otherwise makes.
LEGAL = np.zeros((lib.UFC_NSTATES, lib.UFC_NSTATES), bool)
for _old, _new in {
    UNTOUCHED: (NORMAL,),                     # first touch (zero-fill, or found in use)
    NORMAL: (DEMOTING,),                      # a dirty demotion starts
    WRITABLE: (NORMAL, DEMOTING),             # promoted in place; a dirty demotion
    DEMOTING: (DEMOTED, READONLY, NORMAL, WRITABLE),  # settled, put back, left in a child
    DEMOTED: (READONLY, WRITABLE, NORMAL, DEMOTING),  # restored; promoted; in a drop span
    READONLY: (WRITABLE, NORMAL, DEMOTING),   # upgraded or promoted; a clean drop
}.items():
    LEGAL[_old, list(_new)] = True
LEGAL[:, UNTOUCHED] = True   # freed (madvise, munmap, forgotten), in flight or not
LEGAL[np.arange(lib.UFC_NSTATES), np.arange(lib.UFC_NSTATES)] = True   # no move at all,
LEGAL[DEMOTING, DEMOTING] = False   # but a page in flight is never put in flight again
CHECK_STATES = bool(config.get("UFCRAM_CHECK_STATES"))


class SharedTally:
    """Pages in one state summed over many page tables (the node's writable pages
    under auto write budgets), kept exact as they change: reading it is O(1) where
    summing every table is O(regions), on every write fault."""

    def __init__(self, state):
        self.state = state
        self.pages = 0


class PageTable:
    """State and pool entry of every page of one region [base, base + npages pages)."""

    def __init__(self, base, npages):
        self.base = base
        self.npages = npages
        self.state = np.zeros(npages, np.uint8)
        self.entry = np.full(npages, NO_ENTRY, np.int64)
        # pages per state, kept exact by set() so counts cost nothing on the fault path
        self.tally = np.zeros(len(STATE_NAMES), np.int64)
        self.tally[UNTOUCHED] = npages
        self.shared = None   # a SharedTally this table's pages count in

    def join(self, shared):
        """Count this table's pages in `shared` from now on."""
        self.leave()
        self.shared = shared
        shared.pages += int(self.tally[shared.state])

    def leave(self):
        if self.shared is not None:
            self.shared.pages -= int(self.tally[self.shared.state])
            self.shared = None

    def set(self, pages, state):
        """Move one page, or an array of distinct pages, to state."""
        if CHECK_STATES:
            self.check_move(pages, state)
        shared = self.shared
        if isinstance(pages, (int, np.integer)):   # a fault's page: no numpy reductions
            tally, old = self.tally, self.state[pages]
            tally[old] -= 1
            tally[state] += 1
            if shared is not None:   # int(): numpy's bools would make the count numpy
                shared.pages += int(state == shared.state) - int(old == shared.state)
        else:
            before = np.bincount(self.state[pages], minlength=len(STATE_NAMES))
            self.tally -= before
            self.tally[state] += len(pages)
            if shared is not None:
                shared.pages += len(pages) * int(state == shared.state) - \
                    int(before[shared.state])
        self.state[pages] = state

    def check_move(self, pages, state):
        """StateError unless every page of pages may move to state (LEGAL)."""
        old = np.atleast_1d(self.state[pages])
        bad = ~LEGAL[old, state]
        if bad.any():
            which = np.atleast_1d(np.arange(self.npages)[pages])[bad]
            raise StateError(
                f"{int(bad.sum())} page(s) of the region at {self.base:#x}, first {which[0]}, "
                f"moved {STATE_NAMES[int(old[bad][0])]} -> {STATE_NAMES[state]}: not a move "
                "of the state machine")

    def take(self, pages, states, entries):
        """Pages that arrive from another table (mremap moved them here, into pages this
        table left untouched): their states and entries as they were, which is not a
        move of the state machine."""
        if not (self.state[pages] == UNTOUCHED).all():
            raise StateError(f"pages moved onto pages of the region at {self.base:#x} "
                             "that are in use")
        self.entry[pages] = entries
        arrived = np.bincount(states, minlength=len(STATE_NAMES))
        self.tally += arrived
        self.tally[UNTOUCHED] -= len(pages)
        if self.shared is not None:
            self.shared.pages += int(arrived[self.shared.state])
        self.state[pages] = states

    def copy(self, base=None):
        """The same pages and entries at another base address (fork, mremap)."""
        other = PageTable(self.base if base is None else base, self.npages)
        other.state[:], other.entry[:], other.tally[:] = self.state, self.entry, self.tally
        return other

    def slice(self, first, last):
        """Pages [first, last) as a table of their own (a region cut apart)."""
        other = PageTable(self.address_of(first), last - first)
        other.state[:], other.entry[:] = self.state[first:last], self.entry[first:last]
        other.tally[:] = np.bincount(other.state, minlength=len(STATE_NAMES))
        return other

    @property
    def end(self):
        return self.base + self.npages * PAGE_SIZE

    def page_of(self, addr):
        return (addr - self.base) // PAGE_SIZE

    def address_of(self, page):
        return self.base + int(page) * PAGE_SIZE

    def page_range(self, offset, length):
        """Pages [first, last) of a byte range; it must be page-aligned and inside."""
        if offset < 0 or length <= 0:
            raise RegionError(f"range offset={offset} length={length}: offset must be >= 0 "
                              "and length > 0")
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise RegionError(f"range offset={offset} length={length} is not aligned to "
                              f"the {PAGE_SIZE}-byte page size")
        if offset + length > self.npages * PAGE_SIZE:
            raise RegionError(f"range offset={offset} length={length} ends past the region "
                              f"({self.npages * PAGE_SIZE} bytes)")
        return offset // PAGE_SIZE, (offset + length) // PAGE_SIZE

    def pages_in_state(self, state, first=0, last=None):
        last = self.npages if last is None else last
        return first + np.flatnonzero(self.state[first:last] == state)

    def clean(self, pages):
        """Mask of pages (an array or a slice) that may be dropped: read-only, and their
        copy on the node (the copy is what makes a drop safe; without one, it stays)."""
        return (self.state[pages] == READONLY) & (self.entry[pages] != NO_ENTRY)

    def dirty(self, pages):
        """Mask of pages whose only copy is in memory: demoting them copies them out."""
        state = self.state[pages]
        return (state == NORMAL) | (state == WRITABLE)

    def present(self, first=0, last=None):
        """Mask of pages mapped in the application's memory."""
        return PRESENT[self.state[first:last]]

    @property
    def resident(self):
        normal, demoting, _, readonly, writable = self.tally.tolist()[1:]   # per fault:
        return normal + demoting + readonly + writable                      # no fancy index

    def counts(self):
        return {name: int(self.tally[i]) for i, name in enumerate(STATE_NAMES)}


def runs_of(pages):
    """Split sorted page numbers into (first, count) runs of consecutive pages."""
    if len(pages) == 0:
        return np.empty((0, 2), np.int64)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return np.stack((pages[starts], ends - starts), axis=1).astype(np.int64)


def bridged(runs, state, across, spare=None, most=0):
    """Runs merged over the gaps between them in which every page is in state `across`,
    or is one `spare(slice)` marks (at most `most` such pages a gap): fewer, longer
    spans, so that a drop takes one madvise where it took one per run. The spare pages
    of a merged gap are in the span, and go with it."""
    if len(runs) < 2:
        return runs
    ends = runs[:-1, 0] + runs[:-1, 1]
    starts = runs[1:, 0]
    lo, hi = int(runs[0, 0]), int(starts[-1])
    crossed = state[lo:hi] == across
    taken = np.zeros(hi - lo, bool) if spare is None else spare(slice(lo, hi)) & ~crossed
    other = np.concatenate(([0], np.cumsum(~crossed & ~taken)))
    extra = np.concatenate(([0], np.cumsum(taken)))
    at, to = ends - lo, starts - lo
    joins = (other[to] == other[at]) & (extra[to] - extra[at] <= most)
    first = np.concatenate(([True], ~joins))
    group = np.cumsum(first) - 1
    last = np.zeros(group[-1] + 1, np.int64)
    np.maximum.at(last, group, runs[:, 0] + runs[:, 1])
    begin = runs[first, 0]
    return np.stack((begin, last - begin), 1).astype(np.int64)


def pages_of(runs):
    """The page numbers a set of runs covers, in order."""
    counts = runs[:, 1]
    offsets = np.repeat(runs[:, 0] - (np.cumsum(counts) - counts), counts)
    return (np.arange(int(counts.sum())) + offsets).astype(np.int64)
