"""The fault engine's Python face: a client's faults go to native/engine/, which decides
(plan.c) and serves (faults.c) each from the page tables; what it leaves comes back with
its reason.

Python hands over the numbers per call (the limits' room, the write grants, whether the
client's process tree is being demoted) and releases the entries of written pages.
"""
import weakref

import numpy as np

from ufcram import config
from ufcram._shim import ffi, lib
from ufcram.app.uffd import MSG_DTYPE
from ufcram.errors import UffdError
from ufcram.store.pagetable import PAGE_SIZE

MAX_FAULTS = 256   # per call: other descriptors wait at most this many faults


class RegionView:
    """One region's page table as the engine sees it, with the buffers its pointers
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
    """A client's regions in address order, as the array of views the engine searches;
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


class Engine:
    """Calls into the fault engine for the handler, with one set of buffers: msgs (the
    handler's, where the messages it leaves end up, in order) and why, their reasons."""

    def __init__(self, pager, msgs):
        self.pager = pager
        self.pool = pager.pool
        self.msgs = msgs
        self.msgs_ptr = ffi.from_buffer(msgs)
        self.why = np.zeros(len(msgs), np.int32)
        self.spin_ns = int(config.get("UFCRAM_SPIN_US", float) * 1000)
        self.clients = weakref.WeakKeyDictionary()   # client -> ClientViews
        self.regions = weakref.WeakKeyDictionary()   # region -> RegionView
        self.call = call = ffi.new("struct ufc_fault_call *")
        self.released = ffi.new("int64_t[]", MAX_FAULTS)
        # (pages, 4096): fault-around restores up to that many pages at once
        self.bounce = np.zeros((config.get("UFCRAM_FAULT_AROUND") or 1, PAGE_SIZE), np.uint8)
        self.keep = [ffi.from_buffer(self.bounce), ffi.from_buffer("int32_t[]", self.why)]
        call.bounce, call.bounce_pages = self.keep[0], len(self.bounce)
        call.why = self.keep[1]
        call.released, call.max_faults = self.released, MAX_FAULTS

    def serve(self, client, spin=False):
        """Read client's messages and serve their faults (with spin, waiting up to
        UFCRAM_SPIN_US for more); returns (left, regions served in): msgs[:left] are
        left to the caller, in order, with their reasons in why[:left]."""
        views = self.prepare(client)
        left = lib.ufc_serve_faults(client.uffd.fd, self.pool.view(), views.array,
                                    len(views.regions), self.msgs_ptr, len(self.msgs),
                                    self.spin_ns if spin else 0, self.call)
        return self.finish(views, left)

    def serve_msgs(self, client, msgs, cover=True):
        """Serve messages already read (as one read); the same answer as serve()."""
        msgs = np.asarray(msgs, MSG_DTYPE)
        assert len(msgs) <= min(MAX_FAULTS, len(self.msgs))
        self.msgs[:len(msgs)] = msgs
        views = self.prepare(client, cover)
        left = lib.ufc_serve_msgs(client.uffd.fd, self.pool.view(), views.array,
                                  len(views.regions), self.msgs_ptr, len(msgs), self.call)
        return self.finish(views, left)

    def prepare(self, client, cover=True):
        views = self.clients.get(client)
        if views is None or views.generation != client.layout_generation:
            views = self.clients[client] = ClientViews(client, self.regions)
        pager, call = self.pager, self.call
        call.client_limit = -1 if client.limit.pages is None else max(
            0, client.limit.pages - pager.group_others_resident(client))
        call.may_grant = not pager.overflow.closed and client.parent is None
        call.throttle = bool(pager.enforcing) and client.group_key in pager.enforcing
        call.cover = cover and client.covers_mappings
        # the agent that demotes its memory: a forked child's inherited memory is copied
        # by the agent of the client its process joined with, whose faults there must
        # not wait on the demotion they are part of
        agent = pager.agent_client(client)
        call.agent_tid = max(agent.agent_tid, 0) if agent is not None else 0
        self.grants = 0
        if call.may_grant and views.auto is not None:
            in_use, allowed = pager.budget_use(views.auto)
            self.grants = max(0, allowed - in_use)
        call.auto_grants, call.touched = self.grants, views.touched
        return views

    def finish(self, views, left):
        call = self.call
        self.pager.auto_writable.pages += self.grants - call.auto_grants
        if call.nreleased:
            self.pool.release(np.frombuffer(
                ffi.buffer(self.released, 8 * call.nreleased), np.int64).copy())
        served = [self.account(views, i) for i in ffi.unpack(call.touched, call.ntouched)]
        if left < 0:
            raise UffdError(-left, "read(userfaultfd)")
        return left, served

    @staticmethod
    def account(views, i):
        """Count what the engine did in a region into the region's counters."""
        view, region = views.array[i], views.regions[i]
        counters = region.counters
        counters["faults"] += view.faults
        counters["restores"] += view.restored
        counters["promotions"] += view.promoted
        counters["budget_refusals"] += view.promoted
        counters["zero_fills"] += view.zero_filled
        view.faults = view.restored = view.promoted = view.zero_filled = 0
        return region
