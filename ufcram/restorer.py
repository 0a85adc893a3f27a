"""Read restores in native code (restore.c): a client's read faults on demoted pages are
served from the page tables without a trip through Python, with the fault-around of a
sequential scan; the rest come back in order.

Python keeps deciding: the tables say which pages are demoted and where their entries
are, the limits bound what comes in. The native loop moves only DEMOTED -> READONLY.
"""
import ctypes
import logging
import weakref

import lz4.block
import numpy as np

from . import config
from ._shim import ffi, lib
from .errors import UffdError

log = logging.getLogger("ufcram.handler")
MAX_FAULTS = 256   # per call: other descriptors wait at most this many faults


def lz4_decompress():
    """LZ4_decompress_safe of the lz4 package's extension, the library the pool
    compresses with; None where it is not exported (restores then stay in Python)."""
    try:
        lib_ = ctypes.CDLL(lz4.block._block.__file__)
        return ctypes.cast(lib_.LZ4_decompress_safe, ctypes.c_void_p).value
    except (AttributeError, OSError) as e:
        log.debug("no native restores: %s", e)
        return None


class RegionViews:
    """A client's regions as restore.c sees them, built once per layout of the client;
    it holds the buffers its pointers point into."""

    def __init__(self, client):
        regions = client.by_address()
        self.regions = regions
        self.generation = client.layout_generation
        self.array = ffi.new("struct ufc_region_view[]", max(1, len(regions)))
        self.touched = ffi.new("int[]", max(1, len(regions)))
        self.buffers = []
        for view, region in zip(self.array, regions):
            table = region.table
            view.base, view.npages = table.base, table.npages
            view.state = self.hold("uint8_t[]", table.state)
            view.entry = self.hold("int64_t[]", table.entry)
            view.tally = self.hold("int64_t[]", table.tally)
            view.referenced = self.hold("uint8_t[]", region.clock.referenced)
            view.readahead = self.hold("int64_t[]", region.readahead.cells)
            view.readahead_max = region.readahead.max_pages
            view.limit = -1 if region.limit.pages is None else region.limit.pages

    def hold(self, ctype, array):
        buf = ffi.from_buffer(ctype, array, require_writable=True)
        self.buffers.append(buf)
        return buf


class Restorer:
    def __init__(self, pool, msgs, bounce):
        self.pool = pool
        self.msgs = msgs
        self.msgs_ptr = ffi.from_buffer(msgs)
        self.bounce = bounce   # (pages, 4096): fault-around restores up to that many
        self.bounce_ptr = ffi.from_buffer(bounce)
        self.spin_ns = int(config.get("UFCRAM_SPIN_US", float) * 1000)
        fn = lz4_decompress() if config.get("UFCRAM_NATIVE_RESTORE") else None
        self.enabled = fn is not None
        self.pool_view = ffi.new("struct ufc_pool_view *")
        self.decompress = ffi.cast("int (*)(const char *, char *, int, int)", fn or 0)
        self.pool_generation = None
        self.pool_arrays = None
        self.views = weakref.WeakKeyDictionary()   # client -> RegionViews
        self.ntouched = ffi.new("int *")
        self.nmsgs = ffi.new("int *")

    def serve(self, client, spin):
        """Read client's messages, restoring what the native loop can (and, with spin,
        waiting up to UFCRAM_SPIN_US for more); returns (first, n): msgs[first:n] are
        the caller's to serve, in order, and the regions restored into."""
        views = self.views.get(client)
        if views is None or views.generation != client.layout_generation:
            views = self.views[client] = RegionViews(client)
        limit = -1 if client.limit.pages is None else client.limit.pages
        first = lib.ufc_restore_reads(
            client.uffd.fd, self.current_pool(), views.array, len(views.regions), limit,
            self.msgs_ptr, len(self.msgs), MAX_FAULTS, self.spin_ns if spin else 0,
            self.bounce_ptr, len(self.bounce), views.touched, self.ntouched, self.nmsgs)
        if first < 0:
            raise UffdError(-first, "read(userfaultfd)")
        return first, self.nmsgs[0], [self.account(views, i)
                                      for i in ffi.unpack(views.touched, self.ntouched[0])]

    @staticmethod
    def account(views, i):
        """Count a region's native faults and restores as Python's would (and the
        restores apart, as native_restores)."""
        view, region = views.array[i], views.regions[i]
        region.counters["faults"] += view.faults
        region.counters["restores"] += view.restored
        region.counters["native_restores"] += view.restored
        view.faults = view.restored = 0
        return region

    def current_pool(self):
        if self.pool_generation != self.pool.layout_generation:
            location, size, arenas = self.pool.layout()
            # held until the next layout: the view points into them
            self.pool_arrays = [ffi.from_buffer("int64_t[]", location),
                                ffi.from_buffer("int16_t[]", size),
                                ffi.from_buffer("uint64_t[]", arenas)]
            view = self.pool_view
            view.location, view.size, view.arena = self.pool_arrays
            view.nhandles, view.narenas = len(location), len(arenas)
            view.decompress = self.decompress
            self.pool_generation = self.pool.layout_generation
        return self.pool_view
