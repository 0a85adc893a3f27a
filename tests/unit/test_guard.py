"""The handler never drops a client for a bug of its own: a request that fails gets an
error reply, a fault whose serving raised is retried, an event that raised is skipped,
and nothing raised while serving one client unwinds another's demotion in flight. An
error that repeats is logged once, then counted. No kernel needed: the bugs are put in
by hand, the uffd and the agent are stand-ins."""
import errno
import logging
import socket
import types

import numpy as np
import pytest

from ufcram.handler import events
from ufcram import protocol as P
from ufcram._shim import lib
from ufcram.handler.agent import REPLY, AgentLink
from ufcram.handler.client import Client
from ufcram.handler.guard import Repeats
from ufcram.handler.jobs import AgentReply
from ufcram.handler.loop import Handler
from ufcram.store.pagetable import PAGE_SIZE
from ufcram.store.pool import Pool
from ufcram.app.uffd import EVENT_PAGEFAULT, EVENT_REMOVE, MSG_DTYPE

pytestmark = pytest.mark.timeout(10)
BASE = 1 << 30


class Bug(Exception):
    """What a bug of the handler raises."""


def boom(*args):
    raise Bug("a bug of ours")


@pytest.fixture
def handler():
    return Handler(Pool(1 << 20))


def ready_client(handler, conn=None, uffd_fd=-1):
    """A client past HELLO with one 16-page region; its uffd a stand-in."""
    client = Client(conn, uffd=types.SimpleNamespace(fd=uffd_fd, close=lambda: None,
                                                         wake=lambda *args: None))
    client.add_region(BASE, 16 * PAGE_SIZE)
    if conn is not None:
        handler.clients[conn.fileno()] = client
    handler.by_uffd[uffd_fd] = client
    return client


def test_repeats_logs_once_then_at_powers_of_two_and_the_total_at_the_end(caplog):
    repeats = Repeats(logging.getLogger("test"))
    a_client = Client(None)
    a_client.pid = 7
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            repeats.warn(a_client, "agent could not demote: Invalid argument")
        repeats.warn(None, "agent could not demote: Invalid argument")   # the node's own
        repeats.forget(a_client)
    assert [r.getMessage() for r in caplog.records] == [
        "client pid 7: agent could not demote: Invalid argument",
        "client pid 7: agent could not demote: Invalid argument (2 times so far)",
        "client pid 7: agent could not demote: Invalid argument (4 times so far)",
        "node: agent could not demote: Invalid argument",
        "client pid 7: agent could not demote: Invalid argument (5 times in all)"]
    assert repeats.warn(a_client, "agent could not demote: Invalid argument") == 1


def test_failed_request_gets_an_error_reply_and_the_client_stays(handler, monkeypatch):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client = ready_client(handler, conn=theirs)
    monkeypatch.setitem(handler.requests, P.PING, boom)
    for seq in (1, 2):   # twice: the second failure is counted, not logged again
        ours.send(P.encode(P.PING, seq))
        handler.serve_request(client)
        op, got, payload = P.decode(ours.recv(P.MAX_FRAME))
        assert (op, got) == (P.ERROR, seq)
        code, message = P.parse_error(payload)
        assert code == errno.EINVAL and "a bug of ours" in message
    assert handler.clients[theirs.fileno()] is client and client.conn is theirs
    monkeypatch.setitem(handler.requests, P.PING, Handler.ping.__get__(handler))
    ours.send(P.encode(P.PING, 3))
    handler.serve_request(client)
    assert P.decode(ours.recv(P.MAX_FRAME))[:2] == (P.OK, 3)
    assert handler.repeats.seen[client, "request op %d failed unexpectedly: "
                                "Bug('a bug of ours')" % P.PING] == 2
    ours.close()


def fault_msgs(*faults):
    """uffd messages: (event, arg0, arg1, arg2) each."""
    msgs = np.zeros(len(faults), MSG_DTYPE)
    for i, (event, a0, a1, a2) in enumerate(faults):
        msgs["event"][i], msgs["arg0"][i], msgs["arg1"][i], msgs["arg2"][i] = event, a0, a1, a2
    return msgs


def fields(msgs):
    return msgs[["event", "arg0", "arg1", "arg2"]].tolist()


def test_fault_whose_serving_raised_is_retried_until_it_is_served(handler, monkeypatch):
    client = ready_client(handler)
    calls = []

    def serve_on_third_try(client, msgs, cover=True):
        calls.append(msgs["arg1"].tolist())
        if len(calls) < 3:
            raise Bug("a bug that passes")
        return 0, ()
    monkeypatch.setattr(handler.engine, "serve_msgs", serve_on_third_try)
    fault = fault_msgs((EVENT_PAGEFAULT, 0, BASE + 3 * PAGE_SIZE, 11))
    handler.serve_given(client, fault)
    assert [(c is client, fields(m)) for c, m in handler.deferred] == [(True, fields(fault))]
    handler.resolve_deferred()
    assert len(handler.deferred) == 1
    handler.resolve_deferred()
    assert handler.deferred == [] and calls == [[BASE + 3 * PAGE_SIZE]] * 3


def test_a_bug_serving_one_client_never_unwinds_anothers_demotion(handler, monkeypatch):
    """Client A's job awaits its agent's reply (a demotion in flight); meanwhile client
    B's fault and event both raise. The job still gets A's reply, and B's fault waits to
    be retried."""
    a_agent, a_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b_read, b_write = socket.socketpair()   # B's "uffd": readable once B has a message
    a_uffd, a_quiet = socket.socketpair()   # A's: never readable here
    a = ready_client(handler, uffd_fd=a_uffd.fileno())
    a.agent = AgentLink(a_agent)
    b = ready_client(handler, uffd_fd=b_read.fileno())
    b_write.send(b"!")
    monkeypatch.setattr(handler.engine, "serve_msgs", boom)
    monkeypatch.setattr(events, "dispatch", boom)
    msgs = fault_msgs((EVENT_PAGEFAULT, 0, BASE, 5), (EVENT_REMOVE, BASE, BASE + PAGE_SIZE, 0))

    reads = []

    def read_faults(client, spin):
        assert client is b
        reads.append(b_read.recv(1) if not reads else b"")
        if reads[-1] != b"!":
            return 0, (), True   # the queue is empty now
        # as the engine leaves them: the fault after the free its read holds
        handler.msgs[:2] = msgs
        handler.engine.why[:2] = [lib.UFC_LEFT_AFTER_EVENTS, lib.UFC_LEFT_EVENT]
        # A's agent answers while B is served: the next poll finds the reply
        a_theirs.send(REPLY.pack(lib.UFC_AGENT_MAGIC, a.agent.seq, 0, 99, 4096))
        return 2, (), False
    monkeypatch.setattr(handler, "read_faults", read_faults)
    results = []

    def demotion():   # its wait, as command_agent's
        return (yield AgentReply(a))
    handler.start(demotion(), lambda result, error: results.append((result, error)))
    while handler.job is not None:
        handler.wait_on_job()
    assert results == [((0, 4096, None), None)]
    assert [(c is b, fields(m)) for c, m in handler.deferred] == [(True, fields(msgs[:1]))]
    assert np.count_nonzero(b.regions[1].table.state) == 0   # the REMOVE was skipped
    assert set(handler.by_uffd.values()) == {a, b}
    for s in (a_agent, a_theirs, a_uffd, a_quiet, b_read, b_write):
        s.close()
