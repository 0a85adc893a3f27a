"""Clients of a shared node for the hostile tests, built one way: a Client is well-formed
by default (its HELLO as Connection and the preload library send it); knobs make it hostile.
"""
import mmap
import os
import socket
import time

import numpy as np

from ufcram import PAGE_SIZE
from ufcram import protocol as P
from ufcram._shim import lib
from ufcram.app.uffd import Uffd, address_of
from ufcram.handler.agent import CMD, REPLY, STAYED

from .faults import write_via_kernel

STAGING = 16 * PAGE_SIZE
NATIVE = "native"   # agent: the native agent thread, started as Connection starts it
PLAYED = "played"   # agent: this process answers the handler on Client.agent itself
_KEEP = []          # staging maps our agent threads may still write into; silent peers


# --- frames: built by the protocol's own structs, lying only where told to --------------
def request(op, *fields, seq=1):
    return P.encode(op, seq, P.pack_request(op, *fields))


def header(op, seq, length, magic=P.MAGIC, version=P.VERSION):
    """A header that may lie about the payload's length, its magic or its version."""
    return P.HEADER.pack(magic, version, op, seq, length)


def assert_refused(reply):
    """An ERROR reply that parses, or a closed connection: nothing else is acceptable."""
    if reply is None:
        return
    op, _, body = P.decode(reply)
    assert op == P.ERROR, f"a bad request got op {op}"
    P.parse_error(body)


# --- descriptors a hostile HELLO passes in place of the right ones ----------------------
def memfd(size):
    fd = os.memfd_create("hostile-staging")
    os.ftruncate(fd, size)
    return fd


def uffd_fd():
    """A userfaultfd, but not the client's own."""
    return Uffd.open().fd


def pipe_fd():
    r, w = os.pipe()
    os.close(w)
    return r


def silent_agent():
    """An agent socket whose peer is there but never answers."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _KEEP.append(b)
    return a.detach()


def full_agent():
    """An agent socket the handler cannot send on: its peer's queue is already full."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    try:
        while True:
            a.send(bytes(64))
    except BlockingIOError:
        pass
    a.setblocking(True)   # the handler must make its sends non-blocking itself
    _KEEP.append(b)
    return a.detach()


def readonly_file_fd():
    return os.open("/proc/self/exe", os.O_RDONLY)


def dir_fd():
    return os.open("/", os.O_RDONLY)


# --- the client ----------------------------------------------------------------------------
class Client:
    """One connection to the node: Client.ready(path) is a well-formed client; a bare
    Client(path) has said nothing yet, and says what the test makes it say."""

    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(os.fspath(path))
        self.sock.settimeout(timeout)   # a handler that never answers fails the test
        self.seq = 0
        self.uffd = self.agent = self.mm = None

    @classmethod
    def ready(cls, path, agent=NATIVE):
        """A client whose HELLO the handler accepted."""
        client = cls(path)
        reply = client.hello(agent)
        assert reply is not None and P.decode(reply)[0] == P.OK, "a good HELLO was refused"
        return client

    def hello(self, agent=NATIVE, uffd=None, staging=None, staging_bytes=STAGING,
              extra=(), fd_count=3, wait=True):
        """Say HELLO: our uffd, an agent socket and a staging memfd of STAGING bytes. The
        reply (None once dropped), or without wait whether it was sent. Hostile knobs:
        agent, uffd, staging: a maker of the descriptor to pass instead (agent=PLAYED:
        we answer on self.agent); staging_bytes: the size claimed; extra: makers of more
        descriptors; fd_count: pass only the first so many of the three."""
        if self.uffd is None:
            self.uffd = Uffd.open()
        staging_fd = staging() if staging else memfd(STAGING)
        if agent == NATIVE:
            agent_fd = self._start_agent(staging_fd)
        elif agent == PLAYED:
            self.agent, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.agent.settimeout(10)
            agent_fd = theirs.detach()
        else:
            agent_fd = agent()
        made = [uffd() if uffd else self.uffd.fd, agent_fd, staging_fd]
        made += [make() for make in extra]
        try:
            self.seq += 1
            sent = self.send(request(P.HELLO, staging_bytes, 0, seq=self.seq),
                             made[:fd_count] + made[3:])
        finally:
            # the handler has its own copies now; our uffd stays ours
            P.close_all(fd for fd in made if fd != self.uffd.fd)
        if agent == PLAYED and sent:
            self.answer_agent()   # the handler pings the agent before it replies
        if not wait:
            return sent
        return self.receive() if sent else None

    def _start_agent(self, staging_fd):
        staging = mmap.mmap(staging_fd, STAGING)
        _KEEP.append(staging)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert lib.ufc_agent_start(self.uffd.fd, ours.fileno(), address_of(staging),
                                   STAGING) == 0
        ours.detach()   # the agent thread owns it now
        return theirs.detach()

    def answer_agent(self, status=0):
        """Play the agent for one command, as the native agent thread would; its op. A
        MOVE's reply has its bitmap: every page moved."""
        cmd = self.agent.recv(4096)
        _, op, seq, _, _ = CMD.unpack_from(cmd)
        stayed = bytes(STAYED) if op == lib.UFC_AGENT_MOVE else b""
        self.agent.send(REPLY.pack(lib.UFC_AGENT_MAGIC, seq, status, os.getpid(), 0) + stayed)
        return op

    def drop_agent(self):
        """The agent goes away; the client may stay."""
        self.agent.close()
        self.agent = None

    def send(self, frame, fds=()):
        """False if the handler has closed the connection."""
        try:
            if fds:
                socket.send_fds(self.sock, [frame], list(fds))
            else:
                self.sock.send(frame)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def receive(self):
        """The next reply frame, or None once the handler has closed the connection."""
        try:
            return self.sock.recv(P.MAX_FRAME) or None
        except ConnectionResetError:
            return None

    def exchange(self, frame, fds=()):
        return self.receive() if self.send(frame, fds) else None

    def ask(self, op, *fields):
        """Send a request of ours (next seq) without waiting for its reply."""
        self.seq += 1
        return self.send(request(op, *fields, seq=self.seq))

    def call(self, op, *fields):
        """(reply op, body); the connection must survive any request of a ready client."""
        self.ask(op, *fields)
        reply = self.receive()
        assert reply is not None, f"the handler dropped a ready client for op {op} {fields}"
        rop, rseq, body = P.decode(reply)
        assert rseq == self.seq and rop in (P.OK, P.ERROR)
        return rop, body

    def own_memory(self, pages, seed=0):
        """A region of our own: registered, written (faults resolved by the handler
        through our uffd; written by the kernel so no Python thread faults with the
        GIL held), and announced; returns its region id."""
        self.mm = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = address_of(self.mm)
        self.uffd.register(self.addr, pages * PAGE_SIZE)
        op, body = self.call(P.REGISTER, self.addr, pages * PAGE_SIZE, P.NO_LIMIT, 2)
        assert op == P.OK
        write_via_kernel(self.mm, 0, np.random.default_rng(seed).bytes(pages * PAGE_SIZE))
        return P.COUNT.unpack(body)[0]

    def burst(self, frames):
        """Send frames back to back, then read a reply to each: every one must be a
        refusal. How many were sent, and whether the handler still keeps us."""
        sent = 0
        for frame in frames:
            if not self.send(frame):
                break
            sent += 1
        for _ in range(sent):
            reply = self.receive()
            assert_refused(reply)
            if reply is None:
                return sent, False
        return sent, sent == len(frames)

    def flood(self, frame, seconds=5.0):
        """Send frame over and over, reading no reply: True once the handler has hung
        up on us, False if it still took them after `seconds`."""
        self.sock.setblocking(False)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.sock.send(frame)
            except BlockingIOError:   # the handler reads more slowly than we send
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                return True
        return False

    def leave(self):
        """Hang up; our uffd and memory go only once the handler has let us go."""
        self.sock.close()
        if self.agent is not None:
            self.drop_agent()

    def release(self):
        if self.uffd is not None:
            self.uffd.close()   # first: unmapping a registered range waits on the handler
        if self.mm is not None:
            self.mm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """For a client without memory of its own: nothing waits on the handler."""
        self.leave()
        self.release()
