"""Locked memory in a client's regions (mlock, mlockall): the kernel never drops it
(MADV_DONTNEED there fails with EINVAL), so its pages are pinned: promoted, left resident
and never chosen for demotion again (Pager.coldest, Pager.demote).

Pages are pinned when the agent's drop fails with EINVAL, and looked at again on the
periodic scan while any page of the client is pinned: pinned holds exactly while the
memory is locked, and what munlock releases can be demoted again.
"""
import errno
import logging

import numpy as np

from . import proc
from ufcram.errors import UffdError
from ufcram.store.pagetable import NORMAL, PAGE_SIZE, READONLY, WRITABLE, pages_of, runs_of

log = logging.getLogger("ufcram.handler")


def unless_locked(pager, demotion, client, region, runs, keep):
    """One batch of a demotion. The kernel refuses to drop locked memory (EINVAL): if
    the application has locked pages of its regions since (mlock, mlockall), the batch
    has been put back whole and those pages are pinned now; the batch goes once more
    without them (keep: the mask of pages still to demote), and later batches leave
    them out. Other failures are the caller's. (A step of a demotion's job.)"""
    try:
        return (yield from demotion(client, region, runs))
    except UffdError as e:
        if e.errno != errno.EINVAL:
            raise
        refusal = e
    if not (yield from pin_locked(pager, client)):
        raise refusal
    pages = pages_of(runs)
    runs = runs_of(pages[keep(pages)])
    return (yield from demotion(client, region, runs)) if len(runs) else 0


def pin_locked(pager, client):
    """Pin the pages of client's regions that are locked now, and only those; returns
    how many were not pinned before (0 too if the process has gone). A job's step: a
    promotion may wait for events to be read."""
    if client.pid <= 0:   # a forked child: it has no agent, nothing of it is demoted
        return 0
    try:
        spans = proc.flagged_mappings(client.pid, "lo")
    except OSError:
        return 0
    newly = 0
    for region in client.regions.values():
        table = region.table
        locked = np.zeros(table.npages, bool)
        for start, end in spans:
            first = max(0, (start - table.base) // PAGE_SIZE)
            last = min(table.npages, (end - table.base) // PAGE_SIZE)
            locked[first:max(first, last)] = True
        newly += int(np.count_nonzero(locked & ~region.pinned))
        region.pinned[:] = locked
        yield from promote_pinned(pager, client, region)
    if newly:
        log.debug("client pid %d: %d pages locked (mlock): pinned", client.pid, newly)
    return newly


def promote_pinned(pager, client, region):
    """Pinned pages the node still has a hand in become normal memory: a writable one
    only changes its count (it would hold the write budget for nothing); a read-only
    one loses its protection and its entry. Demoted ones (locked but not brought in,
    MLOCK_ONFAULT) come back on their fault and are promoted on the next scan."""
    table = region.table
    writable = np.flatnonzero(region.pinned & (table.state == WRITABLE))
    table.set(writable, NORMAL)
    region.counters["promotions"] += len(writable)
    readonly = np.flatnonzero(region.pinned & (table.state == READONLY))
    for first, count in runs_of(readonly).tolist():
        yield from pager.despite_events(client, client.uffd.writeprotect,
                                        table.address_of(first), count * PAGE_SIZE, False)
        pager.promoted(region, np.arange(first, first + count))
