"""The handler's answers to requests on a client's socket (HELLO, REGISTER, LIMITS,
STATS, ...) and the node's statistics: a part of the Handler class (loop.py).
"""
import errno
import logging
import os
import socket
import types

import numpy as np

from . import coverage
from ufcram import protocol as P
from ufcram._shim import lib
from ufcram.errors import HandlerError, ProtocolError, UfcramError
from ufcram.store.pagetable import DEMOTED, NO_ENTRY
from .jobs import AgentReply
from .policy import ResidentLimit, exposed_pages
from ufcram.app.uffd import WANTED

log = logging.getLogger("ufcram.handler")
DEPARTED = ("clients", "faults", "demotions", "clean_redemotions", "restores", "promotions",
            "zero_fills")

class Requests:
    """The part of the Handler (loop.py) that answers requests."""

    def serve_request(self, client):
        try:
            frame, fds = P.recv_frame(client.conn, with_fds=True)
        except (ProtocolError, OSError) as e:
            # a process that exits with a request unanswered resets its socket: that is
            # how programs under `ufcram run` leave, not a fault worth a warning
            level = logging.DEBUG if isinstance(e, ConnectionResetError) else logging.WARNING
            log.log(level, "client pid %d: %s; dropping it", client.pid, e)
            return self.drop_client(client)
        if not frame:
            P.close_all(fds)
            return self.drop_client(client)
        seq = op = 0
        # attach() takes the descriptors out of fds once it owns them, so remember
        # whether this was a HELLO with descriptors: a failed one must drop the client
        took_fds = bool(fds)
        reply = error = None
        try:
            op, seq, payload = P.decode(frame)
            if fds and op != P.HELLO:
                raise ProtocolError(f"op {op} carries descriptors")
            if op != P.HELLO and not client.ready and not self.observes(op, payload):
                raise ProtocolError(f"op {op} before HELLO")
            handler = self.requests.get(op)
            if handler is None:
                raise ProtocolError(f"unknown request op {op}")
            reply = handler(client, fds, *P.unpack_request(op, payload))
        except Exception as e:
            error = e
        if isinstance(reply, types.GeneratorType):   # it waits on the agent: a job
            self.start(reply, lambda result, error: self.answer(client, op, seq, fds,
                                                                took_fds, result, error))
        else:
            self.answer(client, op, seq, fds, took_fds, reply, error)

    def answer(self, client, op, seq, fds, took_fds, reply, error):
        if error is None:
            return self.reply(client, P.OK, seq, reply)
        # A bug of ours fails the request, not the client: it gets an error reply and
        # its memory is served on. (Dropping it would turn its demoted pages into
        # SIGBUS for a failure that was ours.)
        if not isinstance(error, (UfcramError, OSError)):
            self.repeats.warn(client, f"request op {op} failed unexpectedly: {error!r}",
                              exc_info=error)
        code = error.errno if isinstance(error, OSError) and error.errno else errno.EINVAL
        self.reply(client, P.ERROR, seq, P.error_payload(code, str(error) or repr(error)))
        if took_fds:   # a failed HELLO: nothing of this client can be trusted
            P.close_all(fds)
            self.drop_client(client)

    def reply(self, client, op, seq, payload):
        try:
            # Never block: a client that sends requests without reading the replies
            # would otherwise stall the handler, and every other client's faults.
            client.conn.send(P.encode(op, seq, payload), socket.MSG_DONTWAIT)
        except OSError:
            self.drop_client(client)

    def hello(self, client, fds, staging_bytes, flags):
        client.attach(fds, staging_bytes, WANTED)
        client.covers_mappings = bool(flags & P.HELLO_COVERS)
        # not agent.ping(): its blocking recv let an agent socket that never answers
        # stall the handler for good; a job's wait times out and serves faults meanwhile
        client.agent.send(lib.UFC_AGENT_PING)
        status, _, _ = yield AgentReply(client)
        if status < 0:
            raise HandlerError(f"agent ping failed: {os.strerror(-status)}")
        self.watch_uffd(client)
        return b""

    def register(self, client, fds, start, length, resident_limit, write_budget):
        limit = None if resident_limit == P.NO_LIMIT else resident_limit
        budget = "auto" if write_budget == P.AUTO_BUDGET else write_budget
        return P.COUNT.pack(coverage.add_region(self, client, start, length, limit, budget))

    def unregister(self, client, fds, rid, restore):
        region = client.region(rid)
        restored = self.pager.promote_region(client, region) if restore else 0
        self.pager.release(region.table, np.flatnonzero(region.table.entry != NO_ENTRY))
        client.remove_region(rid)
        return P.COUNT.pack(restored)

    def ping(self, client, fds):
        return b""

    def limits(self, client, fds, resident_limit, group):
        """A resident limit over all the regions of the client's group (0: the client
        alone): what `ufcram run` sets for a process tree, each process of which joins
        with the same group."""
        client.limit = ResidentLimit(None if resident_limit == P.NO_LIMIT else resident_limit)
        client.group = group or None
        return b""

    def demote_range(self, client, fds, rid, offset, length):
        region = client.region(rid)
        first, last = region.table.page_range(offset, length)
        present = first + np.flatnonzero(region.table.present(first, last))
        try:
            return P.COUNT.pack((yield from self.pager.demote(client, region, present)))
        finally:
            client.release_staging()   # asked to free memory: all of it

    def set_capacity(self, client, fds, capacity):
        self.pool.capacity = capacity
        self.overflow.update(self.pool.mem_used_total, capacity)
        self.pager.demote_excess_writable()
        return b""

    def stats(self, client, fds, rid):
        if rid not in (P.NODE, P.NODE_SUMMARY):
            return P.json_payload(client.region(rid).stats())
        pool = self.pool.stats()
        summary = {
            **pool, "clients": sum(c.ready for c in self.clients.values()),   # not observers
            "node_closed": self.overflow.closed, "overflow_events": self.overflow.events,
            "exposed_pages": exposed_pages(self.pool.capacity, pool["pages_stored"],
                                           pool["compr_data_size"]),
            "writable_pages": self.pager.writable_total(),
            "auto_budget_writable_pages": self.pager.auto_writable.pages,
            "demoted_pages": sum(int(r.table.tally[DEMOTED]) for c in self.by_uffd.values()
                                 for r in c.regions.values()),
            "departed": self.departed}
        if rid == P.NODE_SUMMARY:
            return P.json_payload(summary)
        return self.node_stats_payload(summary)

    def client_stats(self, client):
        tallies = [r.stats() for r in client.regions.values()]
        budgets = [t["write_budget"] for t in tallies]
        counters = client.counters()
        return {"pid": client.pid, "name": self.process_name(client.pid),
                "forked": client.parent is not None, "regions": len(tallies),
                **{k: sum(t[k] for t in tallies) for k in
                   ("pages", "resident", "normal", "readonly", "writable", "demoted")},
                **{k: counters[k] for k in DEPARTED if k != "clients"},
                **self.held_entries(client),
                "write_budget": "auto" if "auto" in budgets else sum(budgets)}

    # --- node statistics (STATS of the NODE) ------------------------------------------
    @staticmethod
    def observes(op, payload):
        """STATS of the NODE (or its summary) is allowed before HELLO: `ufcram stat`
        observes a node without becoming a memory client (no uffd, agent or regions)."""
        return op == P.STATS and payload in (P.pack_request(P.STATS, P.NODE),
                                             P.pack_request(P.STATS, P.NODE_SUMMARY))

    def node_stats_payload(self, summary, most=200):
        """The NODE reply: summary and the largest clients (resident + demoted), at most
        `most` and as many as fit one frame; the rest are counted in clients_omitted."""
        ranked = sorted(self.by_uffd.values(), key=self.footprint, reverse=True)
        listed = [self.client_stats(c) for c in ranked[:most]]
        room = P.MAX_FRAME - P.HEADER.size
        while True:
            payload = P.json_payload({**summary, "per_client": listed,
                                      "clients_omitted": len(ranked) - len(listed)})
            if len(payload) <= room or not listed:
                return payload
            # entries are about the same size: cut in proportion, at least one
            listed = listed[:min(len(listed) * room // len(payload), len(listed) - 1)]

    @staticmethod
    def footprint(client):
        """Pages resident or demoted: how much memory the client stands for."""
        return sum(r.table.resident + int(r.table.tally[DEMOTED])
                   for r in client.regions.values())

    def held_entries(self, client):
        """The pool entries the client's regions refer to: how many, how many same-filled,
        their compressed bytes. A forked child shares its parent's entries: both count
        them. The sizes come from the pool's per-entry array (-1 free, 0 same-filled)."""
        held = [r.table.entry[r.table.entry != NO_ENTRY] for r in client.regions.values()]
        sizes = self.pool.sizes(np.concatenate(held) if held else np.empty(0, np.int64))
        return {"stored_pages": len(sizes), "same_pages": int(np.count_nonzero(sizes == 0)),
                "compr_bytes": int(sizes[sizes > 0].sum(dtype=np.int64))}

    @staticmethod
    def process_name(pid):
        """The client's command name (/proc/PID/comm); "?" once it has gone, and for a
        forked child, whose pid the handler never learns."""
        try:
            with open(f"/proc/{pid}/comm", errors="replace") as f:
                return f.read().rstrip("\n") or "?"
        except OSError:
            return "?"
