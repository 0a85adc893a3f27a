"""The fault handler: one process per node. A single-threaded event loop over every
client's control socket and userfaultfd; it resolves faults and carries out requests.
"""
import argparse
import errno
import logging
import os
import select
import signal
import socket
import sys

import numpy as np

from . import config
from . import protocol as P
from ._shim import lib
from .agent import MAX_RUNS
from .client import Client
from .errors import HandlerError, ProtocolError, UfcramError, UffdError, UffdRetry
from .pagetable import DEMOTED, DEMOTING, NO_ENTRY, NORMAL, PAGE_SIZE, runs_of
from .pool import Pool
from .uffd import EVENT_PAGEFAULT, FLAG_WP, FLAG_WRITE, MSG_DTYPE, address_of

log = logging.getLogger("ufcram.handler")
POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR


def batches(pages, max_pages, max_runs):
    """Split sorted pages into batches that fit the staging buffer and one agent command."""
    while len(pages):
        chunk = pages[:max_pages]
        runs = runs_of(chunk)
        if len(runs) > max_runs:
            chunk = chunk[:int(runs[:max_runs, 1].sum())]
            runs = runs[:max_runs]
        yield chunk, runs
        pages = pages[len(chunk):]


class Handler:
    def __init__(self, pool):
        self.pool = pool
        self.clients = {}      # control socket fd -> Client
        self.by_uffd = {}      # uffd fd -> Client
        self.poller = select.poll()
        self.msgs = np.zeros(64, MSG_DTYPE)
        self.bounce = np.zeros(PAGE_SIZE, np.uint8)
        self.bounce_addr = address_of(self.bounce)
        self.zeros = np.zeros(PAGE_SIZE, np.uint8)
        self.zeros_addr = address_of(self.zeros)
        self.deferred = []     # faults on pages in flight to the pool, resolved after it
        self.agent_timeout_ms = int(config.get("UFCRAM_AGENT_TIMEOUT", float) * 1000)
        self.requests = {P.HELLO: self.hello, P.REGISTER: self.register,
                         P.UNREGISTER: self.unregister, P.DEMOTE: self.demote_range,
                         P.STATS: self.stats}

    # --- clients -------------------------------------------------------------------
    def add_client(self, conn):
        client = Client(conn)
        if client.uid != os.geteuid():
            log.warning("refused client pid %d: uid %d is not ours", client.pid, client.uid)
            conn.close()
            return
        self.clients[conn.fileno()] = client
        self.poller.register(conn.fileno(), POLLIN)

    def drop_client(self, client):
        """The client is gone or broke the protocol: release everything it held."""
        for table in client.regions.values():
            self.free_entries(table)
        self.clients.pop(client.conn.fileno(), None)
        self.poller.unregister(client.conn.fileno())
        if client.ready:
            self.by_uffd.pop(client.uffd.fd, None)
            self.poller.unregister(client.uffd.fd)
        client.close()

    def run(self):
        """Serve until the last client has gone."""
        while self.clients:
            for fd, _ in self.poller.poll():
                if fd in self.by_uffd:
                    self.drain_faults(self.by_uffd[fd])
                elif fd in self.clients:
                    self.serve_request(self.clients[fd])

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
            if fds:   # a failed HELLO: nothing of this client can be trusted
                P.close_all(fds)
                self.drop_client(client)
        except Exception:   # a bug: lose this client, never the other clients' memory
            log.exception("client pid %d: request failed unexpectedly; dropping it", client.pid)
            P.close_all(fds)
            self.drop_client(client)

    def reply(self, client, op, seq, payload):
        try:
            client.conn.send(P.encode(op, seq, payload))
        except OSError:
            self.drop_client(client)

    def hello(self, client, fds, staging_bytes, _reserved):
        client.attach(fds, staging_bytes)
        status, _ = client.agent.ping()
        if status < 0:
            raise HandlerError(f"agent ping failed: {os.strerror(-status)}")
        self.by_uffd[client.uffd.fd] = client
        self.poller.register(client.uffd.fd, POLLIN)
        return b""

    def register(self, client, fds, start, length):
        return P.COUNT.pack(client.add_region(start, length))

    def unregister(self, client, fds, rid, restore):
        table = client.region(rid)
        restored = self.restore_all(client, rid, table) if restore else 0
        self.free_entries(table)
        client.remove_region(rid)
        return P.COUNT.pack(restored)

    def demote_range(self, client, fds, rid, offset, length):
        table = client.region(rid)
        first, last = table.page_range(offset, length)
        pages = table.pages_in_state(NORMAL, first, last)
        done = sum(self.demote(client, rid, table, chunk, runs)
                   for chunk, runs in batches(pages, len(client.staging_pages), MAX_RUNS))
        return P.COUNT.pack(done)

    def stats(self, client, fds, rid):
        if rid == P.NODE:
            return P.json_payload({**self.pool.stats(), "clients": len(self.clients)})
        table = client.region(rid)
        return P.json_payload({"pages": table.npages, **table.counts(),
                               **client.counters[rid]})

    # --- faults --------------------------------------------------------------------
    def drain_faults(self, client):
        while client.ready:
            try:
                n = client.uffd.read_msgs(self.msgs)
            except UffdError as e:
                log.error("client pid %d: reading faults failed: %s", client.pid, e)
                return self.drop_client(client)
            batch = self.msgs[:n]
            faults = batch["event"] == EVENT_PAGEFAULT
            for flags, addr, tid in zip(batch["arg0"][faults].tolist(),
                                        batch["arg1"][faults].tolist(),
                                        (batch["arg2"][faults] & 0xFFFFFFFF).tolist()):
                self.fault(client, addr & ~(PAGE_SIZE - 1), flags, tid)
            if n < len(self.msgs):
                return

    def fault(self, client, addr, flags, tid):
        rid, table = client.locate(addr)
        try:
            if table is None:
                return client.uffd.wake(addr, PAGE_SIZE)   # region gone: let it retry
            page = table.page_of(addr)
            state = table.state[page]
            if state == DEMOTING:
                if tid == client.agent.tid:
                    # the agent copying a page the application dropped: its bytes are zeros
                    return client.uffd.zeropage(addr, PAGE_SIZE)
                return self.deferred.append((client, addr, flags, tid))
            if state == DEMOTED:
                return self.restore(client, rid, table, page)
            if flags & FLAG_WP:
                return client.uffd.writeprotect(addr, PAGE_SIZE, protect=False)
            self.zero_fill(client, rid, table, page, flags & FLAG_WRITE)
        except UffdRetry:
            self.deferred.append((client, addr, flags, tid))
        except UffdError as e:
            if e.errno not in (errno.ENOENT, errno.ESRCH):   # range or process gone
                log.error("client pid %d: fault at %#x: %s", client.pid, addr, e)

    def zero_fill(self, client, rid, table, page, write):
        addr = table.address_of(page)
        if write:   # a private zeroed page now spares the write its copy-on-write
            client.uffd.copy(addr, self.zeros_addr, PAGE_SIZE)
        else:
            client.uffd.zeropage(addr, PAGE_SIZE)
        table.state[page] = NORMAL
        client.counters[rid]["zero_fills"] += 1

    def restore(self, client, rid, table, page):
        handle = int(table.entry[page])
        self.pool.load(handle, out=self.bounce)
        client.uffd.copy(table.address_of(page), self.bounce_addr, PAGE_SIZE)
        self.pool.free(handle)
        table.entry[page] = NO_ENTRY
        table.state[page] = NORMAL
        client.counters[rid]["restores"] += 1

    def restore_all(self, client, rid, table):
        pages = table.pages_in_state(DEMOTED)
        for page in pages.tolist():
            self.restore(client, rid, table, page)
        return len(pages)

    def resolve_deferred(self):
        pending, self.deferred = self.deferred, []
        for client, addr, flags, tid in pending:
            if client.ready:
                self.fault(client, addr, flags, tid)

    # --- demotion ------------------------------------------------------------------
    def demote(self, client, rid, table, pages, runs):
        """Demote one batch through the agent: write-protect, copy out, drop; then store
        the copies. Pages the pool refuses go straight back: nothing is ever lost."""
        spans = np.stack((table.base + runs[:, 0] * PAGE_SIZE, runs[:, 1] * PAGE_SIZE), 1)
        table.state[pages] = DEMOTING
        client.agent.send(lib.UFC_AGENT_DEMOTE, spans)
        status, staged = self.await_agent(client)
        staging = client.staging_pages[:len(pages)]
        if status < 0:
            self.put_back(client, table, pages, np.arange(len(pages)) if staged else [])
            for addr, length in spans.tolist():
                client.uffd.writeprotect(addr, length, protect=False)
            self.resolve_deferred()
            raise UffdError(-status, f"agent could not demote: {os.strerror(-status)}")
        handles = self.pool.store_many(staging)
        stored = handles >= 0
        table.entry[pages[stored]] = handles[stored]
        table.state[pages[stored]] = DEMOTED
        refused = np.flatnonzero(~stored)
        if len(refused):
            self.put_back(client, table, pages, refused)
            client.counters[rid]["refused_full"] += len(refused)
        client.counters[rid]["demotions"] += int(stored.sum())
        self.resolve_deferred()
        return int(stored.sum())

    def put_back(self, client, table, pages, rows):
        """Reinstall staged copies (rows of the staging buffer) of pages as normal memory."""
        rows = np.asarray(rows, np.int64)
        if len(rows):
            staging_addr = address_of(client.staging)
            client.uffd.copy_many(table.base + pages[rows] * PAGE_SIZE,
                                  staging_addr + rows * PAGE_SIZE)
        table.state[pages] = NORMAL

    def await_agent(self, client):
        """The agent's reply, serving every client's faults meanwhile: the agent itself
        may fault, and the application's other threads must never wait on a demotion."""
        poller = select.poll()
        poller.register(client.agent.fileno(), POLLIN)
        for fd in self.by_uffd:
            poller.register(fd, POLLIN)
        while True:
            events = poller.poll(self.agent_timeout_ms)
            if not events:
                raise HandlerError(f"agent of pid {client.pid} did not answer in time")
            for fd, _ in events:
                if fd == client.agent.fileno():
                    return client.agent.recv()
                if fd in self.by_uffd:
                    self.drain_faults(self.by_uffd[fd])

    def free_entries(self, table):
        held = table.entry[table.entry != NO_ENTRY]
        if len(held):
            self.pool.free_many(held)
        table.entry[:] = NO_ENTRY


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ufcram.handler",
                                     description="ufcram fault handler (one per node)")
    parser.add_argument("--fd", type=int, action="append", default=[],
                        help="an inherited, connected client socket (repeatable)")
    parser.add_argument("--capacity", type=int, help="pool capacity in bytes")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="ufcram handler: %(message)s",
                        level=logging.DEBUG if config.get("UFCRAM_DEBUG") else logging.WARNING)
    # Ctrl-C meant for the application must not take its memory away: the handler
    # leaves when its last client does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    capacity = args.capacity if args.capacity is not None else config.get("UFCRAM_NODE_CAPACITY")
    handler = Handler(Pool(capacity))
    for fd in args.fd:
        handler.add_client(socket.socket(fileno=fd))
    handler.run()


if __name__ == "__main__":
    main()
