"""The pager: moves pages out of memory and back on policy decisions, through the
application's agent and uffd (faults are the fault engine's, engine.py). Write budgets and
the pool entries page tables let go of are here; demotion (demotion.py) and limits
(limits.py) are the rest of its class. It runs in the handler's single thread.
"""
import logging
import weakref

import numpy as np

from ufcram import config
from ufcram.app.uffd import address_of
from ufcram.store.pagetable import NO_ENTRY, PAGE_SIZE, WRITABLE, SharedTally
from .demotion import Demotion
from .settle import Settle
from .guard import Repeats
from .limits import Limits
from .policy import TAIL_PERCENTILE

log = logging.getLogger("ufcram.handler")


class Pager(Demotion, Settle, Limits):
    def __init__(self, pool, overflow, clients, repeats=None):
        self.pool = pool
        self.repeats = repeats or Repeats(log)
        self.overflow = overflow
        self.clients = clients          # uffd fd -> Client, shared with the handler
        # promotions decompress here, then one UFFDIO_COPY installs a run
        self.bounce = np.zeros((config.get("UFCRAM_FAULT_AROUND") or 1, PAGE_SIZE), np.uint8)
        self.bounce_addr = address_of(self.bounce)
        self.enforcing = set()          # groups being demoted to their resident limit
        self.others = weakref.WeakKeyDictionary()   # client -> (when, its group's others)
        # writable pages of every region under an auto budget: the budgets share them
        self.auto_writable = SharedTally(WRITABLE)

    # --- write budgets and the entries page tables hold ----------------------------
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

    def release(self, table, pages):
        """Drop pages' hold on their pool entries; an entry is freed with its last owner."""
        pages = np.atleast_1d(pages)
        held = table.entry[pages]
        held = held[held != NO_ENTRY]
        table.entry[pages] = NO_ENTRY
        self.pool.release(held)
        return len(held)
