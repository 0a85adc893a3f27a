"""CRAM policy, apart from the mechanics that carry it out: the write budget, the
resident limit and its choice of cold pages (CLOCK), node overflow, and the balloon.

Every decision here is a pure function of numbers and numpy arrays, so each is unit
tested without a kernel; the handler asks and then acts.
"""
import numbers

import numpy as np

from ufcram.errors import UfcramError
from ufcram.store.pagetable import PAGE_SIZE
ENTRY_OVERHEAD = 32          # pool bytes an entry costs besides its compressed bytes
TAIL_PERCENTILE = 99.99999   # the write budget's view of "the worst page we will see"


class WriteBudget:
    """How many pages may be writable on the node at once. A fixed number, or "auto":
    as many as the node's free capacity could still hold if each of them came back at
    the tail compression ratio the pool has observed (1.0, incompressible, until the
    pool has seen anything). The budget is the risk dial of the CRAM design."""

    def __init__(self, spec):
        if spec != "auto" and (isinstance(spec, bool) or not isinstance(spec, numbers.Integral)
                               or spec < 0):
            raise UfcramError(f"write budget must be a non-negative int or 'auto', got {spec!r}")
        self.spec = spec

    def allowance(self, capacity, used, tail_ratio):
        """Writable pages allowed now, given the pool's capacity and use in bytes."""
        if self.spec != "auto":
            return int(self.spec)
        per_page = PAGE_SIZE * min(max(tail_ratio, 0.0), 1.0) + ENTRY_OVERHEAD
        return max(0, int((capacity - used) // per_page))


class ResidentLimit:
    """memory.max for one region: past the limit, demote down to a low watermark, so
    that evictions come in batches rather than one page per fault."""

    def __init__(self, limit_bytes, low=0.9):
        if limit_bytes is not None and (isinstance(limit_bytes, bool) or
                                        not isinstance(limit_bytes, numbers.Integral) or
                                        limit_bytes < 0):
            raise UfcramError(f"resident limit must be a non-negative int of bytes or None, "
                              f"got {limit_bytes!r}")
        self.pages = None if limit_bytes is None else limit_bytes // PAGE_SIZE
        self.low = low

    def excess(self, resident_pages):
        """How many pages to demote now (0 while at or under the limit)."""
        if self.pages is None or resident_pages <= self.pages:
            return 0
        return resident_pages - int(self.pages * self.low)


class Clock:
    """Second-chance CLOCK over one region's pages, fed by fault history. User space
    cannot read the hardware accessed bits of its pages (pagemap does not expose them;
    idle-page tracking needs root and physical addresses), but it sees every fault: a
    page that faults in is referenced. The hand clears the bits it passes, so a page
    that stays resident without faulting ages out; if it was hot it faults back soon,
    read-only and cheap, and is referenced again."""

    def __init__(self, npages):
        self.referenced = np.zeros(npages, bool)
        self.hand = 0

    def touch(self, pages):
        self.referenced[pages] = True

    def coldest(self, candidates, n):
        """Up to n page numbers among the True entries of `candidates`, coldest first."""
        npages = len(self.referenced)
        order = np.roll(np.arange(npages), -self.hand)
        pages = order[candidates[order]]
        if n <= 0 or len(pages) == 0:
            return np.empty(0, np.int64)
        referenced = self.referenced[pages]
        cold = np.flatnonzero(~referenced)
        if len(cold) >= n:
            chosen = pages[cold[:n]]
            self.referenced[pages[:cold[n - 1] + 1]] = False   # the hand's first lap
        else:
            self.referenced[pages] = False                    # a full lap, then a second
            chosen = np.concatenate((pages[cold], pages[referenced][:n - len(cold)]))
        self.hand = (int(chosen[-1]) + 1) % npages
        return chosen.astype(np.int64)


class Overflow:
    """Node overflow with hysteresis: the node closes to new entries when the pool
    refuses a store or its use exceeds capacity, and reopens only once use has fallen
    below the low watermark, so it does not flap at the edge."""

    def __init__(self, low=0.9):
        self.low = low
        self.closed = False
        self.events = 0

    def update(self, used, capacity, refused=False):
        if not self.closed and (refused or used > capacity):
            self.closed = True
            self.events += 1
        elif self.closed and used <= capacity * self.low:
            self.closed = False
        return self.closed

    def target(self, used, capacity):
        """Bytes to release (by promotion) to get back under the low watermark."""
        return max(0, int(used - capacity * self.low)) if self.closed else 0


def exposed_pages(capacity, stored_pages, stored_bytes):
    """The balloon: the node's logical capacity in pages follows the measured
    compression ratio (bytes per stored page; a page's worth before anything is stored)."""
    per_page = stored_bytes / stored_pages if stored_pages else PAGE_SIZE
    return int(capacity // max(per_page, 1.0))


class Readahead:
    """Fault-around for one region, like the kernel's swap readahead: a fault right
    after the previous run doubles the window, any other fault shrinks it to one page,
    so sequential scans restore in runs and random access pays for nothing extra.
    "Right after" allows a stretch of pages still in memory between the run and the
    fault (up to a window's worth): a scan over memory partly resident from its last
    pass faults only past those pages, and is still sequential. The fault engine
    (native/engine/plan.c) decides and moves the window; this holds it for the region."""

    def __init__(self, max_pages):
        self.max_pages = max(1, int(max_pages))
        self.cells = np.array([1, -1], np.int64)   # the window, and the page expected next
