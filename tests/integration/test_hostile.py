"""Hostile and broken clients of a shared node, each built by hostile.Client: every one
gets an error reply or a closed connection, and the handler still serves the good client.
"""
import os
import socket
import threading
import time

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ufcram
from ufcram import PAGE_SIZE, Region
from ufcram import protocol as P
from ufcram._shim import lib

from .faults import read_via_kernel
from .hostile import (PLAYED, STAGING, Client, assert_refused, dir_fd, full_agent, header,
                      memfd, pipe_fd, readonly_file_fd, request, silent_agent, uffd_fd)

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
GOOD_PAGES = 64
AGENT_TIMEOUT = 1.0     # seconds the handler waits for a silent agent, kept short here


# --- the well-behaved client ------------------------------------------------------------
class Good:
    """This process's demoted region on the shared node, and what must stay true about
    it after every test: the handler alive, the region's bytes and stats unchanged, no
    pool entry or handler descriptor left behind."""

    def __init__(self, path, env):
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            self.node = ufcram.Node(capacity=64 * MiB, path=path)
        # a handler that stopped answering fails our requests instead of hanging them
        self.node.connection.sock.settimeout(10)
        self.path = path
        self.handler = psutil.Process(self.node.pid)
        self.region = Region(GOOD_PAGES * PAGE_SIZE, node=self.node, write_budget=4)
        self.view = self.region.array(np.uint8, (GOOD_PAGES, PAGE_SIZE))
        self.data = np.random.default_rng(7).integers(0, 256, self.view.shape, np.uint8)
        self.view[:] = self.data
        self.region.demote()
        self.baseline()

    def baseline(self, fds=True):
        self.stats = self.region.stats()
        self.stored = self.node.stats()["pages_stored"]
        if fds:
            self.fds = self.handler.num_fds()

    def redemote(self):
        """After a test read the region on purpose: demoted again, new baseline."""
        self.region.demote()
        self.baseline(fds=False)

    def check(self):
        """Unharmed: alive, same stats, same bytes, no entry or descriptor left over."""
        assert self.node.process.poll() is None, "the handler died"
        self.dropped()
        assert self.region.stats() == self.stats
        assert self.node.stats()["pages_stored"] == self.stored
        assert np.array_equal(self.view, self.data)
        self.redemote()

    def dropped(self):
        """Wait until the handler has let every hostile client go."""
        wait_until(lambda: self.handler.num_fds() == self.fds,
                   lambda: f"handler fds {self.handler.num_fds()} != {self.fds}")

    def let_go(self, client):
        """The client leaves; its uffd and memory go once the handler has dropped it."""
        client.leave()
        self.dropped()
        client.release()

    def close(self):
        del self.view
        try:
            self.region.close()
        finally:
            self.node.close()   # kills a handler that does not leave by itself


def wait_until(condition, describe, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, describe()
        time.sleep(0.01)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    g = Good(tmp_path_factory.mktemp("hostile") / "n.sock",
             {"UFCRAM_AGENT_TIMEOUT": str(AGENT_TIMEOUT),
              # the fuzzer registers huge ranges: the handler's page tables stay small
              "UFCRAM_MAX_CLIENT_BYTES": str(1 << 30)})
    yield g
    g.close()


@pytest.fixture(autouse=True)
def unharmed(request):
    yield
    if "good" in request.fixturenames:
        request.getfixturevalue("good").check()


def fresh_client_works(path):
    """A new client joins the node and round-trips its bytes."""
    with ufcram.Node.connect(path) as node:
        r = Region(16 * PAGE_SIZE, node=node)
        a = r.array()
        data = np.random.default_rng(3).integers(0, 256, r.nbytes, np.uint8)
        a[:] = data
        assert r.demote() == 16
        assert np.array_equal(a, data)
        del a
        r.close()


# --- frames -----------------------------------------------------------------------------
MALFORMED = {
    "one byte": b"U",
    "truncated header": P.encode(P.STATS, 1)[:10],
    "bad magic": header(P.STATS, 1, 4, magic=b"XXXX") + bytes(4),
    "bad version": header(P.STATS, 1, 4, version=2) + bytes(4),
    "length says more": header(P.STATS, 1, 40) + bytes(4),
    "length says less": header(P.STATS, 1, 0) + bytes(4),
    "unknown op 0": P.encode(0, 1, bytes(8)),
    "unknown op 7": P.encode(7, 1),
    "unknown op 65535": P.encode(65535, 1, bytes(32)),
    "a reply op OK": P.encode(P.OK, 1),
    "a reply op ERROR": P.encode(P.ERROR, 1, P.error_payload(1, "x")),
    "oversized": P.encode(P.STATS, 1, bytes(P.MAX_FRAME)),
    "far oversized": bytes(200_000),   # about the most a SEQPACKET send takes
    "empty": b"",
    **{f"op {op} payload short": P.encode(op, 1, bytes(size.size - 1))
       for op, size in P.PAYLOADS.items() if size.size},
    **{f"op {op} payload long": P.encode(op, 1, bytes(size.size + 3))
       for op, size in P.PAYLOADS.items()},
    **{f"op {op} before HELLO": P.encode(op, 1, bytes(size.size))
       for op, size in P.PAYLOADS.items()},
}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frame_is_refused(good, frame):
    with Client(good.path) as client:
        assert_refused(client.exchange(frame))
        # if the handler kept the connection, it is still in step with us (STATS of
        # the NODE is answered before HELLO: `ufcram stat` observes that way)
        if client.send(request(P.STATS, P.NODE, seq=9)):
            reply = client.receive()
            assert reply is None or P.decode(reply)[:2] == (P.OK, 9)


# --- HELLO ------------------------------------------------------------------------------
WRONG_DESCRIPTORS = {   # knobs of a HELLO whose agent never answers (the last one's case)
    "no descriptors": dict(fd_count=0),
    "pipe as uffd": dict(uffd=pipe_fd),
    "pipe as agent": dict(agent=pipe_fd),
    "uffd as agent": dict(agent=uffd_fd),
    "pipe as staging": dict(staging=pipe_fd),
    "directory as staging": dict(staging=dir_fd),
    "read-only file as staging": dict(staging=readonly_file_fd),
    "staging too small": dict(staging=lambda: memfd(PAGE_SIZE)),
    "two descriptors": dict(fd_count=2),
    "four descriptors": dict(extra=[pipe_fd]),
    "five descriptors": dict(extra=[pipe_fd, pipe_fd]),
    "agent queue full": dict(agent=full_agent),
    "agent never answers": dict(),
}


@pytest.mark.parametrize("knobs", WRONG_DESCRIPTORS.values(), ids=WRONG_DESCRIPTORS.keys())
def test_hello_with_wrong_descriptors_is_refused(good, knobs):
    with Client(good.path) as client:
        assert_refused(client.hello(**{"agent": silent_agent, **knobs}))
        # a failed HELLO leaves no half-made client behind that could act (STATS of
        # the NODE is answered before HELLO anyway: ask for what a client may do)
        assert_refused(client.exchange(request(P.REGISTER, 1 << 30, PAGE_SIZE,
                                               P.NO_LIMIT, 0)))


@pytest.mark.parametrize("staging_bytes", [0, 100, STAGING + PAGE_SIZE, (1 << 64) - PAGE_SIZE])
def test_hello_with_a_bad_staging_size_is_refused(good, staging_bytes):
    with Client(good.path) as client:
        assert_refused(client.hello(agent=silent_agent, staging_bytes=staging_bytes))


def test_descriptors_on_other_ops_are_refused(good):
    for op, layout in P.PAYLOADS.items():
        if op == P.HELLO:
            continue
        fd = pipe_fd()
        with Client(good.path) as client:
            assert_refused(client.exchange(P.encode(op, 1, bytes(layout.size)), [fd]))
        os.close(fd)


def test_silent_agent_does_not_stall_other_clients_faults(good):
    """While the handler waits on a HELLO's silent agent, it still serves our faults
    (read through the kernel, so that this thread waits without the GIL)."""
    with Client(good.path) as client:
        assert client.hello(agent=silent_agent, wait=False)
        time.sleep(AGENT_TIMEOUT / 4)   # the handler is waiting on the agent now
        got = []
        reader = threading.Thread(target=lambda: got.append(
            read_via_kernel(good.region.address, good.region.nbytes)), daemon=True)
        reader.start()
        reader.join(AGENT_TIMEOUT / 2)
        assert got == [good.data.tobytes()], "our faults waited on another client's agent"
        assert_refused(client.receive())
        good.redemote()


def test_second_hello_is_refused(good):
    client = Client.ready(good.path)
    assert client.call(P.HELLO, STAGING, 0)[0] == P.ERROR         # no descriptors
    assert_refused(client.hello(agent=silent_agent, uffd=uffd_fd))
    good.let_go(client)


# --- floods and clients that leave --------------------------------------------------------
def test_flood_without_reading_replies_does_not_stall_the_handler(good):
    """The replies fill our queue; the handler must let us go, not wait on us."""
    with Client(good.path) as client:
        assert client.flood(request(P.STATS, P.NODE)), "the handler waited on a flooder"
    start = time.monotonic()
    good.node.stats()
    assert time.monotonic() - start < 1.0


def test_clients_that_leave_mid_request(good):
    for i in range(100):   # a request, and gone before the reply
        with Client(good.path) as client:
            client.send(request(P.STATS, P.NODE, seq=i))
    for _ in range(20):    # a complete HELLO, and gone before the reply
        with Client(good.path) as client:
            client.hello(wait=False)


def test_agent_that_leaves_mid_demotion(good):
    """The handler waits on our agent's reply to a demotion; the agent, then the
    client, goes away. Its entries and descriptors must all be released."""
    client = Client.ready(good.path, agent=PLAYED)
    rid = client.own_memory(8)
    assert client.ask(P.DEMOTE, rid, 0, 8 * PAGE_SIZE)
    client.agent.recv(4096)   # the demotion command arrives; we drop the agent instead
    client.drop_agent()
    assert_refused(client.receive())
    good.let_go(client)


def test_client_that_leaves_while_its_agent_works(good):
    client = Client.ready(good.path, agent=PLAYED)
    rid = client.own_memory(8)
    assert client.ask(P.DEMOTE, rid, 0, 8 * PAGE_SIZE)
    client.sock.close()                                        # gone before the reply...
    assert client.answer_agent() in (lib.UFC_AGENT_MOVE, lib.UFC_AGENT_DEMOTE)   # ...it answers
    good.let_go(client)


# --- ready clients that ask for too much ----------------------------------------------------
def test_real_client_cannot_reach_the_good_clients_pages(good):
    """Our own second client registers the good region's very addresses (they are not
    in its uffd): demoting or unregistering them does nothing to the good region."""
    client = Client.ready(good.path)
    op, body = client.call(P.REGISTER, good.region.address, good.region.nbytes, P.NO_LIMIT, 0)
    assert op == P.OK
    rid = P.COUNT.unpack(body)[0]
    assert client.call(P.DEMOTE, rid, 0, good.region.nbytes) == (P.OK, P.COUNT.pack(0))
    assert client.call(P.UNREGISTER, rid, 1)[0] == P.OK
    assert client.call(P.STATS, good.region.id)[0] == P.ERROR
    good.let_go(client)


def test_huge_regions_are_refused_not_fatal(good):
    client = Client.ready(good.path)
    for length in (1 << 63, (1 << 64) - PAGE_SIZE, 1 << 40):
        op, body = client.call(P.REGISTER, 1 << 52, length, P.NO_LIMIT, 0)
        assert op == P.ERROR and b"UFCRAM_MAX_CLIENT_BYTES" in body
    good.let_go(client)


def test_out_of_descriptors_handler_keeps_serving(good):
    """EMFILE on accept used to end the handler, and every client's memory with it."""
    limits = good.handler.rlimit(psutil.RLIMIT_NOFILE)
    good.handler.rlimit(psutil.RLIMIT_NOFILE, (good.fds + 8, limits[1]))
    socks = []
    try:
        for _ in range(64):   # past the limit, then past the listen backlog
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.setblocking(False)
            socks.append(sock)
            try:
                sock.connect(os.fspath(good.path))
            except BlockingIOError:
                break
        time.sleep(0.2)
        assert good.node.process.poll() is None, "the handler died"
        assert np.array_equal(good.view, good.data)   # faults still served
        good.redemote()                               # and requests
    finally:
        for sock in socks:
            sock.close()
        good.handler.rlimit(psutil.RLIMIT_NOFILE, limits)
    good.dropped()
    fresh_client_works(good.path)


# --- fuzzing ------------------------------------------------------------------------------
OPS = st.sampled_from([0, *P.PAYLOADS, P.OK, P.ERROR, 7, 99, 255, 65535])
SEQS = st.integers(0, (1 << 32) - 1)
FRAMES = st.one_of(
    st.binary(max_size=96),                                         # noise
    st.builds(lambda m, v, op, seq, n, tail: header(op, seq, n, m, v) + tail,
              st.sampled_from([P.MAGIC, b"UFCr", b"\0" * 4]), st.sampled_from([1, 0, 2, 65535]),
              OPS, SEQS, st.integers(0, (1 << 32) - 1), st.binary(max_size=48)),  # lying headers
    st.builds(lambda op, seq, body: P.encode(op, seq, body), OPS, SEQS,
              st.binary(max_size=64)),                              # valid header, any body
    st.sampled_from(list(P.PAYLOADS)).flatmap(lambda op: st.builds(
        lambda seq, body: P.encode(op, seq, body), SEQS,
        st.binary(min_size=P.PAYLOADS[op].size, max_size=P.PAYLOADS[op].size))),  # right size
    st.just(bytes(P.MAX_FRAME + 1)),
)


def test_fuzzed_frames_never_harm_the_handler_or_another_client(good):
    clients = [Client(good.path) for _ in range(4)]   # they never say HELLO
    sent = []

    @settings(max_examples=2500, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(clients) - 1), st.lists(FRAMES, min_size=1, max_size=12))
    def fuzz(i, frames):
        n, kept = clients[i].burst(frames)
        sent.append(n)
        if not kept:   # one the handler dropped is replaced, so that all four keep on
            clients[i].leave()
            clients[i] = Client(good.path)

    fuzz()
    for client in clients:
        client.leave()
    assert sum(sent) > 5000
    fresh_client_works(good.path)


ADDRESSES = st.one_of(st.integers(0, 1 << 48).map(lambda a: a & ~(PAGE_SIZE - 1)),
                      st.integers(0, (1 << 64) - 1))
LENGTHS = st.one_of(st.integers(0, 64).map(lambda n: n * PAGE_SIZE),
                    st.sampled_from([1, PAGE_SIZE - 1, 1 << 30, 1 << 40, 1 << 63,
                                     (1 << 64) - PAGE_SIZE]))
RIDS = st.one_of(st.integers(0, 8), st.sampled_from([P.NODE, (1 << 32) - 2]))


def requests_of(client, good_region):
    """Requests of a ready client: REGISTER (anywhere, the good region's addresses and
    its own included), DEMOTE, UNREGISTER and STATS; never SET_CAPACITY, which a
    shared node grants every client by design."""
    spots = st.one_of(ADDRESSES, st.sampled_from([good_region.address, client.addr]))
    return st.one_of(
        st.tuples(st.just(P.REGISTER), spots, LENGTHS,
                  st.sampled_from([P.NO_LIMIT, 0, PAGE_SIZE]),
                  st.sampled_from([P.AUTO_BUDGET, 0, 3, -7, 1 << 62])),
        st.tuples(st.just(P.DEMOTE), RIDS, LENGTHS, LENGTHS),
        st.tuples(st.just(P.UNREGISTER), RIDS, st.integers(0, 255)),
        st.tuples(st.just(P.STATS), RIDS))


def test_fuzzed_requests_of_a_real_client_never_reach_another_client(good):
    client = Client.ready(good.path)
    client.own_memory(16, seed=5)

    @settings(max_examples=1500, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(requests_of(client, good.region), min_size=1, max_size=6))
    def fuzz(calls):
        for op, *fields in calls:
            client.call(op, *fields)

    fuzz()
    good.let_go(client)
    fresh_client_works(good.path)


# --- per-client limits -------------------------------------------------------------------
@pytest.fixture()
def limited(monkeypatch, tmp_path):
    """A node that allows each client 3 regions and 16 pages; and its path."""
    monkeypatch.setenv("UFCRAM_MAX_REGIONS", "3")
    monkeypatch.setenv("UFCRAM_MAX_CLIENT_BYTES", str(16 * PAGE_SIZE))
    with ufcram.Node(capacity=16 * MiB, path=tmp_path / "n.sock") as node:
        yield node, tmp_path / "n.sock"


def test_region_count_limit_is_clear(limited):
    limited_node, path = limited
    regions = [Region(PAGE_SIZE, node=limited_node) for _ in range(3)]
    with pytest.raises(ufcram.HandlerError, match="UFCRAM_MAX_REGIONS=3"):
        Region(PAGE_SIZE, node=limited_node)
    regions.pop().close()
    regions.append(Region(PAGE_SIZE, node=limited_node))   # room again
    with ufcram.Node.connect(path) as other:
        others = [Region(PAGE_SIZE, node=other) for _ in range(3)]   # a quota of its own
        for r in others:
            r.close()
    for r in regions:
        r.close()


def test_registered_bytes_limit_is_clear(limited):
    limited_node, _ = limited
    big = Region(12 * PAGE_SIZE, node=limited_node)
    with pytest.raises(ufcram.HandlerError, match="UFCRAM_MAX_CLIENT_BYTES=65536"):
        Region(5 * PAGE_SIZE, node=limited_node)
    small = Region(4 * PAGE_SIZE, node=limited_node)   # exactly at the limit
    a = small.array()
    a[:] = 9
    small.demote()
    assert (a == 9).all()                               # the refusal broke nothing
    del a
    small.close()
    big.close()


def test_absurd_region_without_a_byte_limit_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("UFCRAM_MAX_CLIENT_BYTES", "0")   # no quota: the handler's own check
    with ufcram.Node(capacity=16 * MiB, path=tmp_path / "n.sock") as node:
        with pytest.raises(ufcram.HandlerError, match="no memory in the handler"):
            node.connection.count(P.REGISTER, 1 << 52, 1 << 62, P.NO_LIMIT, 0)
        with Region(PAGE_SIZE, node=node) as r:      # the client was not dropped
            assert r.stats()["pages"] == 1


def test_the_default_quota_refuses_an_absurd_region(tmp_path, monkeypatch):
    monkeypatch.delenv("UFCRAM_MAX_CLIENT_BYTES", raising=False)
    with ufcram.Node(capacity=16 * MiB, path=tmp_path / "n.sock") as node:
        with pytest.raises(ufcram.HandlerError, match="UFCRAM_MAX_CLIENT_BYTES"):
            node.connection.count(P.REGISTER, 1 << 52, 1 << 62, P.NO_LIMIT, 0)
