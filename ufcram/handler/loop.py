"""The fault handler: one process per node. A single-threaded event loop over every
client's control socket and userfaultfd (and a listening socket for a shared node);
faults and events go to the pager, requests are answered in requests.py (a part of
the Handler class).
"""
import argparse
import errno
import faulthandler
import logging
import os
import select
import signal
import socket
import sys
import time

import numpy as np

from ufcram import config

from . import coverage, events, pinned, proc
from ufcram import protocol as P
from .client import Client
from .demotion import POLLIN
from ufcram.errors import UfcramError, UffdError, UffdRetry
from ufcram.store.pagetable import NO_ENTRY, PAGE_SIZE
from .faults import Pager
from .policy import Overflow
from ufcram.store.pool import Pool
from .engine import FastPath
from .guard import Repeats
from .requests import DEPARTED, Requests
from ufcram.app.uffd import EVENT_PAGEFAULT, MSG_DTYPE
from .wakeup import FastWake, poll_spinning

log = logging.getLogger("ufcram.handler")
DEFERRED_RETRY = 0.001   # seconds between retries of faults that met EAGAIN
LIMIT_RETRY = 0.01       # seconds before a limit whose demotion failed is enforced again


class Handler(Requests):
    def __init__(self, pool, listener=None, persist=False):
        self.pool = pool
        self.listener = listener
        self.persist = persist   # serve on with no client (a node programs come and go on)
        self.clients = {}      # control socket fd -> Client
        self.by_uffd = {}      # uffd fd -> Client (forked children have no socket)
        self.poller = select.poll()
        self.msgs = np.zeros(64, MSG_DTYPE)
        self.overflow = Overflow()
        self.repeats = Repeats(log)   # errors said once per client, then counted
        self.pager = Pager(pool, self.overflow, self.by_uffd, self.drain_uffd,
                           int(config.get("UFCRAM_AGENT_TIMEOUT", float) * 1000),
                           self.repeats)
        self.scan_interval = config.get("UFCRAM_SCAN_INTERVAL", float)
        self.max_regions = config.get("UFCRAM_MAX_REGIONS")
        self.max_client_bytes = config.get("UFCRAM_MAX_CLIENT_BYTES")
        self.fast_wake = FastWake()
        self.fast_path = FastPath(self.pager, self.msgs)
        self.next_scan = time.monotonic() + self.scan_interval
        self.touched = set()   # (client, region id) that faulted since the last check
        self.limits_due = set()   # (client, region id or None) whose enforcement failed
        self.departed = dict.fromkeys(DEPARTED, 0)
        self.requests = {P.HELLO: self.hello, P.REGISTER: self.register,
                         P.UNREGISTER: self.unregister, P.DEMOTE: self.demote_range,
                         P.STATS: self.stats, P.SET_CAPACITY: self.set_capacity,
                         P.LIMITS: self.limits, P.PING: self.ping}
        if listener is not None:
            self.poller.register(listener.fileno(), POLLIN)

    # --- clients -------------------------------------------------------------------
    def add_client(self, conn):
        client = Client(conn)
        if client.uid != os.geteuid():
            log.warning("refused client pid %d: uid %d is not ours", client.pid, client.uid)
            conn.close()
            return
        self.clients[conn.fileno()] = client
        self.poller.register(conn.fileno(), POLLIN)

    def accept_client(self):
        try:
            conn = self.listener.accept()[0]
        except OSError as e:
            # Out of descriptors (EMFILE): an uncaught error here ended the handler and
            # every client's memory with it. Stop listening until a client leaves
            # (drop_client) instead of spinning on the pending connection.
            log.warning("cannot accept a client: %s; not listening until one leaves", e)
            self.poller.unregister(self.listener.fileno())
            return
        self.add_client(conn)

    def watch_uffd(self, client):
        self.by_uffd[client.uffd.fd] = client
        self.poller.register(client.uffd.fd, POLLIN)

    def drop_client(self, client):
        """The client is gone or broke the protocol: release everything it held."""
        for region in client.regions.values():
            self.pager.release(region.table, np.flatnonzero(region.table.entry != NO_ENTRY))
            region.table.leave()
        if client.conn is not None and self.clients.pop(client.conn.fileno(), None):
            self.poller.unregister(client.conn.fileno())
        if client.ready and self.by_uffd.pop(client.uffd.fd, None):
            self.poller.unregister(client.uffd.fd)
            self.count_departed(client)   # here: once per client, however often dropped
        self.touched = {t for t in self.touched if t[0] is not client}
        self.limits_due = {t for t in self.limits_due if t[0] is not client}
        self.repeats.forget(client)
        client.close()
        if self.listener is not None:   # a descriptor is free again (see accept_client)
            self.poller.register(self.listener.fileno(), POLLIN)

    def run(self):
        """Serve until the last client has gone (or for good, if persistent)."""
        while self.clients or self.persist:
            for fd, _ in self.wait():
                if fd in self.by_uffd:
                    self.drain_uffd(self.by_uffd[fd], spin=True)
                elif fd in self.clients:
                    self.serve_request(self.clients[fd])
                elif self.listener is not None and fd == self.listener.fileno():
                    self.accept_client()
            self.after_events()

    def wait(self):
        """The next events, or none once the periodic scan or the fast wake-up request
        is due."""
        now = time.monotonic()
        lapse = self.fast_wake.timeout(now)
        due = self.next_scan - now if lapse is None else min(lapse, self.next_scan - now)
        if self.pager.deferred:   # retried soon even if no event comes (after_events)
            due = min(due, DEFERRED_RETRY)
        if self.limits_due:
            due = min(due, LIMIT_RETRY)
        return poll_spinning(self.poller, self.pager.spin, max(0, due) * 1000)

    def after_events(self):
        """Policy work, outside any fault batch: limits, overflow, the periodic scan."""
        if self.pager.deferred:
            # a fault that met EAGAIN after the last event was read (the thread that
            # caused it had not resumed yet) would otherwise wait for an unrelated event
            self.pager.resolve_deferred()
        # a limit whose demotion failed (a range unmapped under its drop, say) is tried
        # again soon: a program that faults no more would otherwise stay over it
        self.touched |= self.limits_due
        self.limits_due = set()
        # faults served while an eviction waits on the agent touch regions again:
        # enforce until none was (bounded, in case the application outruns us)
        for _ in range(8):
            touched, self.touched = self.touched, set()
            if not touched:
                break
            for client, rid in touched:
                region = client.regions.get(rid)
                if region is not None and client.ready and \
                        not self.guarded(client, self.pager.enforce_limit, client, region):
                    self.limits_due.add((client, rid))
            limited = {}   # one client per group: the limit is the group's
            for client, _ in touched:
                if client.limit.pages is not None and client.ready:
                    limited.setdefault(client.group_key, client)
            for client in limited.values():
                if not self.guarded(client, self.pager.enforce_client_limit, client):
                    self.limits_due.add((client, None))
        try:
            if self.overflow.closed:
                self.pager.relieve_overflow()   # retried on the next turn if interrupted
        except (UfcramError, OSError) as e:
            # EAGAIN (an event to read first) is routine: the next turn goes on
            log.log(logging.DEBUG if isinstance(e, UffdRetry) else logging.WARNING,
                    "overflow relief interrupted: %s", e)
            if getattr(e, "errno", None) == errno.ESRCH:
                # a forked child has exited: reap it now. It failed every retry, and in
                # the same try the scan that reaps it never ran: the node stayed closed
                # and the handler spun on an overdue scan.
                self.reap_exited()
        self.fast_wake.expire(time.monotonic())
        if time.monotonic() >= self.next_scan:
            # due again only after an interval even if it fails (e.g. EMFILE): set
            # after it, a failing scan made every poll time out at once, a busy loop
            self.next_scan = time.monotonic() + self.scan_interval
            try:
                self.scan()
            except (UfcramError, OSError) as e:
                log.warning("node upkeep interrupted: %s", e)

    def guarded(self, client, fn, *args):
        """Policy work for one client: a failure is said (once, then counted) and the
        client is served on. Not even a bug of ours drops it: that would take its memory
        away, where a limit not enforced this turn costs only resident memory. Returns
        whether it went through."""
        try:
            fn(*args)
            return True
        except (ConnectionResetError, BrokenPipeError) as e:
            # the process exited while we demoted: its socket tells us next, no news
            log.debug("client pid %d: %s", client.pid, e)
        except (UfcramError, OSError) as e:
            self.repeats.warn(client, str(e))
        except Exception as e:
            self.repeats.warn(client, f"unexpected failure: {e!r}", exc_info=True)
        return False

    def scan(self):
        """Reap what no event told us about: forked children that have exited, and pool
        entries no page table refers to; give back staging memory."""
        self.reap_exited()
        for client in list(self.by_uffd.values()):
            client.release_staging()
            if any(r.pinned.any() for r in client.regions.values()):
                # munlock gives no event: look again while anything is pinned
                self.guarded(client, pinned.pin_locked, self.pager, client)
        self.check_auto_writable()
        held = [r.table.entry for c in self.by_uffd.values() for r in c.regions.values()]
        orphans = self.pool.orphans(np.concatenate(held) if held else np.empty(0, np.int64))
        if len(orphans):
            log.warning("reaping %d orphaned pool entries", len(orphans))
            self.pool.free_many(orphans)

    def check_auto_writable(self):
        """The shared count the auto budgets read against the sum it stands for: a
        drift would let them grant too much (or too little), so say so and mend it."""
        actual = self.pager.writable_total(auto_only=True)
        if actual != self.pager.auto_writable.pages:
            log.error("auto-budget writable count drifted: %d counted, %d in the tables",
                      self.pager.auto_writable.pages, actual)
            self.pager.auto_writable.pages = actual

    def reap_exited(self):
        for client in list(self.by_uffd.values()):
            if client.parent is not None and not self.alive(client):
                self.drop_client(client)

    @staticmethod
    def alive(client):
        """A uffd whose process is gone answers ESRCH; probe it at an address that is
        in none of its regions, so a live process's memory is never touched."""
        try:
            client.uffd.zeropage(0x10000, PAGE_SIZE, wake=False)
        except UffdError as e:
            return e.errno != errno.ESRCH
        return True

    # --- faults and events -----------------------------------------------------------
    def drain_uffd(self, client, spin=False):
        """Serve the client's queued faults and events; with spin, wait a moment for
        more (the main loop's call, not a nested one that waits on an agent)."""
        while client.ready:
            try:
                first, n, served = self.read_faults(client, spin)
            except UffdError as e:
                log.error("client pid %d: reading its uffd failed: %s", client.pid, e)
                return self.drop_client(client)
            except Exception as e:
                # a bug after the read (the fast path's books): the messages read went
                # with it, so wake every waiter; a thread whose page is still missing
                # faults again, in a message of its own, instead of waiting forever
                self.repeats.warn(client, f"serving its uffd failed unexpectedly: {e!r}",
                                  exc_info=True)
                return self.wake_all(client)
            # tuples, not views: nested drains (await_agent) reuse self.msgs. The events
            # first: the kernel lets a thread that freed pages go on as soon as its event
            # is read, and a page of those installed for a fault read with it (the kernel
            # puts faults first) would outlive the free (engine/faults.c serves around those).
            msgs = self.msgs[first:n]
            if n - first > 1:   # (most drains leave none: this costs them nothing)
                faults = msgs["event"] == EVENT_PAGEFAULT
                if faults.any() and not faults.all():
                    msgs = np.concatenate((msgs[~faults], msgs[faults]))
            batch = msgs[["event", "arg0", "arg1", "arg2"]].tolist()
            if batch or served:
                self.fast_wake.fault()
            for region in served:
                self.faulted(client, region)
            for event, a0, a1, a2 in batch:
                if event == EVENT_PAGEFAULT:   # Pager.fault guards itself (it retries)
                    addr = a1 & ~(PAGE_SIZE - 1)
                    if client.covers_mappings and client.locate(addr) is None:
                        self.cover(client, addr)
                    self.faulted(client, self.pager.fault(client, addr, a0, a2 & 0xFFFFFFFF))
                else:
                    self.dispatch_event(client, event, a0, a1, a2)
            if n < len(self.msgs):
                # the queue is empty, so no event blocks the ioctls any more: retry the
                # faults that met EAGAIN (those on pages in flight wait again)
                return self.pager.resolve_deferred()

    def cover(self, client, addr):
        """A fault outside every region of a client that covers its mappings: cover the
        mapping. A bug here is said and the fault is served as outside every region."""
        try:
            coverage.cover_fault(self, client, addr)
        except Exception as e:
            self.repeats.warn(client, f"covering {addr:#x} failed unexpectedly: {e!r}",
                              exc_info=True)

    def dispatch_event(self, client, event, a0, a1, a2):
        """One non-fault event. Nothing raised here may leave: out of the main loop it
        would end every client's memory with the handler, and out of a drain nested in
        await_agent it would unwind the demotion in flight there, another client's
        perhaps. The event has been read and is gone, so a bug is said (once, then
        counted) and the batch goes on."""
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

    def read_faults(self, client, spin):
        """(first, n, regions served in): the messages msgs[first:n] are left to
        serve, after the fast path served the faults it could."""
        if client.pid < 0 and client.parent is not None:
            # a forked child's pid, which its fork event does not say: the process of
            # its first faulting thread, which waits on our answer so is still there
            # (read here, for the fast path keeps no tids)
            n = client.uffd.read_msgs(self.msgs)
            tids = self.msgs["arg2"][:n][self.msgs["event"][:n] == EVENT_PAGEFAULT]
            if len(tids):
                client.pid = proc.thread_group(int(tids[0]) & 0xFFFFFFFF)
            return 0, n, ()
        if self.fast_path.enabled:
            return self.fast_path.serve(client, spin)
        return 0, client.uffd.read_msgs(self.msgs), ()

    def faulted(self, client, region):
        """A fault was served in region (None: outside every region): its limits are
        checked after this turn's events."""
        if region is not None and (region.limit.pages is not None or
                                   client.limit.pages is not None):
            self.touched.add((client, region.id))

    def count_departed(self, client):
        """Counters summed over every client that has left (drop_client): a summary read
        after its program has exited still has the program's totals."""
        self.departed["clients"] += 1
        counters = client.counters()
        for key in DEPARTED[1:]:
            self.departed[key] += counters[key]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ufcram.handler",
                                     description="ufcram fault handler (one per node)")
    parser.add_argument("--fd", type=int, action="append", default=[],
                        help="an inherited, connected client socket (repeatable)")
    parser.add_argument("--listen", metavar="PATH",
                        help="also accept clients on this Unix socket (mode 0600)")
    parser.add_argument("--capacity", type=int, help="pool capacity in bytes")
    parser.add_argument("--persist", action="store_true",
                        help="keep serving when no client is left (needs --listen)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="ufcram handler: %(message)s",
                        level=logging.DEBUG if config.get("UFCRAM_DEBUG") else logging.WARNING)
    # Ctrl-C meant for the application must not take its memory away: the handler
    # leaves when its last client does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1)   # `kill -USR1` shows where a handler is stuck
    capacity = args.capacity if args.capacity is not None else config.get("UFCRAM_NODE_CAPACITY")
    listener = listen(args.listen) if args.listen else None
    handler = Handler(Pool(capacity), listener, persist=args.persist and listener is not None)
    for fd in args.fd:
        handler.add_client(socket.socket(fileno=fd))
    if handler.persist:
        # a persistent node leaves on Ctrl-C or SIGTERM, but only once its clients have:
        # their memory is on it
        def drain(signum, frame):
            handler.persist = False
        signal.signal(signal.SIGINT, drain)
        signal.signal(signal.SIGTERM, drain)
    try:
        handler.run()
    finally:
        if args.listen:
            os.unlink(args.listen)


def listen(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)   # the socket is the owner's alone; SO_PEERCRED checks again
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock

