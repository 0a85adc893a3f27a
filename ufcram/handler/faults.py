"""Faults and events of each client's uffd: the fault engine (engine.py) serves the faults,
and what it leaves is settled here, a part of the Handler class (loop.py): events first,
then the faults they held back; those that must wait go on the one deferred list.
"""
import errno
import logging

import numpy as np

from ufcram._shim import lib
from ufcram.app.uffd import EVENT_PAGEFAULT
from ufcram.errors import UfcramError, UffdError
from ufcram.store.pagetable import PAGE_SIZE
from . import coverage, events, proc
from .engine import MAX_FAULTS

log = logging.getLogger("ufcram.handler")
# faults that wait (their page in flight, their tree being demoted) or met EAGAIN: the
# deferred list retries them after each batch and every loop turn
WAITING = (lib.UFC_LEFT_WAIT, lib.UFC_LEFT_RETRY)


class Faults:
    """The part of the Handler (loop.py) that serves uffds."""

    def drain_uffd(self, client, spin=False):
        """Serve the client's queued faults and events; with spin, wait a moment for
        more (the main loop's call, not one while a job waits on an agent)."""
        while client.ready:
            try:
                left, served, done = self.read_faults(client, spin)
            except UffdError as e:
                log.error("client pid %d: reading its uffd failed: %s", client.pid, e)
                return self.drop_client(client)
            except Exception as e:
                # a bug after the read (in the books of what the engine did): the
                # messages read went with it, so wake every waiter; a thread whose page
                # is still missing faults again, in a message of its own
                self.repeats.warn(client, f"serving its uffd failed unexpectedly: {e!r}",
                                  exc_info=True)
                return self.wake_all(client)
            if left or served:
                self.fast_wake.fault()
            # copies: settling serves faults again, through the same buffers
            self.settle(client, self.msgs[:left].copy(), self.engine.why[:left].copy(), served)
            if done:
                # no event blocks the ioctls any more: retry the faults that met
                # EAGAIN (those on pages in flight wait again)
                return self.resolve_deferred()

    def read_faults(self, client, spin):
        """(messages left, regions served in, done) after the engine served what it
        could; done: the queue was found empty, or a resident limit was crossed (a turn
        of the main loop then enforces it before more faults are read)."""
        if client.pid < 0 and client.parent is not None:
            # a forked child's pid, which its fork event does not say: the process of
            # its first faulting thread, which waits on our answer so is still there
            # (read here, for the engine keeps no tids)
            n = client.uffd.read_msgs(self.msgs[:MAX_FAULTS])
            tids = self.msgs["arg2"][:n][self.msgs["event"][:n] == EVENT_PAGEFAULT]
            if len(tids):
                client.pid = proc.thread_group(int(tids[0]) & 0xFFFFFFFF)
            if n == 0:
                return 0, (), True
            return *self.engine.serve_msgs(client, self.msgs[:n].copy()), False
        left, served = self.engine.serve(client, spin)
        return left, served, bool(self.engine.call.drained or self.engine.call.over)

    def settle(self, client, msgs, why, served=()):
        """What the engine left of one read, in order: its events first (the kernel lets
        a thread that freed pages go on once its event is read, and hands out faults
        before events), then the faults the events held back, served again."""
        for region in served:
            self.faulted(client, region)
        waiting = np.zeros(len(msgs), bool)
        for i, (event, a0, a1, a2) in enumerate(msgs[["event", "arg0", "arg1", "arg2"]].tolist()):
            reason = int(why[i])
            if reason == lib.UFC_LEFT_EVENT:
                self.dispatch_event(client, event, a0, a1, a2)
            elif reason == lib.UFC_LEFT_OUTSIDE:
                self.cover(client, a1 & ~(PAGE_SIZE - 1))
            elif reason in WAITING:
                waiting[i] = True
            elif reason == -errno.EBADMSG:
                # the books name an entry the pool does not hold: a bug of ours, said
                # and retried, never dropped (that would hang the thread for good)
                self.repeats.warn(client, f"fault at {a1:#x}: no such pool entry")
                waiting[i] = True
            elif reason < 0:
                log.error("client pid %d: fault at %#x: %s", client.pid, a1,
                          errno.errorcode.get(-reason, -reason))
        if waiting.any():
            self.deferred.append((client, msgs[waiting]))
        if client.ready:
            self.serve_given(client, msgs[why == lib.UFC_LEFT_AFTER_EVENTS])
            # covered now (or not ours to cover): served outside regions if still so
            self.serve_given(client, msgs[why == lib.UFC_LEFT_OUTSIDE], cover=False)

    def serve_given(self, client, msgs, cover=True):
        step = min(MAX_FAULTS, len(self.msgs))
        for at in range(0, len(msgs), step):
            try:
                left, served = self.engine.serve_msgs(client, msgs[at:at + step], cover)
            except Exception as e:   # the engine's books: never drop the faults
                self.repeats.warn(client, f"serving faults failed unexpectedly: {e!r}",
                                  exc_info=True)
                self.deferred.append((client, msgs[at:at + step]))
                continue
            self.settle(client, self.msgs[:left].copy(), self.engine.why[:left].copy(),
                        served)

    def resolve_deferred(self):
        """Retry the faults that waited, each client's in one call, in the order they
        came."""
        pending, self.deferred = self.deferred, []
        by_client = {}
        for client, msgs in pending:
            by_client.setdefault(client, []).append(msgs)
        for client, parts in by_client.items():
            if client.ready:
                self.serve_given(client, np.concatenate(parts))

    def cover(self, client, addr):
        """A fault outside every region of a client that covers its mappings: cover the
        mapping. A bug here is said and the fault is served as outside every region."""
        try:
            coverage.cover_fault(self, client, addr)
        except Exception as e:
            self.repeats.warn(client, f"covering {addr:#x} failed unexpectedly: {e!r}",
                              exc_info=True)

    def dispatch_event(self, client, event, a0, a1, a2):
        """One non-fault event. Nothing raised here may leave: out of the loop (or out of
        a job's wait on an agent, the demotion in flight there another client's perhaps)
        it would end every client's memory with the handler. The event has been read
        and is gone, so a bug is said (once, then counted) and the batch goes on."""
        try:
            child = events.dispatch(self.pager, client, event, a0, a1, a2)
            if child is not None:
                self.watch_uffd(child)
        except Exception as e:
            self.repeats.warn(client, f"event {event} failed unexpectedly: {e!r}",
                              exc_info=not isinstance(e, (UfcramError, OSError)))

    @staticmethod
    def wake_all(client):
        for region in client.regions.values():
            try:
                client.uffd.wake(region.table.base, region.table.npages * PAGE_SIZE)
            except UffdError:   # gone meanwhile: nobody waits there
                pass

    def faulted(self, client, region):
        """A fault was served in region: its limits are checked after this turn's
        events."""
        if region.limit.pages is not None or client.limit.pages is not None:
            self.touched.add((client, region.id))
