"""Demotion: the pager's batches through a client's agent (write-protect, copy out, drop)
and how each settles, for the client and for the children it forked while it was in flight.
A demotion is a job (jobs.py): it yields where it waits on the agent or on events.
"""
import errno
import logging
import os

import numpy as np

from . import pinned, proc
from ufcram._shim import lib
from .agent import MAX_RUNS, AgentDrops
from ufcram.errors import UffdError, UffdRetry
from ufcram.store.pagetable import (DEMOTED, DEMOTING, NO_ENTRY, NORMAL, PAGE_SIZE, READONLY, UNTOUCHED,
                        bridged, pages_of, runs_of)
from ufcram.app.uffd import address_of
from .jobs import AgentReply, EventsRead

log = logging.getLogger("ufcram.handler")
DROP_BATCH = 4096   # pages per clean re-demotion command (no staging needed)
# Read-only pages a drop span may take with it between two chosen runs. A span costs a
# madvise, its TLB shootdown and a REMOVE round trip (~30 µs); a clean page dropped
# early costs a read fault only if it is used before its turn would have come.
DROP_BRIDGE = 2


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


class Demotion:
    """The part of the Pager (pager.py) that demotes."""

    def demote(self, client, region, pages):
        """Demote the present pages among `pages` (sorted). Clean read-only pages are
        only dropped: their entry is still in the pool. Dirty pages are copied out and
        compressed, unless the node is closed to new entries (or the client is a forked
        child's inherited memory: its process's agent has no staging buffer to copy it
        into through the child's uffd, so only clean pages go). A page's state is read
        when its batch starts, not before: a read-only page written while an earlier
        batch was in flight has had its entry reaped, and dropped as clean it would
        be lost."""
        def clean(p):
            return region.table.clean(p) & ~region.pinned[p]

        def dirty(p):
            return region.table.dirty(p) & ~region.pinned[p]

        done = 0
        for _, runs in batches(pages, DROP_BATCH, MAX_RUNS, clean):
            done += yield from pinned.unless_locked(self, self.drop_clean, client, region,
                                                    runs, clean)
        if client.agent is None:
            return done
        for chunk, runs in batches(pages, len(client.staging_pages), MAX_RUNS, dirty):
            if self.overflow.closed:   # also once a batch has filled the node
                left = pages[pages >= chunk[0]]
                region.counters["refused_closed"] += int(region.table.dirty(left).sum())
                break
            done += yield from pinned.unless_locked(self, self.demote_dirty, client, region,
                                                    runs, dirty)
        return done

    def spans(self, table, runs):
        return np.stack((table.base + runs[:, 0] * PAGE_SIZE, runs[:, 1] * PAGE_SIZE), 1)

    def command_agent(self, client, op, spans):
        """Send one batch to the agent (of agent_client: a forked child's own process's)
        and wait for its reply, (status, bytes); its drops will raise REMOVE events for
        exactly these spans, on client's uffd, the one their mappings are registered with."""
        keeper = self.agent_client(client)
        try:
            if keeper is None:
                raise OSError(errno.EPIPE, "no agent")
            keeper.agent.send(op, spans)
        except OSError as e:   # as a refusal: the caller puts the batch's pages back
            return -(e.errno or errno.EPIPE), 0
        client.agent_drops = AgentDrops(spans)
        try:
            return (yield AgentReply(keeper))
        finally:
            client.agent_drops = None

    def settle_freed(self, region, pages):
        """Pages the application freed while in flight: zeros from now on. Returns the
        mask of them within pages."""
        freed = region.freed_in_flight[pages]
        if freed.any():
            region.counters["reaped"] += self.release(region.table, pages[freed])
            region.table.set(pages[freed], UNTOUCHED)
            region.freed_in_flight[pages] = False
        return freed

    def settle_moved(self, client, region, pages, staged):
        """Pages of the batch that an mremap moved elsewhere while in flight, settled
        where they went: still there (the drop had not reached them), dropped with their
        entry kept (clean), or dropped after their copy was staged (copied back now)."""
        if not region.moved_in_flight:
            return
        for row, page in enumerate(pages.tolist()):
            addr = region.moved_in_flight.pop(page, None)
            target = None if addr is None else client.locate(addr)
            if target is None:
                continue   # unmapped since: nothing to settle
            at = np.array([target.table.page_of(addr)])
            if target.table.state[at[0]] != DEMOTING or self.settle_freed(target, at)[0]:
                continue
            entry = target.table.entry[at[0]]
            present = proc.mapped_pages(client.pid, addr, 1)[0]
            if present:
                state = READONLY if entry != NO_ENTRY else NORMAL
            elif entry != NO_ENTRY:
                state = DEMOTED
            else:
                if staged:
                    yield from self.copy_back(client, target, at,
                                              np.array([client.staging_addr + row * PAGE_SIZE]))
                else:
                    log.error("client pid %d: a page moved by mremap while in flight at "
                              "%#x has no copy left", client.pid, addr)
                state = NORMAL
            target.table.set(at, state)

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
        status, _ = yield from self.command_agent(client, lib.UFC_AGENT_DROP,
                                                  self.spans(table, runs))
        yield from self.settle_forks(client, region, pages, copied=None, absent=gap)
        freed = self.settle_freed(region, pages)
        yield from self.settle_moved(client, region, pages, staged=False)
        table.set(pages[~freed & gap], DEMOTED)
        if status >= 0:
            table.set(pages[~freed & ~gap], DEMOTED)
        else:
            # The spans before the one that failed were dropped (a locked mapping stops
            # madvise there), the rest were not: map every page back from its entry
            # (those still there are skipped), for read-only must mean present, or a
            # promotion would only unprotect a missing page and it would read zeros.
            yield from self.map_read_only(client, region, pages[~freed & ~gap])
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
        status, staged = yield from self.command_agent(client, lib.UFC_AGENT_DEMOTE, spans)
        client.staging_used = True
        yield from self.settle_forks(client, region, pages, copied=bool(staged))
        freed = self.settle_freed(region, pages)
        yield from self.settle_moved(client, region, pages, staged=bool(staged))
        if status < 0:
            rows = np.flatnonzero(~freed) if staged else []
            yield from self.put_back(client, region, pages, before, rows, keep=~freed)
            self.settle_freed(region, pages)
            at = 0   # the spans where they are now (put_back read the events)
            for (addr, length), count in zip(self.spans(table, runs).tolist(),
                                             runs[:, 1].tolist()):
                try:
                    yield from self.despite_events(client, client.uffd.writeprotect, addr,
                                                   length, False)
                except UffdError as e:
                    if e.errno != errno.ENOENT or staged:
                        raise
                    self.forget(region, pages[at:at + count])
                at += count
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
        # settled before any put-back reads events: a stored page freed then is reaped
        # there and then, not flagged in flight after its batch has settled
        table.entry[pages[stored]] = handles[stored]
        table.set(pages[stored], DEMOTED)
        back = np.flatnonzero(~stored & ~freed)
        if len(back):
            yield from self.put_back(client, region, pages, before, back,
                                     keep=~stored & ~freed)
            self.settle_freed(region, pages[~stored])
        self.overflow.update(self.pool.mem_used_total, self.pool.capacity, bool(refused.any()))
        demoted = int((stored & ~refused).sum())   # refused ones are on their way back
        region.counters["demotions"] += demoted
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
                mirror.table.set(pages[settle & gap], DEMOTED)   # first, as in put_back
                yield from self.map_read_only(child, mirror, pages[settle & ~gap])
                continue
            rows = np.flatnonzero(settle) if copied else np.empty(0, np.int64)
            try:
                yield from self.copy_back(child, mirror, pages[rows],
                                          client.staging_addr + rows * PAGE_SIZE)
            except UffdError as e:
                # ENOENT/ESRCH: the child has unmapped the range or exited meanwhile.
                # Either way the parent's batch must still settle below.
                if e.errno not in (errno.ENOENT, errno.ESRCH):
                    log.error("forked child of pid %d: staged pages not copied: %s",
                              client.pid, e)
            mirror.table.set(pages[settle & ~mirror.freed_in_flight[pages]], NORMAL)
            self.settle_freed(mirror, pages[settle])

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
                yield from self.copy_back(child, mirror, chunk, address_of(buf) +
                                          np.arange(len(chunk)) * PAGE_SIZE, wp=True)
                state = READONLY
            except UffdError as e:
                # ENOENT/ESRCH: unmapped or exited meanwhile. Otherwise presence is
                # unknown: demoted is right either way (a fault restores from the entry)
                if e.errno not in (errno.ENOENT, errno.ESRCH):
                    log.error("client pid %d: clean pages not mapped read-only: %s",
                              child.pid, e)
                state = DEMOTED
            table.set(chunk[~mirror.freed_in_flight[chunk]], state)
        self.settle_freed(mirror, pages)   # those freed meanwhile: zeros

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

    def put_back(self, client, region, pages, before, rows, keep):
        """Reinstall staged copies (rows of the staging buffer) of pages; the pages of
        the batch selected by `keep` return to their state before the demotion. Those
        the application frees meanwhile stay in flight, for settle_freed."""
        table, rows = region.table, np.asarray(rows, np.int64)
        yield from self.copy_back(client, region, pages[rows],
                                  client.staging_addr + rows * PAGE_SIZE)
        keep = keep & ~region.freed_in_flight[pages]
        for state in np.unique(before[keep]).tolist():   # plain ints, as every caller's
            table.set(pages[keep & (before == state)], state)

    def copy_back(self, client, region, pages, sources, wp=False):
        """Install region's pages from sources (an address each) through client's uffd,
        despite events. Where to is read at each try: the events read between tries may
        move the region (glibc's realloc uses mremap) or free some of its pages (munmap,
        sbrk), and a freed page's address may already hold a new mapping, which must
        never get these bytes (those pages stay in flight, for settle_freed)."""
        def copy():
            live = ~region.freed_in_flight[pages]
            client.uffd.copy_many(region.table.base + pages[live] * PAGE_SIZE,
                                  sources[live], wp)
        if len(pages):
            yield from self.despite_events(client, copy)

    def despite_events(self, client, ioctl, *args):
        """An ioctl that must go through: the kernel answers EAGAIN while an event is
        unread, so have the client's events read (by the loop) and try again. Pages
        staged for put-back exist nowhere else: giving up here would lose them."""
        for _ in range(1000):
            try:
                return ioctl(*args)
            except UffdRetry:
                yield EventsRead(client)
        return ioctl(*args)
