"""A managed anonymous region: memory whose pages the node may demote into its
compressed pool, read and written through numpy views like any other memory.
"""
import json
import mmap
import numbers

import numpy as np

from ufcram import protocol as P
from ufcram.errors import HandlerError, RegionClosedError, RegionError
from .node import Node
from ufcram.store.pagetable import PAGE_SIZE, PageTable
from ufcram.protocol import AUTO_BUDGET, NO_LIMIT
from .uffd import address_of


# Mappings of regions whose handler stopped answering without hanging up: unmapping
# them would wait on it for as long as it lives. Unregistering them would turn lost
# pages into silent zeros. They stay mapped while this process lives.
_UNRELEASED = []


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise RegionError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _limit(value):
    if value is None:
        return NO_LIMIT
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise RegionError(f"resident_limit must be a non-negative number of bytes or None, "
                          f"got {value!r}")
    return int(value)


def _budget(value):
    if value == "auto":
        return AUTO_BUDGET
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise RegionError(f"write_budget must be a non-negative number of pages or 'auto', "
                          f"got {value!r}")
    return int(value)


class Region:
    """`resident_limit` (bytes, or None): past it the node demotes the region's coldest
    pages, like a cgroup's memory.max. `write_budget` (pages, or "auto"): how many of
    its pages may be writable on the node before a write promotes the page instead."""

    def __init__(self, nbytes, node=None, resident_limit=None, write_budget="auto"):
        nbytes = _positive_int(nbytes, "region size")
        limit = _limit(resident_limit)
        budget = _budget(write_budget)
        self.nbytes = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
        self.node = node if node is not None else Node.default()
        if self.node.closed:
            raise RegionClosedError("the node is closed")
        if self.node.observer:
            raise RegionError("this process only observes the node (observe=True): it "
                              "cannot hold a region there")
        self._mm = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # huge pages would defeat page-granular demotion
        self._mm.madvise(mmap.MADV_NOHUGEPAGE)
        self.address = address_of(self._mm)
        self._bounds = PageTable(self.address, self.nbytes // PAGE_SIZE)
        conn = self.node.connection
        conn.uffd.register(self.address, self.nbytes)
        try:
            self.id = conn.count(P.REGISTER, self.address, self.nbytes, limit, budget)
        except BaseException:
            conn.uffd.unregister(self.address, self.nbytes)
            self._mm.close()
            raise
        self.node.regions.add(self)
        self.closed = False

    def _conn(self):
        if self.closed:
            raise RegionClosedError("region is closed")
        return self.node.connection

    def array(self, dtype=np.uint8, shape=None, offset=0):
        """A numpy view of the region's memory (no copy)."""
        self._conn()
        dtype = np.dtype(dtype)
        if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
            raise RegionError(f"offset must be a non-negative integer, got {offset!r}")
        if shape is None:
            shape = ((self.nbytes - offset) // dtype.itemsize,)
        shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
        count = int(np.prod(shape, dtype=np.int64))
        if offset + count * dtype.itemsize > self.nbytes:
            raise RegionError(f"{count} x {dtype} at offset {offset} does not fit in "
                              f"{self.nbytes} bytes")
        return np.frombuffer(self._mm, dtype, count, offset).reshape(shape)

    def demote(self, offset=0, length=None):
        """Demote the resident pages of [offset, offset + length) into the node's pool;
        returns how many pages were demoted. The range must be page-aligned."""
        conn = self._conn()
        length = self.nbytes - offset if length is None else length
        self._bounds.page_range(offset, length)   # clear errors before any work
        return conn.count(P.DEMOTE, self.id, offset, length)

    def stats(self):
        return json.loads(self._conn().call(P.STATS, self.id))

    def close(self):
        """Release the region, handler side included. Live numpy views keep their
        bytes: the region's pages are restored to plain memory before it is let go."""
        if self.closed:
            return
        conn = self._conn()
        self.closed = True
        self.node.regions.discard(self)
        # munmap of a registered range waits until the handler reads the UNMAP event:
        # make sure it is there first, or fail loudly
        try:
            conn.call(P.PING)
        except HandlerError as e:
            if not conn.handler_gone:
                _UNRELEASED.append(self._mm)
                raise
            # Hung up: the agent thread reads the events now, so the unmap returns. The
            # range is never unregistered: with views alive, lost pages raise SIGBUS.
            try:
                self._mm.close()
            except BufferError:
                pass
            raise HandlerError(f"{e}; the region is closed, and the pages the node held "
                               "for it are lost") from e
        try:
            self._mm.close()
            restore = False
        except BufferError:   # views still use the memory
            restore = True
        conn.count(P.UNREGISTER, self.id, int(restore))
        if restore:
            conn.uffd.unregister(self.address, self.nbytes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"at {self.address:#x}"
        return f"<ufcram.Region {self.nbytes} bytes {state}>"
