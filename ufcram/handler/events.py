"""Non-fault uffd events: the application freed (REMOVE, UNMAP), moved (REMAP) or forked
(FORK) managed memory. Entries of freed pages are reaped at once; moved pages keep
their entries at the new address; a forked child becomes a client of its own.
"""
import logging

import numpy as np

from . import proc
from ufcram.store.pagetable import DEMOTING, NO_ENTRY, PAGE_SIZE, PageTable, UNTOUCHED, runs_of
from ufcram.app.uffd import EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP

log = logging.getLogger("ufcram.handler")


def pages_within(table, start, end):
    first = max(0, (start - table.base) // PAGE_SIZE)
    last = min(table.npages, -(-(end - table.base) // PAGE_SIZE))
    return np.arange(first, last)


def on_free(pager, client, start, end, event):
    """MADV_DONTNEED / munmap: the pages read as zeros from now on; reap their entries.
    The agent's own drops are expected range by range; any other free of a page in
    flight is remembered, so the demotion discards that page's copy."""
    if event == EVENT_REMOVE and client.agent_drops is not None and \
            client.agent_drops.take(client.pid, start, end):
        return
    for region in client.overlapping(start, end):
        table = region.table
        pages = pages_within(table, start, end)
        in_flight = table.state[pages] == DEMOTING
        region.freed_in_flight[pages[in_flight]] = True
        pages = pages[~in_flight]
        region.counters["reaped"] += pager.release(table, pages)
        table.set(pages, UNTOUCHED)
        if client.covers_mappings and event == EVENT_UNMAP and \
                len(pages) == table.npages and not in_flight.any():
            # gone whole: the preload library registers every mapping, so programs that
            # map and unmap (allocators do) would pile up dead regions. (A Region is
            # unmapped first and unregistered after, by its id.)
            client.remove_region(region.id)


def on_remap(client, old, new, length):
    """mremap moved [old, old + length) to new: the page table follows the pages, and
    so does the agent's record of the pages it dropped (for after a handler death)."""
    if client.agent is not None:
        try:
            client.agent.moved(old, new, length)
        except OSError as e:
            log.warning("client pid %d: agent not told of an mremap (%s): should the "
                        "handler die, pages moved there read as zeros", client.pid, e)
    for region in client.overlapping(old, old + length):
        table = region.table
        pages = pages_within(table, old, old + length)
        to = new + table.address_of(pages[0]) - old
        landing = [r for r in client.overlapping(to, to + len(pages) * PAGE_SIZE)
                   if r is not region]
        if len(pages) == table.npages and not landing:
            # the same table, rebased: a demotion of it in flight (waiting on the agent
            # while we read this event) settles its pages at their new address
            table.base = to
            client.relocate(region.id, table)
            continue
        states, entries = table.state[pages].copy(), table.entry[pages].copy()
        # pages in flight: the batch drops them here as freed, and settles them where
        # they went (Demotion.settle_moved); until then they wait there as in flight
        for page in pages[states == DEMOTING].tolist():
            region.moved_in_flight[page] = to + (page - int(pages[0])) * PAGE_SIZE
        region.freed_in_flight[pages[states == DEMOTING]] = True
        table.entry[pages] = NO_ENTRY          # the entries now belong to where they went
        table.set(pages, UNTOUCHED)
        land(client, region, to, states, entries, landing)


def land(client, source, to, states, entries, landing):
    """Moved pages arrive at `to`: into the regions already there (a part moved away
    and now back leaves its region untouched pages there, which take it), and as a
    region of its own, under source's policies, where none is."""
    uncovered = np.ones(len(states), bool)
    for region in landing:
        table = region.table
        pages = pages_within(table, to, to + len(states) * PAGE_SIZE)
        at = (table.base - to) // PAGE_SIZE + pages
        table.take(pages, states[at], entries[at])
        # in flight and back where it was: the batch settles it here after all
        region.freed_in_flight[pages[states[at] == DEMOTING]] = False
        uncovered[at] = False
    for first, count in runs_of(np.flatnonzero(uncovered)).tolist():
        moved = PageTable(to + first * PAGE_SIZE, count)
        moved.take(np.arange(count), states[first:first + count],
                   entries[first:first + count])
        client.adopt(moved, source)


def on_fork(pager, client, uffd_fd):
    """The child's memory is a copy of the parent's: it shares the parent's entries,
    except where the parent said a fork must not copy (its pages there are not the
    child's: it must never be served them)."""
    child = client.fork(uffd_fd)
    not_copied(client, child)
    for region in child.regions.values():
        held = region.table.entry[region.table.entry != NO_ENTRY]
        pager.pool.share(held)
    hand_over(client, uffd_fd)
    return child


def not_copied(parent, child):
    """Pages of the child in mappings the fork did not copy are untouched in its books."""
    if parent.pid <= 0:   # a forked child's own fork: its pid is not known here
        return
    try:
        spans = proc.flagged_mappings(parent.pid, "dc", "wf")
    except OSError as e:
        log.warning("pid %d forked, and its mappings could not be read (%s): the child "
                    "may be served the parent's pages where it should read zeros",
                    parent.pid, e)
        return
    for start, end in spans:
        for region in child.overlapping(start, end):
            pages = pages_within(region.table, start, end)
            region.table.entry[pages] = NO_ENTRY
            region.table.set(pages, UNTOUCHED)


def hand_over(parent, uffd_fd):
    """Our descriptor is the child's only one: if we died, its memory would be
    unregistered and the pages we hold for it would read as zeros. The agent of the
    nearest ancestor that has one (a forked child has none) keeps a copy, and serves
    it once we have exited."""
    keeper = parent
    while keeper.agent is None and keeper.parent is not None:
        keeper = keeper.parent
    try:
        if keeper.agent is None:
            raise OSError("no ancestor has an agent")
        keeper.agent.adopt(uffd_fd)
    except OSError as e:
        log.warning("a child forked in the line of pid %d has its uffd only here (%s): "
                    "should the handler die, the pages it holds for it read as zeros",
                    keeper.pid, e)


def dispatch(pager, client, event, arg0, arg1, arg2):
    """Handle one event message; returns a new client for a fork, else None."""
    if event in (EVENT_REMOVE, EVENT_UNMAP):
        on_free(pager, client, arg0, arg1, event)
    elif event == EVENT_REMAP:
        on_remap(client, arg0, arg1, arg2)
    elif event == EVENT_FORK:
        return on_fork(pager, client, arg0 & 0xFFFFFFFF)
    return None
