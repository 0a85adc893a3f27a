"""The fault handler: one process per node. A single-threaded event loop over every
client's control socket and userfaultfd (and a listening socket for a shared node);
faults and events go to the pager, requests are answered here.
"""
import argparse
import errno
import logging
import os
import select
import signal
import socket
import sys
import time

import numpy as np

from . import config, events
from . import protocol as P
from ._shim import lib
from .client import Client
from .errors import HandlerError, ProtocolError, UfcramError, UffdError
from .pagetable import NO_ENTRY, PAGE_SIZE
from .pager import POLLIN, Pager
from .policy import Overflow, exposed_pages
from .pool import Pool
from .uffd import EVENT_PAGEFAULT, MSG_DTYPE, WANTED

log = logging.getLogger("ufcram.handler")


class Handler:
    def __init__(self, pool, listener=None):
        self.pool = pool
        self.listener = listener
        self.clients = {}      # control socket fd -> Client
        self.by_uffd = {}      # uffd fd -> Client (forked children have no socket)
        self.poller = select.poll()
        self.msgs = np.zeros(64, MSG_DTYPE)
        self.overflow = Overflow()
        self.pager = Pager(pool, self.overflow, self.by_uffd, self.drain_uffd,
                           int(config.get("UFCRAM_AGENT_TIMEOUT", float) * 1000))
        self.scan_interval = config.get("UFCRAM_SCAN_INTERVAL", float)
        self.max_regions = config.get("UFCRAM_MAX_REGIONS")
        self.max_client_bytes = config.get("UFCRAM_MAX_CLIENT_BYTES")
        self.spin = config.get("UFCRAM_SPIN_US", float) / 1e6
        self.next_scan = time.monotonic() + self.scan_interval
        self.touched = set()   # (client, region id) that faulted since the last check
        self.requests = {P.HELLO: self.hello, P.REGISTER: self.register,
                         P.UNREGISTER: self.unregister, P.DEMOTE: self.demote_range,
                         P.STATS: self.stats, P.SET_CAPACITY: self.set_capacity}
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
        if client.conn is not None and self.clients.pop(client.conn.fileno(), None):
            self.poller.unregister(client.conn.fileno())
        if client.ready and self.by_uffd.pop(client.uffd.fd, None):
            self.poller.unregister(client.uffd.fd)
        self.touched = {t for t in self.touched if t[0] is not client}
        client.close()
        if self.listener is not None:   # a descriptor is free again (see accept_client)
            self.poller.register(self.listener.fileno(), POLLIN)

    def run(self):
        """Serve until the last client has gone."""
        while self.clients:
            for fd, _ in self.wait():
                if fd in self.by_uffd:
                    self.drain_uffd(self.by_uffd[fd])
                elif fd in self.clients:
                    self.serve_request(self.clients[fd])
                elif self.listener is not None and fd == self.listener.fileno():
                    self.accept_client()
            self.after_events()

    def wait(self):
        """The next events. Poll without sleeping for a moment first: a faulting thread
        that finds the handler asleep on another CPU waits ~100 us for its wake-up."""
        deadline = time.perf_counter() + self.spin
        while True:
            events = self.poller.poll(0)
            if events or time.perf_counter() >= deadline:
                break
        return events or self.poller.poll(max(0, self.next_scan - time.monotonic()) * 1000)

    def after_events(self):
        """Policy work, outside any fault batch: limits, overflow, the periodic scan."""
        # faults served while an eviction waits on the agent touch regions again:
        # enforce until none was (bounded, in case the application outruns us)
        for _ in range(8):
            touched, self.touched = self.touched, set()
            if not touched:
                break
            for client, rid in touched:
                region = client.regions.get(rid)
                if region is not None and client.ready:
                    self.guarded(client, self.pager.enforce_limit, client, region)
        try:
            if self.overflow.closed:
                self.pager.relieve_overflow()   # retried on the next turn if interrupted
        except (UfcramError, OSError) as e:
            log.warning("overflow relief interrupted: %s", e)
            if getattr(e, "errno", None) == errno.ESRCH:
                # a forked child has exited: reap it now. It failed every retry, and in
                # the same try the scan that reaps it never ran: the node stayed closed
                # and the handler spun on an overdue scan.
                self.reap_exited()
        if time.monotonic() >= self.next_scan:
            # due again only after an interval even if it fails (e.g. EMFILE): set
            # after it, a failing scan made every poll time out at once, a busy loop
            self.next_scan = time.monotonic() + self.scan_interval
            try:
                self.scan()
            except (UfcramError, OSError) as e:
                log.warning("node upkeep interrupted: %s", e)

    def guarded(self, client, fn, *args):
        try:
            return fn(*args)
        except (UfcramError, OSError) as e:
            log.warning("client pid %d: %s", client.pid, e)
        except Exception:   # a bug: lose this client, never the other clients' memory
            log.exception("client pid %d: unexpected failure; dropping it", client.pid)
            self.drop_client(client)

    def scan(self):
        """Reap what no event told us about: forked children that have exited, and pool
        entries no page table refers to."""
        self.reap_exited()
        held = [r.table.entry for c in self.by_uffd.values() for r in c.regions.values()]
        orphans = self.pool.orphans(np.concatenate(held) if held else np.empty(0, np.int64))
        if len(orphans):
            log.warning("reaping %d orphaned pool entries", len(orphans))
            self.pool.free_many(orphans)

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

    # --- requests ------------------------------------------------------------------
    def serve_request(self, client):
        try:
            frame, fds = P.recv_frame(client.conn, with_fds=True)
        except (ProtocolError, OSError) as e:
            log.warning("client pid %d: %s; dropping it", client.pid, e)
            return self.drop_client(client)
        if not frame:
            P.close_all(fds)
            return self.drop_client(client)
        seq = 0
        # attach() takes the descriptors out of fds once it owns them, so remember
        # whether this was a HELLO with descriptors: a failed one must drop the client
        took_fds = bool(fds)
        try:
            op, seq, payload = P.decode(frame)
            if fds and op != P.HELLO:
                raise ProtocolError(f"op {op} carries descriptors")
            if op != P.HELLO and not client.ready:
                raise ProtocolError(f"op {op} before HELLO")
            handler = self.requests.get(op)
            if handler is None:
                raise ProtocolError(f"unknown request op {op}")
            reply = handler(client, fds, *P.unpack_request(op, payload))
            self.reply(client, P.OK, seq, reply)
        except (UfcramError, OSError) as e:
            code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
            self.reply(client, P.ERROR, seq, P.error_payload(code, str(e)))
            if took_fds:   # a failed HELLO: nothing of this client can be trusted
                P.close_all(fds)
                self.drop_client(client)
        except Exception:   # a bug: lose this client, never the other clients' memory
            log.exception("client pid %d: request failed unexpectedly; dropping it", client.pid)
            P.close_all(fds)
            self.drop_client(client)

    def reply(self, client, op, seq, payload):
        try:
            # Never block: a client that sends requests without reading the replies
            # would otherwise stall the handler, and every other client's faults.
            client.conn.send(P.encode(op, seq, payload), socket.MSG_DONTWAIT)
        except OSError:
            self.drop_client(client)

    def hello(self, client, fds, staging_bytes, _reserved):
        client.attach(fds, staging_bytes, WANTED)
        # not agent.ping(): its blocking recv let an agent socket that never answers
        # stall the handler for good; await_agent times out and serves faults meanwhile
        client.agent.send(lib.UFC_AGENT_PING)
        status, _ = self.pager.await_agent(client)
        if status < 0:
            raise HandlerError(f"agent ping failed: {os.strerror(-status)}")
        self.watch_uffd(client)
        return b""

    def register(self, client, fds, start, length, resident_limit, write_budget):
        limit = None if resident_limit == P.NO_LIMIT else resident_limit
        budget = "auto" if write_budget == P.AUTO_BUDGET else write_budget
        client.check_quota(length, self.max_regions, self.max_client_bytes)
        return P.COUNT.pack(client.add_region(start, length, limit, budget))

    def unregister(self, client, fds, rid, restore):
        region = client.region(rid)
        restored = self.pager.promote_region(client, region) if restore else 0
        self.pager.release(region.table, np.flatnonzero(region.table.entry != NO_ENTRY))
        client.remove_region(rid)
        return P.COUNT.pack(restored)

    def demote_range(self, client, fds, rid, offset, length):
        region = client.region(rid)
        first, last = region.table.page_range(offset, length)
        present = first + np.flatnonzero(region.table.present(first, last))
        return P.COUNT.pack(self.pager.demote(client, region, present))

    def set_capacity(self, client, fds, capacity):
        self.pool.capacity = capacity
        self.overflow.update(self.pool.mem_used_total, capacity)
        self.pager.demote_excess_writable()
        return b""

    def stats(self, client, fds, rid):
        if rid != P.NODE:
            return P.json_payload(client.region(rid).stats())
        pool = self.pool.stats()
        return P.json_payload({
            **pool, "clients": len(self.clients), "node_closed": self.overflow.closed,
            "overflow_events": self.overflow.events,
            "exposed_pages": exposed_pages(self.pool.capacity, pool["pages_stored"],
                                           pool["compr_data_size"]),
            "writable_pages": self.pager.writable_total(),
            "per_client": [self.client_stats(c) for c in self.by_uffd.values()]})

    @staticmethod
    def client_stats(client):
        tallies = [r.stats() for r in client.regions.values()]
        return {"pid": client.pid, "forked": client.parent is not None,
                "regions": len(tallies),
                **{k: sum(t[k] for t in tallies) for k in
                   ("pages", "resident", "normal", "readonly", "writable", "demoted",
                    "demotions", "clean_redemotions", "restores", "promotions")}}

    # --- faults and events -----------------------------------------------------------
    def drain_uffd(self, client):
        while client.ready:
            try:
                n = client.uffd.read_msgs(self.msgs)
            except UffdError as e:
                log.error("client pid %d: reading its uffd failed: %s", client.pid, e)
                return self.drop_client(client)
            batch = self.msgs[:n].copy()   # nested drains (await_agent) reuse self.msgs
            for event, a0, a1, a2 in zip(batch["event"].tolist(), batch["arg0"].tolist(),
                                         batch["arg1"].tolist(), batch["arg2"].tolist()):
                if event == EVENT_PAGEFAULT:
                    region = self.pager.fault(client, a1 & ~(PAGE_SIZE - 1), a0,
                                              a2 & 0xFFFFFFFF)
                    if region is not None and region.limit.pages is not None:
                        self.touched.add((client, region.id))
                else:
                    child = events.dispatch(self.pager, client, event, a0, a1, a2)
                    if child is not None:
                        self.watch_uffd(child)
            if n < len(self.msgs):
                # the queue is empty, so no event blocks the ioctls any more: retry the
                # faults that met EAGAIN (those on pages in flight wait again)
                return self.pager.resolve_deferred()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ufcram.handler",
                                     description="ufcram fault handler (one per node)")
    parser.add_argument("--fd", type=int, action="append", default=[],
                        help="an inherited, connected client socket (repeatable)")
    parser.add_argument("--listen", metavar="PATH",
                        help="also accept clients on this Unix socket (mode 0600)")
    parser.add_argument("--capacity", type=int, help="pool capacity in bytes")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="ufcram handler: %(message)s",
                        level=logging.DEBUG if config.get("UFCRAM_DEBUG") else logging.WARNING)
    # Ctrl-C meant for the application must not take its memory away: the handler
    # leaves when its last client does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    capacity = args.capacity if args.capacity is not None else config.get("UFCRAM_NODE_CAPACITY")
    listener = listen(args.listen) if args.listen else None
    handler = Handler(Pool(capacity), listener)
    for fd in args.fd:
        handler.add_client(socket.socket(fileno=fd))
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


if __name__ == "__main__":
    main()
