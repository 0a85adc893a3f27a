"""The fault handler: one process per node. A single-threaded event loop over every
client's control socket and userfaultfd (and a listening socket for a shared node);
uffds are served in faults.py, requests answered in requests.py and work that waits on an
agent advanced in jobs.py (parts of the Handler class); policy work (limits, overflow,
the periodic scan) runs between turns, as a job.
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
from ufcram import protocol as P
from ufcram.app.uffd import MSG_DTYPE
from ufcram.errors import UfcramError, UffdError, UffdRetry
from ufcram.store.pagetable import NO_ENTRY, PAGE_SIZE
from ufcram.store.pool import Pool
from . import pinned
from .client import Client
from .engine import Engine
from .faults import Faults
from .guard import Repeats
from .jobs import POLLIN, Jobs
from .pager import Pager
from .policy import Overflow
from .requests import DEPARTED, Requests
from .wakeup import FastWake, poll_spinning

log = logging.getLogger("ufcram.handler")
DEFERRED_RETRY = 0.001   # seconds between retries of faults that met EAGAIN
LIMIT_RETRY = 0.01       # seconds before a limit whose demotion failed is enforced again


class Handler(Requests, Faults, Jobs):
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
        self.deferred = []     # (client, faults): those that wait (faults.py)
        self.pager = Pager(pool, self.overflow, self.by_uffd, self.repeats)
        self.job = None        # the one job advanced by the loop (jobs.py)
        self.policy_owed = False   # a request's job took the turn's policy work
        self.spin = config.get("UFCRAM_SPIN_US", float) / 1e6
        self.agent_timeout_ms = int(config.get("UFCRAM_AGENT_TIMEOUT", float) * 1000)
        self.scan_interval = config.get("UFCRAM_SCAN_INTERVAL", float)
        self.max_regions = config.get("UFCRAM_MAX_REGIONS")
        self.max_client_bytes = config.get("UFCRAM_MAX_CLIENT_BYTES")
        self.fast_wake = FastWake()
        self.engine = Engine(self.pager, self.msgs)
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
        while self.clients or self.persist or self.job is not None:
            if self.job is not None:
                self.wait_on_job()
                continue
            if self.policy_owed:   # the turn whose request became a job: its policy now
                self.start(self.after_events())
                continue
            for fd, _ in self.wait():
                if fd in self.by_uffd:
                    self.drain_uffd(self.by_uffd[fd], spin=True)
                elif fd in self.clients:
                    self.serve_request(self.clients[fd])
                elif self.listener is not None and fd == self.listener.fileno():
                    self.accept_client()
                if self.job is not None:   # a request waits on an agent: it goes first
                    break
            if self.job is None:
                self.start(self.after_events())
            else:
                self.policy_owed = True

    def wait(self):
        """The next events, or none once the periodic scan or the fast wake-up request
        is due."""
        now = time.monotonic()
        lapse = self.fast_wake.timeout(now)
        due = self.next_scan - now if lapse is None else min(lapse, self.next_scan - now)
        if self.deferred:   # retried soon even if no event comes (after_events)
            due = min(due, DEFERRED_RETRY)
        if self.limits_due:
            due = min(due, LIMIT_RETRY)
        return poll_spinning(self.poller, self.spin, max(0, due) * 1000)

    def after_events(self):
        """Policy work, outside any fault batch, as a job: limits, overflow, the
        periodic scan."""
        self.policy_owed = False
        if self.deferred:
            # a fault that met EAGAIN after the last event was read (the thread that
            # caused it had not resumed yet) would otherwise wait for an unrelated event
            self.resolve_deferred()
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
                if region is not None and client.ready and not (yield from self.guarded(
                        client, self.pager.enforce_limit(client, region))):
                    self.limits_due.add((client, rid))
            limited = {}   # one client per group: the limit is the group's
            for client, _ in touched:
                if client.limit.pages is not None and client.ready:
                    limited.setdefault(client.group_key, client)
            for client in limited.values():
                if not (yield from self.guarded(client,
                                                self.pager.enforce_client_limit(client))):
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
                yield from self.scan()
            except (UfcramError, OSError) as e:
                log.warning("node upkeep interrupted: %s", e)

    def guarded(self, client, steps):
        """Policy work for one client (steps of a job): a failure is said (once, then
        counted) and the client is served on. Not even a bug of ours drops it: that
        would take its memory away, where a limit not enforced this turn costs only
        resident memory. Returns whether it went through."""
        try:
            yield from steps
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
                yield from self.guarded(client, pinned.pin_locked(self.pager, client))
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

