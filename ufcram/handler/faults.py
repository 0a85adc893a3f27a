"""The pager: moves pages between states on faults and on policy decisions, through the
application's uffd and agent. It is the CRAM state machine of DESIGN.md, one method a
transition; it runs in the handler's single thread. Faults and the books of pool entries
are here; demotion (demotion.py) and limits (limits.py) are the rest of its class.
"""
import errno
import logging
import weakref

import numpy as np

from ufcram import config
from .demotion import Demotion
from ufcram.errors import UffdError, UffdRetry
from .guard import Repeats
from .limits import Limits
from ufcram.store.pagetable import (DEMOTED, DEMOTING, NO_ENTRY, NORMAL, PAGE_SIZE, READONLY,
                        UNTOUCHED, WRITABLE, SharedTally)
from .policy import TAIL_PERCENTILE
from ufcram.app.uffd import FLAG_WP, FLAG_WRITE, address_of

log = logging.getLogger("ufcram.handler")


class Pager(Demotion, Limits):
    def __init__(self, pool, overflow, clients, serve_uffd, agent_timeout_ms, repeats=None):
        self.pool = pool
        self.repeats = repeats or Repeats(log)
        self.overflow = overflow
        self.clients = clients          # uffd fd -> Client, shared with the handler
        self.serve_uffd = serve_uffd    # reads and dispatches one uffd's messages
        self.agent_timeout_ms = agent_timeout_ms
        self.spin = config.get("UFCRAM_SPIN_US", float) / 1e6   # the handler's too
        # restores decompress here, then one UFFDIO_COPY installs the whole run
        self.bounce = np.zeros((config.get("UFCRAM_FAULT_AROUND") or 1, PAGE_SIZE), np.uint8)
        self.bounce_addr = address_of(self.bounce)
        self.zeros = np.zeros(PAGE_SIZE, np.uint8)
        self.zeros_addr = address_of(self.zeros)
        self.deferred = []              # faults on pages in flight, resolved after it
        self.enforcing = set()          # groups being demoted to their resident limit
        self.others = weakref.WeakKeyDictionary()   # client -> (when, its group's others)
        self.throttled = []             # their faults that would add a page meanwhile
        self.extra_owners = np.zeros(0, np.int32)   # per pool handle, beyond the first
        # writable pages of every region under an auto budget: the budgets share them
        self.auto_writable = SharedTally(WRITABLE)

    # --- faults --------------------------------------------------------------------
    def fault(self, client, addr, flags, tid):
        """Resolve one fault; returns the region it fell in (None outside every one).
        It never raises: it runs in drains nested in await_agent, where anything raised
        would unwind the demotion in flight, perhaps another client's."""
        region = None
        try:
            region = client.locate(addr)
            if self.enforcing and not flags & FLAG_WP and tid != client.agent_tid and \
                    client.group_key in self.enforcing:
                # its group is over its resident limit and being demoted: a page more
                # waits until that is done, as a cgroup reclaims before it charges
                self.throttled.append((client, addr, flags, tid))
                return region
            self.resolve(client, region, addr, flags, tid)
        except UffdRetry:
            self.deferred.append((client, addr, flags, tid))
        except UffdError as e:
            if e.errno not in (errno.ENOENT, errno.ESRCH):   # range or process gone
                log.error("client pid %d: fault at %#x: %s", client.pid, addr, e)
        except Exception as e:
            # A bug of ours: retried with the deferred ones (after this batch, then
            # every loop turn), never dropped, which would hang its thread for good,
            # nor resolved some simpler way: a page installed behind the books' back
            # (unprotected but still READONLY, later dropped as clean) loses data
            # silently, where a retry at worst keeps a thread waiting, said in the log,
            # and clears by itself if the cause passes (a state an event changes).
            self.repeats.warn(client, f"serving a fault failed unexpectedly: {e!r}",
                              exc_info=True)
            self.deferred.append((client, addr, flags, tid))
        return region

    def resolve(self, client, region, addr, flags, tid):
        """The transition a fault asks for, by the page's state (DESIGN.md's table)."""
        if region is None:
            # registered but in no region (e.g. grown in place by mremap, or released
            # while still registered): untouched memory, or a page left protected
            if flags & FLAG_WP:
                return client.uffd.writeprotect(addr, PAGE_SIZE, protect=False)
            return self.map_zeros(client, addr, flags & FLAG_WRITE)
        table = region.table
        page = table.page_of(addr)
        state = table.state[page]
        region.counters["faults"] += 1
        if state == DEMOTING:
            if tid == client.agent_tid:
                # the agent copying a page the application freed: zeros. Protected,
                # so that a write landing before the agent's drop faults and waits
                # for the batch instead of being dropped with the page.
                return client.uffd.copy(addr, self.zeros_addr, PAGE_SIZE, wp=True)
            return self.deferred.append((client, addr, flags, tid))
        region.clock.touch(page)
        write = bool(flags & (FLAG_WRITE | FLAG_WP))
        if table.entry[page] != NO_ENTRY and not (flags & FLAG_WP and state == READONLY):
            return self.restore(client, region, page, write)
        if flags & FLAG_WP:
            if state == READONLY:
                return self.upgrade(client, region, page)
            return client.uffd.writeprotect(addr, PAGE_SIZE, protect=False)   # stale
        self.zero_fill(client, region, page, flags & FLAG_WRITE)

    def zero_fill(self, client, region, page, write):
        """First touch (or a page the application dropped): zeros, normal memory. The
        untouched pages ahead get the shared zero page too (fault-around), so a
        sequential first touch costs one fault per window, not one per page."""
        table = region.table
        count = self.run_length(region, page, UNTOUCHED)
        self.map_zeros(client, table.address_of(page), write)
        if count > 1:   # the kernel stops at a page already there: only those before it
            try:
                count = 1 + client.uffd.zeropage(table.address_of(page + 1),
                                                 (count - 1) * PAGE_SIZE) // PAGE_SIZE
            except UffdError as e:
                if e.errno != errno.ENOENT:
                    raise
                count = 1   # the window crosses into another mapping (a split region)
        table.set(np.arange(page, page + count), NORMAL)
        region.counters["zero_fills"] += count

    def map_zeros(self, client, addr, write):
        if write:   # a private zeroed page now spares the write its copy-on-write
            client.uffd.copy(addr, self.zeros_addr, PAGE_SIZE)
        else:
            client.uffd.zeropage(addr, PAGE_SIZE)

    def run_length(self, region, page, state):
        """Pages from `page` on to bring in now: the readahead window, cut at the first
        page of the run ahead that is not in `state`."""
        skipped = region.readahead.skipped(page)
        read_through = skipped is not None and bool(region.table.present(*skipped).all())
        want = min(region.readahead.pages(page, read_through), len(self.bounce),
                   region.table.npages - page)
        if want <= 1:   # random access: the common case, kept free of numpy calls
            region.readahead.ran(page, 1)
            return 1
        ahead = region.table.state[page + 1:page + want] != state
        count = 1 + (int(np.argmax(ahead)) if ahead.any() else want - 1)
        region.readahead.ran(page, count)
        return count

    def restore(self, client, region, page, write):
        """A fault on a page held by the node. A read maps the node's copy read-only and
        keeps the entry (with the demoted pages ahead, fault-around); a write gets a
        writable page, on the node within the write budget, else promoted."""
        table = region.table
        count = 1 if write else self.run_length(region, page, DEMOTED)
        if count == 1:   # one page: the scalar paths, cheaper than numpy's per call
            pages = page
            self.pool.load(int(table.entry[page]), self.bounce[0])
        else:
            pages = np.arange(page, page + count)
            self.pool.load_many(table.entry[pages], self.bounce[:count])
        try:
            done = client.uffd.copy(table.address_of(page), self.bounce_addr,
                                    count * PAGE_SIZE, wp=not write) // PAGE_SIZE
        except UffdError as e:
            if e.errno != errno.ENOENT or count == 1:
                raise
            # The run crosses into another mapping of the region (mlock, mprotect or a
            # madvise split it): the kernel installs within one mapping only, and the
            # fault, taken for a range gone, would never be served. Its page alone.
            count, pages = 1, page
            done = client.uffd.copy(table.address_of(page), self.bounce_addr, PAGE_SIZE,
                                    wp=not write) // PAGE_SIZE
        if 1 < count and done < count:
            # the kernel stopped at a page already there: only those before it came in
            # (the faulting page itself is there either way)
            count = max(done, 1)
            pages = pages[:count]
        region.counters["restores"] += count
        if write:
            self.release(table, page)
            self.writable_or_promoted(client, region, page)
        else:
            table.set(pages, READONLY)

    def upgrade(self, client, region, page):
        """A write to a read-only page: its node copy becomes stale and is reaped, once
        the page is writable (an ioctl refused with EAGAIN leaves it read-only, whole)."""
        client.uffd.writeprotect(region.table.address_of(page), PAGE_SIZE, protect=False)
        self.release(region.table, page)
        self.writable_or_promoted(client, region, page)

    def writable_or_promoted(self, client, region, page):
        if self.grant_write(client, region):
            region.table.set(page, WRITABLE)
        else:
            region.table.set(page, NORMAL)
            region.counters["promotions"] += 1
            region.counters["budget_refusals"] += 1

    def grant_write(self, client, region):
        """CRAM's `if writable < write_budget`; never while the node is closed, never for
        a forked child (it has no agent to demote its pages again)."""
        if self.overflow.closed or client.parent is not None:
            return False
        in_use, allowed = self.budget_use(region)
        return in_use < allowed

    def budget_use(self, region):
        """(pages writable, pages allowed) under region's budget; an auto budget is
        node-wide and sized from the pool's free capacity and its ratio tail."""
        if region.budget.spec != "auto":
            return int(region.table.tally[WRITABLE]), region.budget.spec
        allowed = region.budget.allowance(self.pool.capacity, self.pool.mem_used_total,
                                          self.pool.ratio_percentile(TAIL_PERCENTILE))
        return self.auto_writable.pages, allowed

    def writable_total(self, auto_only=False):
        """O(regions): for statistics and the scan's check of auto_writable."""
        return sum(int(r.table.tally[WRITABLE]) for c in self.clients.values()
                   for r in c.regions.values() if not auto_only or r.budget.spec == "auto")

    def share(self, handles):
        """One more owner for each entry (a forked child holds its parent's entries)."""
        if len(handles) == 0:
            return
        top = int(handles.max()) + 1
        if top > len(self.extra_owners):
            grown = np.zeros(max(top, 2 * len(self.extra_owners)), np.int32)
            grown[:len(self.extra_owners)] = self.extra_owners
            self.extra_owners = grown
        np.add.at(self.extra_owners, handles, 1)

    def release(self, table, pages):
        """Drop pages' hold on their pool entries; an entry is freed with its last owner."""
        if np.ndim(pages) == 0:
            return self.release_one(table, pages)
        pages = np.asarray(pages)
        held = table.entry[pages]
        held = held[held != NO_ENTRY]
        table.entry[pages] = NO_ENTRY
        self.release_entries(held)
        return len(held)

    def release_entries(self, held):
        """One hold less on each of these entries (pages no longer refer to them)."""
        if len(held):
            shared = held < len(self.extra_owners)
            shared[shared] = self.extra_owners[held[shared]] > 0
            np.subtract.at(self.extra_owners, held[shared], 1)
            self.pool.free_many(held[~shared])

    def release_one(self, table, page):
        """release() of one page (a write fault's), without numpy's per-call cost."""
        held = int(table.entry[page])
        if held == NO_ENTRY:
            return 0
        table.entry[page] = NO_ENTRY
        if held < len(self.extra_owners) and self.extra_owners[held] > 0:
            self.extra_owners[held] -= 1
        else:
            self.pool.free(held)
        return 1

    def resolve_deferred(self):
        pending, self.deferred = self.deferred, []
        for client, addr, flags, tid in pending:
            if client.ready:
                self.fault(client, addr, flags, tid)
