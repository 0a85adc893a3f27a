"""Demotion: the pager's batches through a client's agent (clean pages dropped, dirty
ones moved out or copied out) and their storing in the pool; how a batch settles is
settle.py's. A demotion is a job (jobs.py): it yields where it waits on the agent.
"""
import errno
import logging
import os

import numpy as np

from . import pinned
from ufcram import config
from ufcram._shim import lib
from .agent import MAX_RUNS, MOVE_MAX_PAGES, AgentDrops
from ufcram.errors import UffdError
from ufcram.store.pagetable import (DEMOTED, DEMOTING, PAGE_SIZE, READONLY, bridged, pages_of,
                                   runs_of)
from .jobs import AgentReply

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
        only dropped: their entry is still in the pool. Dirty pages are moved or copied
        out and compressed, unless the node is closed to new entries (or the client is a forked
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
        size = min(len(client.staging_pages), MOVE_MAX_PAGES)
        for chunk, runs in batches(pages, size, MAX_RUNS, dirty):
            if self.overflow.closed:   # also once a batch has filled the node
                left = pages[pages >= chunk[0]]
                region.counters["refused_closed"] += int(region.table.dirty(left).sum())
                break
            done += yield from pinned.unless_locked(self, self.demote_dirty, client, region,
                                                    runs, dirty)
        return done

    def spans(self, table, runs):
        return np.stack((table.base + runs[:, 0] * PAGE_SIZE, runs[:, 1] * PAGE_SIZE), 1)

    def command_agent(self, client, op, spans, drops=True):
        """Send one batch to the agent (of agent_client: a forked child's own process's)
        and wait for its reply, (status, bytes, stayed: agent.AgentLink.recv); with
        drops, they will raise REMOVE events for exactly these spans, on client's uffd,
        the one their mappings are registered with (a move raises none)."""
        keeper = self.agent_client(client)
        try:
            if keeper is None:
                raise OSError(errno.EPIPE, "no agent")
            keeper.agent.send(op, spans)
        except OSError as e:   # as a refusal: the caller puts the batch's pages back
            return -(e.errno or errno.EPIPE), 0, None
        client.agent_drops = AgentDrops(spans) if drops else None
        try:
            return (yield AgentReply(keeper))
        finally:
            client.agent_drops = None

    def moves(self, client):
        """Whether client's own agent moves its pages out (UFFDIO_MOVE). Not for a
        forked child's inherited memory: it is registered on a uffd of its own, not on
        the one of the agent that demotes it."""
        return client.moves and client.agent is not None and config.get("UFCRAM_MOVE")

    def drop_clean(self, client, region, runs, move=True):
        """Drop clean read-only pages; the node keeps their entries. The agent moves
        them out and throws them away (DISCARD), or drops them (DROP): each span is one
        madvise and one REMOVE event the agent waits on us to read. So spans reach
        across pages already demoted (absent: the drop costs them nothing) and take up
        to DROP_BRIDGE more clean pages with them. The pages crossed are in flight too,
        so a fault on one waits until the drop is done. Pages that cannot move (shared
        with a forked child, locked) are dropped after."""
        table = region.table
        first, end = int(runs[0, 0]), int(runs[-1, 0] + runs[-1, 1])
        if not region.pinned[first:end].any():   # a span over locked memory fails whole
            runs = bridged(runs, table.state, DEMOTED, table.clean, DROP_BRIDGE)
        pages = pages_of(runs)
        gap = table.state[pages] == DEMOTED
        table.set(pages, DEMOTING)
        move = move and self.moves(client)
        status, _, stayed = yield from self.command_agent(
            client, lib.UFC_AGENT_DISCARD if move else lib.UFC_AGENT_DROP,
            self.spans(table, runs), drops=not move)
        if move and status >= 0 and stayed is None:   # no bitmap: nothing is known gone
            status = -errno.EBADMSG
        left = stayed[:len(pages)] if move and status >= 0 else np.zeros(len(pages), bool)
        yield from self.settle_forks(client, region, pages, copied=None, absent=gap)
        freed = self.settle_freed(region, pages)
        yield from self.settle_moved(client, region, pages, staged=np.zeros(len(pages), bool))
        table.set(pages[~freed & gap], DEMOTED)
        if status >= 0:
            table.set(pages[~freed & ~gap & ~left], DEMOTED)
            table.set(pages[~freed & ~gap & left], READONLY)   # never taken
        else:
            # The spans before the one that failed were dropped (a locked mapping stops
            # madvise there), the rest were not: map every page back from its entry
            # (those still there are skipped), for read-only must mean present, or a
            # promotion would only unprotect a missing page and it would read zeros.
            yield from self.map_read_only(client, region, pages[~freed & ~gap])
        if move and status == -errno.EOPNOTSUPP:   # this kernel cannot move pages
            client.moves = False
            return (yield from self.drop_clean(client, region, runs))
        if status < 0:
            raise UffdError(-status, f"agent could not drop pages: {os.strerror(-status)}")
        dropped = int((~freed & ~gap & ~left).sum())
        region.counters["clean_redemotions"] += dropped
        rest = pages[~freed & ~gap & left]
        rest = rest[table.clean(rest) & ~region.pinned[rest]]   # as they are now
        if len(rest):
            dropped += yield from self.drop_clean(client, region, runs_of(rest), move=False)
        return dropped

    def demote_dirty(self, client, region, runs):
        if self.moves(client):
            return (yield from self.demote_moved(client, region, runs))
        return (yield from self.demote_copied(client, region, runs))

    def demote_moved(self, client, region, runs):
        """Move out (the agent, with UFFDIO_MOVE: nothing is protected, no REMOVE event
        comes), then store the copies. Pages that did not move (shared with a forked
        child, merged, locked) are as they were: back to their state, then by copy."""
        table = region.table
        pages = pages_of(runs)
        before = table.state[pages].copy()
        table.set(pages, DEMOTING)
        status, _, stayed = yield from self.command_agent(
            client, lib.UFC_AGENT_MOVE, self.spans(table, runs), drops=False)
        client.staging_used = True
        if status >= 0 and stayed is None:   # no bitmap: nothing is known to have moved
            status = -errno.EBADMSG
        moved = np.zeros(len(pages), bool) if status < 0 else ~stayed[:len(pages)]
        yield from self.settle_forks(client, region, pages, copied=moved)
        freed = self.settle_freed(region, pages)
        yield from self.settle_moved(client, region, pages, staged=moved)
        # not moved: never protected nor dropped, so their state is all there is to undo
        yield from self.put_back(client, region, pages, before, [], keep=~moved & ~freed)
        if status == -errno.EOPNOTSUPP:   # this kernel cannot move pages: by copy
            client.moves = False
        elif status < 0:
            raise UffdError(-status, f"agent could not move pages: {os.strerror(-status)}")
        demoted, refused = self.store_staged(client, region, pages, moved & ~freed)
        yield from self.put_back_refused(client, region, pages, before, refused)
        region.counters["moved"] += demoted
        rest = pages[~moved & ~freed]
        rest = rest[table.dirty(rest) & ~region.pinned[rest]]   # as they are now
        if len(rest):
            demoted += yield from self.demote_copied(client, region, runs_of(rest))
        return demoted

    def demote_copied(self, client, region, runs):
        """Write-protect, copy out, drop (the agent); then store the copies."""
        table = region.table
        pages = pages_of(runs)
        before = table.state[pages].copy()
        spans = self.spans(table, runs)
        table.set(pages, DEMOTING)
        status, staged, _ = yield from self.command_agent(client, lib.UFC_AGENT_DEMOTE, spans)
        client.staging_used = True
        copied = np.full(len(pages), bool(staged))
        yield from self.settle_forks(client, region, pages, copied=copied)
        freed = self.settle_freed(region, pages)
        yield from self.settle_moved(client, region, pages, staged=copied)
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
        demoted, refused = self.store_staged(client, region, pages, ~freed)
        yield from self.put_back_refused(client, region, pages, before, refused)
        return demoted

    def store_staged(self, client, region, pages, keep):
        """Store the staged copies of pages[keep]; they become DEMOTED. Pages the full
        pool refuses are stored over capacity and the node closes: nothing is ever lost.
        Returns the pages demoted and the mask of those the pool took not even so."""
        table = region.table
        staged = client.staging_pages[:len(pages)]
        handles = np.full(len(pages), -1, np.int64)
        handles[keep] = self.pool.store_many(staged[keep])
        refused = (handles < 0) & keep
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
        self.overflow.update(self.pool.mem_used_total, self.pool.capacity, bool(refused.any()))
        demoted = int((stored & ~refused).sum())   # refused ones are on their way back
        region.counters["demotions"] += demoted
        return demoted, ~stored & keep

    def put_back_refused(self, client, region, pages, before, refused):
        """The copies the pool took not even over capacity go back, as a last resort."""
        if refused.any():
            yield from self.put_back(client, region, pages, before, np.flatnonzero(refused),
                                     keep=refused)
            self.settle_freed(region, pages[refused])
