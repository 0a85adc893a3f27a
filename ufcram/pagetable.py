"""Per-page state of one managed region, in numpy arrays indexed by page number.

A page is in exactly one state; the handler moves it on faults and policy decisions.
"""
import numpy as np

from .errors import RegionError

PAGE_SIZE = 4096

UNTOUCHED = 0   # never populated: reads as zeros, costs nothing
NORMAL = 1      # present and writable in the application's memory
DEMOTING = 2    # write-protected and being copied out by the agent
DEMOTED = 3     # absent from memory; its bytes live in the pool entry
STATE_NAMES = ("untouched", "normal", "demoting", "demoted")

NO_ENTRY = -1


class PageTable:
    """State and pool entry of every page of one region [base, base + npages pages)."""

    def __init__(self, base, npages):
        self.base = base
        self.npages = npages
        self.state = np.zeros(npages, np.uint8)
        self.entry = np.full(npages, NO_ENTRY, np.int64)

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

    def counts(self):
        hist = np.bincount(self.state, minlength=len(STATE_NAMES))
        return {name: int(hist[i]) for i, name in enumerate(STATE_NAMES)}


def runs_of(pages):
    """Split sorted page numbers into (first, count) runs of consecutive pages."""
    if len(pages) == 0:
        return np.empty((0, 2), np.int64)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return np.stack((pages[starts], ends - starts), axis=1).astype(np.int64)
