"""The handler's view of one application process: its descriptors (uffd, agent,
staging buffer), its regions with their page tables, policies and counters.
"""
import bisect
import mmap
import os
import socket
import stat
import struct

import numpy as np

from .agent import AgentLink
from ufcram.errors import HandlerError, ProtocolError
from ufcram.store.pagetable import NO_ENTRY, PAGE_SIZE, UNTOUCHED, PageTable
from ufcram import config
from .policy import Clock, Readahead, ResidentLimit, WriteBudget
from ufcram.app.uffd import Uffd

COUNTERS = ("faults", "demotions", "clean_redemotions", "restores",
            "promotions", "budget_refusals", "zero_fills", "refused_full", "refused_closed",
            "reaped", "moved")


class ManagedRegion:
    """One registered range of a client: its page table, policies and counters."""

    def __init__(self, rid, table, resident_limit=None, write_budget=0, auto_writable=None):
        self.id = rid
        self.limit = ResidentLimit(resident_limit)
        self.budget = WriteBudget(write_budget)
        # auto budgets are node-wide: their writable pages count in one shared tally
        self.auto_writable = auto_writable if self.budget.spec == "auto" else None
        self.table = None
        self.use(table)
        self.clock = Clock(table.npages)
        self.readahead = Readahead(config.get("UFCRAM_FAULT_AROUND"))
        self.counters = dict.fromkeys(COUNTERS, 0)
        # pages the application freed while they were in flight to the node: their
        # staged copy must not come back
        self.freed_in_flight = np.zeros(table.npages, bool)
        # page -> the address an mremap moved it to while in flight (freed here, then,
        # for the batch; Demotion.settle_moved settles it where it went)
        self.moved_in_flight = {}
        # pages the application has locked (mlock): never demoted (pinned.py)
        self.pinned = np.zeros(table.npages, bool)

    def use(self, table):
        """Hold the region's pages in table from now on (a new one after mremap)."""
        if self.table is not None:
            self.table.leave()
        self.table = table
        if self.auto_writable is not None:
            table.join(self.auto_writable)

    def narrow(self, first, last):
        """Hold only pages [first, last) from now on: the rest was cut away."""
        referenced = self.clock.referenced[first:last]
        self.use(self.table.slice(first, last))
        self.clock = Clock(last - first)
        self.clock.referenced[:] = referenced
        self.readahead = Readahead(config.get("UFCRAM_FAULT_AROUND"))
        self.freed_in_flight = self.freed_in_flight[first:last].copy()
        self.pinned = self.pinned[first:last].copy()

    def stats(self):
        return {"pages": self.table.npages, "resident": self.table.resident,
                **self.table.counts(), **self.counters,
                "pinned": int(np.count_nonzero(self.pinned)),
                "write_budget": self.budget.spec,
                "resident_limit": None if self.limit.pages is None
                else self.limit.pages * PAGE_SIZE}


class Client:
    def __init__(self, conn, uffd=None, parent=None):
        self.conn = conn
        self.pid = self.uid = -1
        if conn is not None:
            self.pid, self.uid, _ = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        self.uffd = uffd
        self.parent = parent          # for a forked child: the client it was forked from
        self.joined = None            # ... and the one its process joined with (its agent)
        self.agent = None
        self.staging = None
        self.staging_pages = None
        self.staging_addr = 0
        self.staging_used = False   # holds pages since its last release_staging()
        self.regions = {}
        self.covers_mappings = False   # HELLO's flag (the preload library)
        self.default_budget = "auto"   # of its regions, for those the handler adds
        self.limit = ResidentLimit(None)   # over all regions (LIMITS), besides each one's
        self.group = None                  # clients whose regions the limit holds over
        self.retired = dict.fromkeys(COUNTERS, 0)   # counters of the regions it released
        # the agent's own drops in flight (agent.AgentDrops), to tell its REMOVE events
        self.agent_drops = None
        self.moves = True   # its agent moves pages out (UFFDIO_MOVE) until it refuses
        self.next_region = 1
        self._starts = []   # region bases, sorted: bisect is cheaper than numpy per fault
        self._ids = []
        self.layout_generation = 0   # changes with the regions or their page tables

    @property
    def ready(self):
        return self.uffd is not None

    @property
    def group_key(self):
        """The clients whose resident limit is one: its group's, or its own."""
        return self.group if self.group is not None else id(self)

    @property
    def agent_tid(self):
        return self.agent.tid if self.agent is not None else -1

    def attach(self, fds, staging_bytes, features):
        """Take the descriptors of HELLO: uffd, agent socket, staging memfd."""
        from ufcram.app.uffd import address_of
        if self.ready:
            raise ProtocolError("HELLO sent twice")
        if len(fds) != 3:
            raise ProtocolError(f"HELLO carries {len(fds)} descriptors, expected 3")
        uffd_fd, agent_fd, staging_fd = fds
        if os.readlink(f"/proc/self/fd/{uffd_fd}") != "anon_inode:[userfaultfd]":
            raise ProtocolError("HELLO's first descriptor is not a userfaultfd")
        # checked before anything is owned: a failure after `fds[:] = []` leaked them
        if not stat.S_ISSOCK(os.fstat(agent_fd).st_mode):
            raise ProtocolError("HELLO's second descriptor is not a socket")
        if staging_bytes <= 0 or staging_bytes % PAGE_SIZE or \
                os.fstat(staging_fd).st_size < staging_bytes:
            raise ProtocolError(f"staging buffer of {staging_bytes} bytes is not usable")
        self.staging = mmap.mmap(staging_fd, staging_bytes)
        os.close(staging_fd)
        fds[:] = []   # owned from here on; closed by close()
        self.staging_pages = np.frombuffer(self.staging, np.uint8).reshape(-1, PAGE_SIZE)
        self.staging_addr = address_of(self.staging)
        self.agent = AgentLink(socket.socket(fileno=agent_fd))
        # a send to an agent socket whose queue is full must fail, not stall the handler
        self.agent.sock.setblocking(False)
        self.uffd = Uffd(uffd_fd, features)

    def release_staging(self):
        """Give the staging buffer's memory back: between demotions it only holds copies
        already stored, and every client would otherwise keep its whole size resident.
        Not after each batch: refilling it costs the agent a page fault per page."""
        if not self.staging_used:
            return
        self.staging_used = False
        try:
            self.staging.madvise(mmap.MADV_REMOVE)
        except (OSError, ValueError):   # not ours to insist on: a client's odd memfd
            pass

    def add_region(self, start, length, resident_limit=None, write_budget=0,
                   auto_writable=None):
        if start % PAGE_SIZE or length <= 0 or length % PAGE_SIZE:
            raise ProtocolError(f"region {start:#x}+{length:#x} is not page-aligned")
        if any(r.table.base < start + length and start < r.table.end
               for r in self.regions.values()):
            raise ProtocolError(f"region {start:#x}+{length:#x} overlaps a registered one")
        try:
            table = PageTable(start, length // PAGE_SIZE)
        except MemoryError:   # else an absurd length drops the client as a handler bug
            raise HandlerError(f"region {start:#x}+{length:#x}: no memory in the handler "
                               "for its page table") from None
        rid = self.next_region
        self.next_region += 1
        self.regions[rid] = ManagedRegion(rid, table, resident_limit, write_budget,
                                          auto_writable)
        self._index()
        return rid

    def carve(self, start, end, keep_used=False):
        """Make room for a region at [start, end) where older regions hold nothing: the
        application unmapped that memory (its pages were reaped) and mapped anew there.
        Each older region keeps what lies outside, cut in two if need be. One that holds
        pages there is refused, or with keep_used left as it is."""
        for region in self.overlapping(start, end):
            table = region.table
            first = max(0, table.page_of(start))
            last = min(table.npages, -(-(end - table.base) // PAGE_SIZE))
            if (table.state[first:last] != UNTOUCHED).any() or \
                    (table.entry[first:last] != NO_ENTRY).any():
                if keep_used:
                    continue
                raise ProtocolError(f"region {start:#x}+{end - start:#x} overlaps pages "
                                    f"of region {region.id} that are still in use")
            if first == 0 and last == table.npages:
                self.remove_region(region.id)
                continue
            if 0 < first and last < table.npages:
                self.adopt(table.slice(last, table.npages), region)
            region.narrow(*((0, first) if first > 0 else (last, table.npages)))
            self._index()

    def gaps(self, start, end):
        """The parts of [start, end) that no region holds, as (start, end) pairs."""
        found, at = [], start
        for region in sorted(self.overlapping(start, end), key=lambda r: r.table.base):
            if region.table.base > at:
                found.append((at, region.table.base))
            at = max(at, region.table.end)
        return found + [(at, end)] if at < end else found

    def check_quota(self, length, max_regions, max_bytes):
        """A client's share of the handler (0: no limit): its page tables cost the
        handler memory in proportion to what it registers."""
        if max_regions and len(self.regions) >= max_regions:
            raise HandlerError(f"client pid {self.pid} has {len(self.regions)} regions, the "
                               f"most allowed (UFCRAM_MAX_REGIONS={max_regions})")
        held = sum(r.table.npages for r in self.regions.values()) * PAGE_SIZE
        if max_bytes and held + length > max_bytes:
            raise HandlerError(f"client pid {self.pid}: {length} more bytes on top of "
                               f"{held} registered exceed UFCRAM_MAX_CLIENT_BYTES={max_bytes}")

    def region(self, rid):
        region = self.regions.get(rid)
        if region is None:
            raise HandlerError(f"no region {rid} for this client")
        return region

    def remove_region(self, rid):
        for key, value in self.region(rid).counters.items():
            self.retired[key] += value
        self.regions[rid].table.leave()
        del self.regions[rid]
        self._index()

    def counters(self):
        """Counters over the client's whole life: its regions, live and released."""
        total = dict(self.retired)
        for region in self.regions.values():
            for key, value in region.counters.items():
                total[key] += value
        return total

    def adopt(self, table, like):
        """A part of region `like` that mremap moved elsewhere becomes a region of its
        own, under the same policies (the application never names it)."""
        rid = self.next_region
        self.next_region += 1
        region = ManagedRegion(rid, table, write_budget=like.budget.spec,
                               auto_writable=like.auto_writable)
        region.limit = like.limit
        self.regions[rid] = region
        self._index()

    def relocate(self, rid, table):
        """Give region rid a new page table (the application moved it with mremap)."""
        self.regions[rid].use(table)
        self._index()

    def locate(self, addr):
        """The region holding addr, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        region = self.regions[self._ids[i]]
        return region if addr < region.table.end else None

    def overlapping(self, start, end):
        return [r for r in self.regions.values() if r.table.base < end and start < r.table.end]

    def _index(self):
        order = sorted(self.regions, key=lambda r: self.regions[r].table.base)
        self._starts = [self.regions[r].table.base for r in order]
        self._ids = order
        self.layout_generation += 1

    def by_address(self):
        """The regions, in address order."""
        return [self.regions[r] for r in self._ids]

    def fork(self, uffd_fd):
        """The client of a forked child: the same regions and entries (shared with the
        parent, as the child's memory is a copy), served through the child's uffd. It has
        no agent: the client the child joins with later drops the pages it reads back
        (Limits.agent_client); those it writes are its own, and promote."""
        child = Client(None, Uffd(uffd_fd, self.uffd.features), parent=self)
        child.limit, child.group = self.limit, self.group   # the same process tree
        for rid, region in self.regions.items():
            mirror = child.regions[rid] = ManagedRegion(rid, region.table.copy())
            # pages freed in flight before the fork are freed in the child too: the
            # staged copies that will settle the child's pages must not bring them back
            mirror.freed_in_flight[:] = region.freed_in_flight
        child._index()
        return child

    def close(self):
        for closable in (self.agent, self.uffd, self.conn):
            if closable is not None:
                closable.close()
        self.staging_pages = None
        if self.staging is not None:
            self.staging.close()
