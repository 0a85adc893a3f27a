"""Jobs (handler/jobs.py): the loop advances work that waits on an agent or on events,
one job at a time; a job's waits end in its agent's reply or an error thrown into it,
and the faults it held back are retried at each wait and at its end. No userfaultfd:
the agents are socket pairs and the uffds stand-ins.
"""
import socket
import types

import pytest

from ufcram._shim import lib
from ufcram.errors import HandlerError
from ufcram.handler.agent import REPLY, AgentLink
from ufcram.handler.client import Client
from ufcram.handler.jobs import AgentReply, EventsRead
from ufcram.handler.loop import Handler
from ufcram.store.pool import Pool

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def handler():
    return Handler(Pool(1 << 20))


@pytest.fixture
def agent():
    """A client with an agent (ours, theirs); its uffd never readable."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    quiet, other = socket.socketpair()
    client = Client(None, uffd=types.SimpleNamespace(fd=quiet.fileno(), close=lambda: None))
    client.agent = AgentLink(ours)
    yield client, theirs
    for s in (ours, theirs, quiet, other):
        s.close()


def run(handler, steps):
    """Start a job and let the loop advance it to its end; (result, error)."""
    results = []
    handler.start(steps, lambda result, error: results.append((result, error)))
    while handler.job is not None:
        handler.wait_on_job()
    return results[0]


def answer(client, theirs, status=0, nbytes=0):
    theirs.send(REPLY.pack(lib.UFC_AGENT_MAGIC, client.agent.seq, status, 7, nbytes))


def test_a_job_gets_each_reply_of_its_agent_in_turn(handler, agent):
    client, theirs = agent
    def two_commands():
        replies = []
        for nbytes in (4096, 8192):
            client.agent.send(lib.UFC_AGENT_PING)
            answer(client, theirs, nbytes=nbytes)
            replies.append((yield AgentReply(client)))
        return replies
    assert run(handler, two_commands()) == ([(0, 4096, None), (0, 8192, None)], None)
    assert client.agent.tid == 7


def test_an_agent_that_never_answers_fails_the_job_in_time_not_the_loop(handler, agent):
    client, _ = agent
    handler.agent_timeout_ms = 50
    cleaned = []
    def waits_for_ever():
        client.agent.send(lib.UFC_AGENT_PING)
        try:
            yield AgentReply(client)
        finally:
            cleaned.append(True)   # e.g. command_agent's agent_drops
    result, error = run(handler, waits_for_ever())
    assert result is None and isinstance(error, HandlerError) and "in time" in str(error)
    assert cleaned == [True]


@pytest.mark.parametrize("unread", [False, True])
def test_an_agent_gone_mid_wait_fails_the_job_not_the_loop(handler, agent, unread):
    """Its process exited: a hang-up, or a reset if our command was still unread."""
    client, theirs = agent
    def waits():
        client.agent.send(lib.UFC_AGENT_PING)
        if not unread:
            theirs.recv(4096)
        theirs.close()
        yield AgentReply(client)
    result, error = run(handler, waits())
    assert isinstance(error, ConnectionResetError if unread else HandlerError)


def test_events_are_read_at_once_and_the_job_goes_on(handler, agent, monkeypatch):
    client, _ = agent
    drained = []
    monkeypatch.setattr(handler, "drain_uffd", lambda c, spin=False: drained.append(c))
    def retries_twice():
        for _ in range(2):
            yield EventsRead(client)
        return "through"
    handler.start(retries_twice())   # no wait on an agent: it ends within start
    assert handler.job is None and drained == [client, client]


def test_the_faults_held_back_are_retried_at_each_wait_and_at_the_end(handler, agent,
                                                                        monkeypatch):
    client, theirs = agent
    retried = []
    monkeypatch.setattr(handler, "resolve_deferred", lambda: retried.append(True))
    def one_command():
        client.agent.send(lib.UFC_AGENT_PING)
        answer(client, theirs)
        yield AgentReply(client)
        assert len(retried) == 1   # at the wait
    assert run(handler, one_command()) == (None, None)
    assert len(retried) == 2       # and at the end


def test_one_job_at_a_time(handler, agent):
    client, _ = agent
    def waits():
        client.agent.send(lib.UFC_AGENT_PING)
        yield AgentReply(client)
    handler.start(waits())
    with pytest.raises(AssertionError):
        handler.start(waits())
