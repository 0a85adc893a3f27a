"""How a demotion's batch settles after the agent's reply: pages the application freed
or moved (mremap) while in flight, the copies of children forked meanwhile, and pages put
back; a part of the Pager class (pager.py), in the steps of a job (jobs.py).
"""
import errno
import logging

import numpy as np

from . import proc
from ufcram.errors import UffdError, UffdRetry
from ufcram.store.pagetable import DEMOTED, DEMOTING, NO_ENTRY, NORMAL, PAGE_SIZE, READONLY, UNTOUCHED
from ufcram.app.uffd import address_of
from .jobs import EventsRead

log = logging.getLogger("ufcram.handler")


class Settle:
    """The part of the Pager (pager.py) that settles a demotion's batch."""

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
        entry kept (clean), or dropped after their copy was staged (mask `staged`: copied
        back now)."""
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
                if staged[row]:
                    yield from self.copy_back(client, target, at,
                                              np.array([client.staging_addr + row * PAGE_SIZE]))
                else:
                    log.error("client pid %d: a page moved by mremap while in flight at "
                              "%#x has no copy left", client.pid, addr)
                state = NORMAL
            target.table.set(at, state)

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
        demoted; a dirty one gets its staged copy if it has one (mask `copied`; skipped
        where still mapped), as normal memory. (A page that moved out was the parent's
        alone: a child has it missing only if it forked after the move.)"""
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
            rows = np.flatnonzero(settle & copied)
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
