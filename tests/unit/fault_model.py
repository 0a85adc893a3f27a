"""A reference model of the fault engine's decisions (native/engine/plan.c), written as
the handler's Python served faults before the engine took them: the test oracle only.

It says, for one fault on given page tables, what the design asks: which transition,
over how many pages (fault-around), into which state, and how the readahead window
moves. test_engine.py holds ufc_plan_fault to it.
"""
from dataclasses import dataclass, field

import numpy as np

from ufcram._shim import lib
from ufcram.store.pagetable import (DEMOTED, DEMOTING, NORMAL, PAGE_SIZE, READONLY,
                                    UNTOUCHED, WRITABLE)

WP, WRITE = lib.UFFD_PAGEFAULT_FLAG_WP, lib.UFFD_PAGEFAULT_FLAG_WRITE
FREED_NONE = (1 << 64) - 1


@dataclass
class Table:
    """One region as the engine sees it."""
    base: int
    state: np.ndarray
    entry: np.ndarray
    window: int = 1
    next: int = -1
    max_window: int = 16
    limit: int = -1          # resident limit in pages, -1 for none
    budget: int = -1         # write budget in pages, -1 for auto
    tally: np.ndarray = field(init=False)

    def __post_init__(self):
        self.tally = np.bincount(self.state, minlength=lib.UFC_NSTATES).astype(np.int64)

    @property
    def resident(self):
        return int(self.tally[NORMAL] + self.tally[READONLY] + self.tally[WRITABLE])


@dataclass
class Call:
    """What Python hands the engine for one call."""
    client_room: int = 1 << 62   # pages the client's limit lets in (INT64_MAX: none)
    may_grant: bool = True
    throttle: bool = False
    cover: bool = False
    agent_tid: int = 0
    auto_grants: int = 0
    bounce_pages: int = 16


@dataclass
class Plan:
    action: int
    region: int = -1
    page: int = 0
    count: int = 1
    window: int = -1
    state: int = 0
    wp: bool = False


def present(state):
    return state not in (UNTOUCHED, DEMOTED)


def readahead(t, page, state, most):
    """(pages to bring in, the new window): Readahead.pages then .ran."""
    skipped = t.next >= 0 and t.next < page <= t.next + t.max_window
    read_through = skipped and all(present(s) for s in t.state[t.next:page])
    sequential = page == t.next or read_through
    window = min(t.window * 2, t.max_window) if sequential else 1
    want = min(window, most, len(t.state) - page)
    count = 1
    while count < want and t.state[page + count] == state:
        count += 1
    return count, window


def grant_write(t, call):
    """CRAM's `if writable < write_budget`; never when the node is closed or for a
    forked child."""
    if not call.may_grant:
        return False
    return call.auto_grants > 0 if t.budget < 0 else t.tally[WRITABLE] < t.budget


def plan(tables, addr, flags, tid, freed, call):
    addr &= ~(PAGE_SIZE - 1)
    wp = bool(flags & WP)
    write = wp or bool(flags & WRITE)
    agent = call.agent_tid != 0 and tid == call.agent_tid
    if freed == addr:
        return Plan(lib.UFC_LEFT_AFTER_EVENTS)
    at = next((i for i, t in enumerate(tables)
               if t.base <= addr < t.base + len(t.state) * PAGE_SIZE), -1)
    if at < 0:
        if call.cover:
            return Plan(lib.UFC_LEFT_OUTSIDE)
        return Plan(lib.UFC_FAULT_UNPROTECT if wp else lib.UFC_FAULT_ZEROS)
    t = tables[at]
    page = (addr - t.base) // PAGE_SIZE
    state = int(t.state[page])
    here = dict(region=at, page=page)
    if state == DEMOTING:
        return Plan(lib.UFC_FAULT_AGENT_ZEROS if agent else lib.UFC_LEFT_WAIT, **here)
    written = WRITABLE if grant_write(t, call) else NORMAL
    before_free = (1 << 62) if freed == FREED_NONE else (freed - addr) // PAGE_SIZE
    room = min(t.limit - t.resident if t.limit >= 0 else call.bounce_pages,
               call.client_room, call.bounce_pages, before_free)
    room = max(room, 1)   # the faulting page always comes in
    if t.entry[page] >= 0 and not (wp and state == READONLY):
        if write:
            return Plan(lib.UFC_FAULT_RESTORE, state=written, **here)
        count, window = readahead(t, page, DEMOTED, room)
        return Plan(lib.UFC_FAULT_RESTORE, count=count, window=window, state=READONLY,
                    wp=True, **here)
    if wp:
        if state == READONLY:
            return Plan(lib.UFC_FAULT_UPGRADE, state=written, **here)
        return Plan(lib.UFC_FAULT_UNPROTECT, **here)
    if call.throttle and not agent:   # a new page waits while its tree is demoted
        return Plan(lib.UFC_LEFT_WAIT, **here)
    # zero pages cost no memory until written: no limit cuts their window
    count, window = readahead(t, page, UNTOUCHED, min(call.bounce_pages, before_free))
    return Plan(lib.UFC_FAULT_ZERO_FILL, count=count, window=window, state=NORMAL, **here)
