"""The pager: moves pages between states on faults and on policy decisions, through the
application's uffd and agent. It is the CRAM state machine of DESIGN.md, one method a
transition; it runs in the handler's single thread.
"""
import errno
import logging
import os
import select
import time
import weakref

import numpy as np

from . import config, pinned
from ._shim import lib
from .agent import MAX_RUNS
from .errors import HandlerError, UffdError, UffdRetry
from .guard import Repeats
from .pagetable import (DEMOTED, DEMOTING, NO_ENTRY, NORMAL, PAGE_SIZE, READONLY,
                        UNTOUCHED, WRITABLE, SharedTally, bridged, pages_of, runs_of)
from .policy import TAIL_PERCENTILE
from .uffd import FLAG_WP, FLAG_WRITE, address_of
from .wakeup import poll_spinning

log = logging.getLogger("ufcram.handler")
POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR
DROP_BATCH = 4096   # pages per clean re-demotion command (no staging needed)
# Read-only pages a drop span may take with it between two chosen runs. A span costs a
# madvise, its TLB shootdown and a REMOVE round trip (~30 µs); a clean page dropped
# early costs a read fault only if it is used before its turn would have come.
DROP_BRIDGE = 2
OTHERS_TTL = 0.002   # seconds a sum of a group's other clients' resident pages is kept


def batches(pages, max_pages, max_runs, keep=None):
    """Split sorted pages into batches of at most max_pages pages and max_runs runs.
    `keep(pages)` (a mask) is asked again as each batch is cut, of the pages left: the
    faults served while one batch waits on the agent change the states of the rest."""
    while len(pages):
        if keep is not None:
            pages = pages[keep(pages)]
            if not len(pages):
                return
        chunk = pages[:max_pages]
        runs = runs_of(chunk)
        if len(runs) > max_runs:
            chunk = chunk[:int(runs[:max_runs, 1].sum())]
            runs = runs[:max_runs]
        yield chunk, runs
        pages = pages[len(chunk):]


class Pager:
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

    # --- demotion ------------------------------------------------------------------
    def demote(self, client, region, pages):
        """Demote the present pages among `pages` (sorted). Clean read-only pages are
        only dropped: their entry is still in the pool. Dirty pages are copied out and
        compressed, unless the node is closed to new entries. A page's state is read
        when its batch starts, not before: a read-only page written while an earlier
        batch was in flight has had its entry reaped, and dropped as clean it would
        be lost."""
        def clean(p):
            return region.table.clean(p) & ~region.pinned[p]

        def dirty(p):
            return region.table.dirty(p) & ~region.pinned[p]

        done = sum(pinned.unless_locked(self, self.drop_clean, client, region, runs, clean)
                   for _, runs in batches(pages, DROP_BATCH, MAX_RUNS, clean))
        for chunk, runs in batches(pages, len(client.staging_pages), MAX_RUNS, dirty):
            if self.overflow.closed:   # also once a batch has filled the node
                left = pages[pages >= chunk[0]]
                region.counters["refused_closed"] += int(region.table.dirty(left).sum())
                break
            done += pinned.unless_locked(self, self.demote_dirty, client, region, runs,
                                          dirty)
        return done

    def spans(self, table, runs):
        return np.stack((table.base + runs[:, 0] * PAGE_SIZE, runs[:, 1] * PAGE_SIZE), 1)

    def command_agent(self, client, op, spans):
        """Send one batch to the agent and wait for its reply; its drops will raise
        REMOVE events for exactly these spans."""
        try:
            client.agent.send(op, spans)
        except OSError as e:   # as a refusal: the caller puts the batch's pages back
            return -(e.errno or errno.EPIPE), 0
        client.expected_removes = {a: a + n for a, n in spans.tolist()}
        try:
            return self.await_agent(client)
        finally:
            client.expected_removes = {}

    def settle_freed(self, region, pages):
        """Pages the application freed while in flight: zeros from now on. Returns the
        mask of them within pages."""
        freed = region.freed_in_flight[pages]
        if freed.any():
            region.counters["reaped"] += self.release(region.table, pages[freed])
            region.table.set(pages[freed], UNTOUCHED)
            region.freed_in_flight[pages] = False
        return freed

    def drop_clean(self, client, region, runs):
        """Drop clean read-only pages; the node keeps their entries. Each span is one
        madvise and one REMOVE event the agent waits on us to read, so spans reach
        across pages already demoted (absent: the drop costs them nothing) and take up
        to DROP_BRIDGE more clean pages with them. The pages crossed are in flight too,
        so a fault on one waits until the drop is done."""
        table = region.table
        first, end = int(runs[0, 0]), int(runs[-1, 0] + runs[-1, 1])
        if not region.pinned[first:end].any():   # a span over locked memory fails whole
            runs = bridged(runs, table.state, DEMOTED, table.clean, DROP_BRIDGE)
        pages = pages_of(runs)
        gap = table.state[pages] == DEMOTED
        table.set(pages, DEMOTING)
        status, _ = self.command_agent(client, lib.UFC_AGENT_DROP, self.spans(table, runs))
        self.settle_forks(client, region, pages, copied=None, absent=gap)
        freed = self.settle_freed(region, pages)
        table.set(pages[~freed & gap], DEMOTED)
        if status >= 0:
            table.set(pages[~freed & ~gap], DEMOTED)
        else:
            # The spans before the one that failed were dropped (a locked mapping stops
            # madvise there), the rest were not: map every page back from its entry
            # (those still there are skipped), for read-only must mean present, or a
            # promotion would only unprotect a missing page and it would read zeros.
            self.map_read_only(client, region, pages[~freed & ~gap])
        self.resolve_deferred()
        if status < 0:
            raise UffdError(-status, f"agent could not drop pages: {os.strerror(-status)}")
        dropped = int((~freed & ~gap).sum())
        region.counters["clean_redemotions"] += dropped
        return dropped

    def demote_dirty(self, client, region, runs):
        """Write-protect, copy out, drop (the agent); then store the copies. Pages the full
        pool refuses are stored over capacity and the node closes: nothing is ever lost."""
        table = region.table
        pages = pages_of(runs)
        before = table.state[pages].copy()
        spans = self.spans(table, runs)
        table.set(pages, DEMOTING)
        status, staged = self.command_agent(client, lib.UFC_AGENT_DEMOTE, spans)
        client.staging_used = True
        self.settle_forks(client, region, pages, copied=bool(staged))
        freed = self.settle_freed(region, pages)
        if status < 0:
            rows = np.flatnonzero(~freed) if staged else []
            self.put_back(client, table, pages, before, rows, keep=~freed)
            at = 0   # the spans where they are now (put_back read the events)
            for (addr, length), count in zip(self.spans(table, runs).tolist(),
                                             runs[:, 1].tolist()):
                try:
                    self.despite_events(client, client.uffd.writeprotect, addr, length,
                                        False)
                except UffdError as e:
                    if e.errno != errno.ENOENT or staged:
                        raise
                    self.forget(region, pages[at:at + count])
                at += count
            self.resolve_deferred()
            raise UffdError(-status, f"agent could not demote: {os.strerror(-status)}")
        staged = client.staging_pages[:len(pages)]
        handles = np.full(len(pages), -1, np.int64)
        handles[~freed] = self.pool.store_many(staged[~freed])
        refused = (handles < 0) & ~freed
        if refused.any():
            # The node is full: it closes, and overflow relief promotes pages over the
            # next loop turns. The refused copies exist nowhere else, so they are kept
            # over capacity rather than copied back now: that copy is an ioctl which
            # every unread event refuses (EAGAIN), and a busy application can keep one
            # unread for as long as we retry.
            try:
                handles[refused] = self.pool.store_many(staged[refused], over_capacity=True)
            except MemoryError:   # not even that: the copies go back, as a last resort
                log.warning("pool refused %d pages over capacity", int(refused.sum()))
            region.counters["refused_full"] += int(refused.sum())
        stored = handles >= 0
        back = np.flatnonzero(~stored & ~freed)
        if len(back):
            self.put_back(client, table, pages, before, back, keep=~stored & ~freed)
        table.entry[pages[stored]] = handles[stored]
        table.set(pages[stored], DEMOTED)
        self.overflow.update(self.pool.mem_used_total, self.pool.capacity, bool(refused.any()))
        demoted = int((stored & ~refused).sum())   # refused ones are on their way back
        region.counters["demotions"] += demoted
        self.resolve_deferred()
        return demoted

    def forget(self, region, pages):
        """Pages that are not registered with the client's uffd (the agent could not
        protect them: ENOENT): a mapping unmapped and mapped anew between the preload
        library's look and the handler's, or left by an event we never got. Not ours
        to demote; they leave the books as untouched, and the mapping now there is
        covered when the library registers it."""
        region.counters["reaped"] += self.release(region.table, pages)
        region.table.set(pages, UNTOUCHED)

    def settle_forks(self, client, region, pages, copied, absent=None):
        """Children forked while pages were in flight copied them as DEMOTING, a state
        only the end of this batch settles. A child's page is still mapped (forked
        before the drop) or missing: a clean page (copied None) keeps its shared entry,
        read-only, and one that was demoted before the batch (mask `absent`) stays
        demoted; a dirty one gets the staged copy if there is one (copied True;
        skipped where still mapped), as normal memory."""
        for child, mirror in self.forked_during(client, region, pages):
            in_flight = mirror.table.state[pages] == DEMOTING
            freed = np.zeros(len(pages), bool)
            freed[in_flight] = self.settle_freed(mirror, pages[in_flight])
            settle = in_flight & ~freed
            if copied is None:
                gap = np.zeros(len(pages), bool) if absent is None else absent
                self.map_read_only(child, mirror, pages[settle & ~gap])
                mirror.table.set(pages[settle & gap], DEMOTED)
                continue
            rows = np.flatnonzero(settle) if copied else []
            try:
                if len(rows):
                    self.despite_events(child, child.uffd.copy_many,
                                        mirror.table.base + pages[rows] * PAGE_SIZE,
                                        client.staging_addr + rows * PAGE_SIZE)
            except UffdError as e:
                # ENOENT/ESRCH: the child has unmapped the range or exited meanwhile.
                # Either way the parent's batch must still settle below.
                if e.errno not in (errno.ENOENT, errno.ESRCH):
                    log.error("forked child of pid %d: staged pages not copied: %s",
                              client.pid, e)
            mirror.table.set(pages[settle], NORMAL)

    def map_read_only(self, child, mirror, pages):
        """Clean pages of a drop, mapped read-only from their entries where they are
        missing (EEXIST where still there: skipped): a forked child's, which may have
        forked before the drop or after it, and the pages of a drop that failed midway.
        Read-only must mean present: promotion only unprotects a read-only page, and an
        absent one would then read as zeros."""
        table, n = mirror.table, len(self.bounce)
        # not the bounce buffer: faults served while retrying (despite_events) use it
        buf = np.empty((min(n, len(pages)), PAGE_SIZE), np.uint8)
        for at in range(0, len(pages), n):
            chunk = pages[at:at + n]
            self.pool.load_many(table.entry[chunk], buf[:len(chunk)])
            try:
                self.despite_events(child, child.uffd.copy_many,
                                    table.base + chunk * PAGE_SIZE,
                                    address_of(buf) + np.arange(len(chunk)) * PAGE_SIZE,
                                    True)
            except UffdError as e:
                # ENOENT/ESRCH: unmapped or exited meanwhile. Otherwise presence is
                # unknown: demoted is right either way (a fault restores from the entry)
                if e.errno not in (errno.ENOENT, errno.ESRCH):
                    log.error("client pid %d: clean pages not mapped read-only: %s",
                              child.pid, e)
                table.set(chunk, DEMOTED)
                continue
            table.set(chunk, READONLY)

    def forked_during(self, client, region, pages):
        """(descendant client, its copy of region) for each holding any of pages in flight."""
        for other in list(self.clients.values()):
            ancestor = other.parent
            while ancestor is not None and ancestor is not client:
                ancestor = ancestor.parent
            mirror = other.regions.get(region.id) if ancestor is client else None
            if mirror is not None and mirror.table.base == region.table.base and \
                    mirror.table.npages == region.table.npages and \
                    (mirror.table.state[pages] == DEMOTING).any():
                yield other, mirror

    def put_back(self, client, table, pages, before, rows, keep):
        """Reinstall staged copies (rows of the staging buffer) of pages; the pages of
        the batch selected by `keep` return to their state before the demotion."""
        rows = np.asarray(rows, np.int64)
        if len(rows):
            # where to, is read at each try: the events read between tries may include
            # the mremap that moved the region (glibc's realloc does) while it was in
            # flight, and the old address then is nothing's
            self.despite_events(client, lambda: client.uffd.copy_many(
                table.base + pages[rows] * PAGE_SIZE, client.staging_addr + rows * PAGE_SIZE))
        for state in np.unique(before[keep]).tolist():   # plain ints, as every caller's
            table.set(pages[keep & (before == state)], state)

    def despite_events(self, client, ioctl, *args):
        """An ioctl that must go through: the kernel answers EAGAIN while an event is
        unread, so read the client's events and try again. Pages staged for put-back
        exist nowhere else: giving up here would lose them."""
        for _ in range(1000):
            try:
                return ioctl(*args)
            except UffdRetry:
                self.serve_uffd(client)
        return ioctl(*args)

    def await_agent(self, client):
        """The agent's reply, serving every client's faults meanwhile: the agent itself
        may fault, its drop waits until we read the REMOVE event it causes, and the
        application's other threads must never wait on a demotion."""
        poller = select.poll()
        poller.register(client.agent.fileno(), POLLIN)
        for fd in self.clients:
            poller.register(fd, POLLIN)
        while True:
            events = poll_spinning(poller, self.spin, self.agent_timeout_ms)
            if not events:
                raise HandlerError(f"agent of pid {client.pid} did not answer in time")
            for fd, _ in events:
                if fd == client.agent.fileno():
                    return client.agent.recv()
                if fd in self.clients:
                    self.serve_uffd(self.clients[fd])

    # --- limits and overflow -------------------------------------------------------
    def enforce_limit(self, client, region):
        """Past the region's resident limit, demote its coldest pages."""
        excess = region.limit.excess(region.table.resident - region.table.tally[DEMOTING])
        if excess <= 0 or client.agent is None:
            return 0
        return self.demote(client, region, self.coldest(region, excess))

    def enforce_client_limit(self, client):
        """Past the resident limit of the client's group (a process tree, which `ufcram
        run` limits as a cgroup's memory.max does), demote the coldest pages of the
        group's largest regions first. A client without a group is one of its own. The
        regions of a client without an agent (a forked child's inherited memory) count,
        but only the others can be demoted."""
        self.enforcing.add(client.group_key)
        try:
            self.demote_group_excess(client)
        finally:
            self.enforcing.discard(client.group_key)
            pending, self.throttled = self.throttled, []
            for fault in pending:
                if fault[0].ready:
                    self.fault(*fault)

    def group_others_resident(self, client):
        """Pages resident in the other clients of client's group: what the fast path
        leaves out of the group's limit. Summed at most every OTHERS_TTL seconds: it is
        asked on every drain, and a process tree's regions are many."""
        if client.group is None:
            return 0
        now = time.monotonic()
        cached = self.others.get(client)
        if cached is None or now - cached[0] > OTHERS_TTL:
            total = sum(int(r.table.resident) for c in self.clients.values()
                        if c.group == client.group and c is not client
                        for r in c.regions.values())
            cached = self.others[client] = (now, total)
        return cached[1]

    def demote_group_excess(self, client):
        members = [client] if client.group is None else [
            c for c in self.clients.values() if c.group == client.group and c.ready]
        held = sorted(((c, r) for c in members for r in c.regions.values()),
                      key=lambda held: -held[1].table.resident)
        excess = client.limit.excess(sum(
            int(r.table.resident - r.table.tally[DEMOTING]) for _, r in held))
        for owner, region in held:
            if excess <= 0:
                break
            if owner.agent is None or not owner.ready or region.id not in owner.regions:
                continue   # (a demotion before this one may have dropped or cut it)
            chosen = self.coldest(region, excess)
            excess -= len(chosen)
            self.demote(owner, region, chosen)

    @staticmethod
    def coldest(region, n):
        """Up to n of region's resident pages, not in flight nor pinned, coldest by its
        CLOCK; sorted."""
        candidates = region.table.present() & (region.table.state != DEMOTING) & \
            ~region.pinned
        return np.sort(region.clock.coldest(candidates, n))

    def relieve_overflow(self):
        """While the node is closed: promote pages back to normal memory until the pool
        is under its low watermark. Read-only pages first (their copy is already mapped:
        freeing the entry is enough), then demoted ones (restored)."""
        for state in (READONLY, DEMOTED):
            for client in list(self.clients.values()):
                for region in client.regions.values():
                    if not self.overflow.closed:
                        return
                    self.promote_all(client, region, state)
                    self.pool.compact()
                    self.overflow.update(self.pool.mem_used_total, self.pool.capacity)
        self.demote_excess_writable()

    def promote_region(self, client, region):
        """Every page the node holds for region back to normal memory; returns how many."""
        count = 0
        for state in (READONLY, DEMOTED):
            count += self.promote_all(client, region, state)
        return count

    def promote_all(self, client, region, state):
        """Pages of region in state (READONLY or DEMOTED) become normal memory. Each
        page's state changes as soon as its own ioctl succeeds: a read-only page left
        unprotected but still READONLY could be written and then dropped as clean, and a
        DEMOTED page already installed could be skipped by a neighbour's restore, which
        would then mark it read-only over its newer bytes."""
        table = region.table
        pages = table.pages_in_state(state)
        for chunk, runs in batches(pages, len(self.bounce), MAX_RUNS):
            if state == DEMOTED:
                self.pool.load_many(table.entry[chunk], self.bounce[:len(chunk)])
                for row, page in enumerate(chunk.tolist()):
                    client.uffd.copy(table.address_of(page),
                                     self.bounce_addr + row * PAGE_SIZE, PAGE_SIZE)
                    self.promoted(region, np.array([page]))
            else:
                for first, count in runs.tolist():
                    client.uffd.writeprotect(table.address_of(first), count * PAGE_SIZE,
                                             protect=False)
                    self.promoted(region, np.arange(first, first + count))
        return len(pages)

    def promoted(self, region, pages):
        self.release(region.table, pages)
        region.table.set(pages, NORMAL)
        region.counters["promotions"] += len(pages)

    def demote_excess_writable(self):
        """When a budget shrinks (capacity or ratios changed), pages writable on the node
        beyond it become normal memory: a promotion in place, nothing moves."""
        for client in self.clients.values():
            for region in client.regions.values():
                in_use, allowed = self.budget_use(region)
                excess = min(in_use - allowed, int(region.table.tally[WRITABLE]))
                if excess > 0:
                    region.table.set(region.table.pages_in_state(WRITABLE)[:excess], NORMAL)
                    region.counters["promotions"] += excess
