"""The links to a node: request/reply over its control socket (Channel, all an observer
needs), and the application's memory link (Connection: its userfaultfd, agent thread and
the staging buffer they share with the handler, announced by HELLO).
"""
import atexit
import mmap
import os
import socket
import threading
import weakref

from ufcram import config
from ufcram import protocol as P
from ufcram._shim import lib
from ufcram.errors import HandlerError, ProtocolError
from ufcram.store.pagetable import PAGE_SIZE
from .uffd import Uffd, address_of


_LIVE = weakref.WeakSet()
# uffds kept open after their handler failed (see close), for the life of the process:
# closing one would turn the pages lost with the handler into zeros. The agent thread
# serves them (native/agent/watcher.c), so unmapping at exit does not wait.
_KEPT = []


@atexit.register
def _close_at_exit():
    """Close every live uffd before interpreter teardown unmaps regions: with the uffd
    gone the kernel sends no UNMAP events, so exit never waits on a handler."""
    for conn in list(_LIVE):
        if conn.pid == os.getpid():
            conn.close()


class Channel:
    """Request/reply with a node over a connected control socket. Alone it observes:
    a node answers STATS of the NODE before any HELLO, so no uffd or agent is needed."""

    def __init__(self, sock, describe_handler=lambda: "the ufcram handler"):
        self.sock = sock
        self.pid = os.getpid()
        self.describe_handler = describe_handler
        self.lock = threading.Lock()
        self.seq = 0
        # the socket hung up: the handler is gone (or let us go)
        self.handler_gone = False

    def request(self, op, payload=b"", fds=()):
        """Send one request and return its reply payload; HandlerError on refusal."""
        if os.getpid() != self.pid:
            # the socket is the parent's: a request from here would garble its stream
            raise HandlerError(f"this node connection belongs to pid {self.pid}; a forked "
                               "child reads and writes the memory but cannot manage it")
        with self.lock:
            self.seq += 1
            frame = P.encode(op, self.seq, payload)
            try:
                if fds:
                    socket.send_fds(self.sock, [frame], fds)
                else:
                    self.sock.send(frame)
                data = P.recv_frame(self.sock)
            except OSError as e:
                # a timeout is no hang-up: that handler may still be reading the uffd
                self.handler_gone |= isinstance(e, ConnectionError)
                raise HandlerError(f"{self.describe_handler()} is unreachable: {e}") from e
            if not data:
                self.handler_gone = True
                raise HandlerError(f"{self.describe_handler()} has gone away")
            rop, rseq, body = P.decode(data)
            if rseq != self.seq:
                raise ProtocolError(f"reply {rseq} to request {self.seq}")
            if rop == P.ERROR:
                code, message = P.parse_error(body)
                raise HandlerError(f"the handler refused: {message}")
            return body

    def call(self, op, *fields):
        return self.request(op, P.pack_request(op, *fields))

    def count(self, op, *fields):
        return P.COUNT.unpack(self.call(op, *fields))[0]

    def close(self, keep_uffd=False):
        """Close the socket (keep_uffd is Connection's: a Channel holds no uffd)."""
        self.sock.close()


class Connection(Channel):
    """The application's memory link: a Channel that has said HELLO with its uffd, the
    agent thread's socket and the staging buffer."""

    def __init__(self, sock, describe_handler=lambda: "the ufcram handler"):
        super().__init__(sock, describe_handler)
        # once the socket hangs up (handler_gone), the agent thread serves the uffd itself
        self.uffd = Uffd.open()
        self.staging = self._start_agent()
        _LIVE.add(self)

    def _start_agent(self):
        size = config.get("UFCRAM_STAGING_PAGES") * PAGE_SIZE
        if size == 0:
            raise HandlerError("UFCRAM_STAGING_PAGES must be at least 1")
        fd = os.memfd_create("ufcram-staging", os.MFD_CLOEXEC)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.ftruncate(fd, size)
            # Kept mapped for the life of the process: the agent thread writes into it
            # whenever the handler asks, and nothing tells us when it has stopped.
            staging = mmap.mmap(fd, size)
            rc = lib.ufc_agent_start(self.uffd.fd, ours.fileno(), address_of(staging), size)
            if rc < 0:
                raise HandlerError(f"could not start the agent thread: {os.strerror(-rc)}")
            ours.detach()   # the agent thread owns and closes its end
            self.request(P.HELLO, P.pack_request(P.HELLO, size, 0),
                         fds=[self.uffd.fd, theirs.fileno(), fd])
            return staging
        finally:
            os.close(fd)
            theirs.close()
            ours.close()

    def close(self, keep_uffd=False):
        _LIVE.discard(self)
        # The uffd before the socket: the agent thread holds the uffd too, and when the
        # handler hangs up it takes over serving it unless this descriptor is closed.
        if keep_uffd:
            _KEPT.append(self.uffd)
        else:
            self.uffd.close()
        super().close()
