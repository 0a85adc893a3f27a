"""The pool's accounting, in the manner of zram's mm_stat: capacity, physical use and its
peak, and the percentiles of per-page compression ratios that size write budgets.
"""
import math
from fractions import Fraction

import numpy as np

from ufcram.errors import PoolError
from .pagetable import PAGE_SIZE

PERCENTILES = (50, 90, 99, 99.9, 99.99, 99.999, 99.9999, 99.99999)


def checked_capacity(value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise PoolError(f"capacity must be a non-negative int, got {value!r}")
    return int(value)


class Accounting:
    """The part of the Pool (pool.py) that counts, in O(1) but for the percentiles,
    which are cached until the size histogram changes."""

    @property
    def capacity(self):
        """Byte limit of arena memory; settable at run time, also below current use."""
        self._own()
        return self._capacity_bytes

    @capacity.setter
    def capacity(self, value):
        self._own()
        self._capacity_bytes = checked_capacity(value)

    @property
    def over_capacity(self):
        """True when arena memory exceeds capacity: stores needing new memory are refused."""
        self._own()
        return self._arena_bytes > self._capacity_bytes

    @property
    def mem_used_total(self):
        """Physical use (arena_bytes + metadata) in O(1), for decisions on the fault path."""
        self._own()
        return self._arena_bytes + self._meta

    def sizes(self, handles):
        """Stored bytes of each entry (0: same-filled, held in its handle alone)."""
        return self._size[np.asarray(handles, np.int64)]

    def orphans(self, held):
        """Live handles not among `held` (what the page tables refer to): entries nothing
        can reach any more, for the handler's periodic reconciliation."""
        self._own()
        held = np.asarray(held, np.int64)
        live = np.flatnonzero(self._size[:self._handles_issued] >= 0)
        return np.setdiff1d(live, held[held >= 0], assume_unique=False)

    def __len__(self):
        self._own()
        return self._handles_issued - self._handles_free

    def __contains__(self, handle):
        self._own()
        try:
            self._handle(handle)
        except PoolError:
            return False
        return True

    def ratio_percentile(self, q):
        """Per-page compression ratio at percentile q in [0, 100] (nearest rank) over every
        page ever stored. Ratio = stored bytes / 4096: 0 same-filled, 1.0 stored raw;
        larger is worse. 1.0, the pessimistic value, before any store."""
        self._own()
        if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)) \
                or not 0 <= q <= 100:
            raise PoolError(f"percentile must be a number in [0, 100], got {q!r}")
        ratio = self._percentiles.get(q)
        if ratio is None:
            ratio = self._percentiles[q] = self._percentile(q)
        return ratio

    def _percentile(self, q):
        total = int(self._size_histogram.sum())
        if not total:
            return 1.0
        rank = max(1, math.ceil(Fraction(str(float(q))) * total / 100))
        return int(np.searchsorted(np.cumsum(self._size_histogram), rank)) / PAGE_SIZE

    def stats(self):
        """zram-style counters (mem_used_total: see the class docstring), in O(1)."""
        self._own()
        used, live = self.mem_used_total, len(self)
        return {
            "orig_data_size": live * PAGE_SIZE, "compr_data_size": self._live_bytes,
            "mem_used_total": used, "mem_limit": self._capacity_bytes,
            "mem_used_max": max(self._peak, used),
            "same_pages": self._live_same, "pages_compacted": self._compacted,
            "huge_pages": self._live_huge, "pages_stored": live,
            "arena_bytes": self._arena_bytes, "meta_bytes": self._meta,
            "ratio_percentiles": {f"p{q}": self.ratio_percentile(q) for q in PERCENTILES},
        }
