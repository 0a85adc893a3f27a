"""Limits and overflow: the pager's passes that demote down to a region's, a client's or a
process tree's resident limit (jobs, as demotions are), and that promote pages back while
the node is full.
"""
import time

import numpy as np

from .agent import MAX_RUNS
from .demotion import batches
from ufcram.store.pagetable import DEMOTED, DEMOTING, NORMAL, PAGE_SIZE, READONLY, WRITABLE

OTHERS_TTL = 0.002   # seconds a sum of a group's other clients' resident pages is kept


class Limits:
    """The part of the Pager (pager.py) that holds limits."""

    def enforce_limit(self, client, region):
        """Past the region's resident limit, demote its coldest pages."""
        excess = region.limit.excess(region.table.resident - region.table.tally[DEMOTING])
        if excess <= 0 or client.agent is None:
            return 0
        return (yield from self.demote(client, region, self.coldest(region, excess)))

    def enforce_client_limit(self, client):
        """Past the resident limit of the client's group (a process tree, which `ufcram
        run` limits as a cgroup's memory.max does), demote the coldest pages of the
        group's largest regions first. A client without a group is one of its own. The
        regions of a client without an agent (a forked child's inherited memory) count,
        and are dropped where clean, by the agent of the client its process joined with."""
        key = client.group_key   # the same key at the end: client may leave meanwhile
        self.enforcing.add(key)
        try:
            yield from self.demote_group_excess(client)
        finally:
            # the first touches it held back (UFC_LEFT_WAIT) go on at the job's next wait
            # or end (jobs.py)
            self.enforcing.discard(key)

    def group_others_resident(self, client):
        """Pages resident in the other clients of client's group: what the fault engine
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
            if self.agent_client(owner) is None or not owner.ready or \
                    region.id not in owner.regions:
                continue   # (a demotion before this one may have dropped or cut it)
            chosen = self.coldest(region, excess, clean_only=owner.agent is None)
            excess -= len(chosen)
            yield from self.demote(owner, region, chosen)

    def agent_client(self, client):
        """The client whose agent demotes client's memory: its own, or for a forked
        child's inherited memory (whose client has none) the client the same process
        joined with, found once the child's pid is known (handler.read_faults)."""
        if client.agent is not None:
            return client
        if client.pid < 0:
            return None
        joined = client.joined
        if joined is None or self.clients.get(joined.uffd.fd) is not joined:   # it left
            client.joined = next((c for c in self.clients.values()
                                  if c.pid == client.pid and c.agent is not None), None)
        return client.joined

    @staticmethod
    def coldest(region, n, clean_only=False):
        """Up to n of region's resident pages (clean_only: read-only, with their entry),
        not in flight nor pinned, coldest by its CLOCK; sorted."""
        table = region.table
        candidates = table.clean(slice(None)) if clean_only else table.present()
        candidates &= (table.state != DEMOTING) & ~region.pinned
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
