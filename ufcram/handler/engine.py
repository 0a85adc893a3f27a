"""The fault fast path (engine/faults.c): a client's faults on demoted and read-only pages are
served from the page tables without a trip through Python; the rest come back in order.

Python keeps deciding: the tables say which pages are demoted or read-only and where
their entries are, the limits bound what comes in, the budgets' grants are handed over
per call, and the entries of written pages come back here to be released.
"""
import logging
import weakref

import numpy as np

from ufcram import config
from ufcram._shim import ffi, lib
from ufcram.errors import UffdError

log = logging.getLogger("ufcram.handler")
MAX_FAULTS = 256   # per call: other descriptors wait at most this many faults


class RegionView:
    """One region's page table as engine/faults.c sees it, with the buffers its pointers
    point into; built once per table and address (mremap moves a whole region by
    rebasing its table: a view left at the old address would serve a mapping put there
    later with the moved pages' entries, and books them as back in memory)."""

    def __init__(self, region):
        table = region.table
        self.table = table
        self.struct = view = ffi.new("struct ufc_region_view *")
        self.buffers = []
        view.base, view.npages = table.base, table.npages
        view.state = self.hold("uint8_t[]", table.state)
        view.entry = self.hold("int64_t[]", table.entry)
        view.tally = self.hold("int64_t[]", table.tally)
        view.referenced = self.hold("uint8_t[]", region.clock.referenced)
        view.readahead = self.hold("int64_t[]", region.readahead.cells)
        view.readahead_max = region.readahead.max_pages
        view.limit = -1 if region.limit.pages is None else region.limit.pages
        view.budget = -1 if region.budget.spec == "auto" else region.budget.spec

    def hold(self, ctype, array):
        buf = ffi.from_buffer(ctype, array, require_writable=True)
        self.buffers.append(buf)
        return buf


class ClientViews:
    """A client's regions in address order, as the array of views engine/faults.c searches;
    rebuilt when the client's regions change, from views kept per region, so that a
    program that maps region after region pays O(regions) in C, not in Python."""

    def __init__(self, client, cache):
        self.regions = client.by_address()
        self.generation = client.layout_generation
        views = []
        for region in self.regions:
            view = cache.get(region)
            if view is None or view.table is not region.table or \
                    view.struct.base != region.table.base:
                view = cache[region] = RegionView(region)
            views.append(view)
        self.views = views   # the array points into them
        self.array = ffi.new("struct ufc_region_view *[]", [v.struct for v in views])
        self.touched = ffi.new("int[]", max(1, len(views)))
        self.auto = next((r for r in self.regions if r.budget.spec == "auto"), None)


class FastPath:
    def __init__(self, pager, msgs):
        self.pager = pager
        self.pool = pager.pool
        self.msgs = msgs
        self.msgs_ptr = ffi.from_buffer(msgs)
        self.spin_ns = int(config.get("UFCRAM_SPIN_US", float) * 1000)
        self.enabled = bool(config.get("UFCRAM_FAST_PATH"))
        self.clients = weakref.WeakKeyDictionary()   # client -> ClientViews
        self.regions = weakref.WeakKeyDictionary()   # region -> RegionView
        self.call = ffi.new("struct ufc_fault_call *")
        self.released = ffi.new("int64_t[]", MAX_FAULTS)
        # (pages, 4096): fault-around restores up to that many pages at once
        self.bounce = ffi.from_buffer(pager.bounce)
        self.call.bounce, self.call.bounce_pages = self.bounce, len(pager.bounce)
        self.call.released, self.call.max_faults = self.released, MAX_FAULTS

    def serve(self, client, spin):
        """Read client's messages, serving what the fast path can (and, with spin,
        waiting up to UFCRAM_SPIN_US for more); returns (first, n, regions served in):
        msgs[first:n] are the caller's to serve, in order."""
        views = self.clients.get(client)
        if views is None or views.generation != client.layout_generation:
            views = self.clients[client] = ClientViews(client, self.regions)
        call = self.call
        call.client_limit = -1 if client.limit.pages is None else max(
            0, client.limit.pages - self.pager.group_others_resident(client))
        call.may_grant = not self.pager.overflow.closed and client.parent is None
        grants = 0
        if call.may_grant and views.auto is not None:
            in_use, allowed = self.pager.budget_use(views.auto)
            grants = max(0, allowed - in_use)
        call.auto_grants, call.touched = grants, views.touched
        first = lib.ufc_serve_faults(client.uffd.fd, self.pool.view(), views.array,
                                     len(views.regions), self.msgs_ptr, len(self.msgs),
                                     self.spin_ns if spin else 0, call)
        self.pager.auto_writable.pages += grants - call.auto_grants
        if call.nreleased:
            self.pager.release_entries(np.frombuffer(
                ffi.buffer(self.released, 8 * call.nreleased), np.int64).copy())
        served = [self.account(views, i) for i in ffi.unpack(call.touched, call.ntouched)]
        if first < 0:
            raise UffdError(-first, "read(userfaultfd)")
        return first, call.nmsgs, served

    @staticmethod
    def account(views, i):
        """Count a region's faults served here as Python counts its own (and apart, as
        fast_path_faults)."""
        view, region = views.array[i], views.regions[i]
        counters = region.counters
        counters["faults"] += view.faults
        counters["fast_path_faults"] += view.faults
        counters["restores"] += view.restored
        counters["promotions"] += view.promoted
        counters["budget_refusals"] += view.promoted
        view.faults = view.restored = view.promoted = 0
        return region

