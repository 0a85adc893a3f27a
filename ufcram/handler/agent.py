"""The handler's side of an application's agent thread: commands to demote or drop
runs of pages, sent over a SOCK_SEQPACKET pair, and their replies; and the uffds of
forked children, handed over to be served should this handler die.
"""
import os
import socket
import struct

import numpy as np

from ufcram._shim import ffi, lib
from ufcram.errors import HandlerError
from . import proc

CMD = struct.Struct("<IIIIQ")       # struct ufc_agent_cmd without its runs
REPLY = struct.Struct("<IIiiQ")     # struct ufc_agent_reply
assert CMD.size == ffi.sizeof("struct ufc_agent_cmd")
assert REPLY.size == ffi.sizeof("struct ufc_agent_reply")
MAX_RUNS = lib.UFC_AGENT_MAX_RUNS
MOVE_MAX_PAGES = lib.UFC_AGENT_MOVE_MAX_PAGES
STAYED = MOVE_MAX_PAGES // 8        # bytes of the bitmap after a MOVE reply
_pidfd = (None, None)   # (pid, pidfd of this handler process), opened on first use


def own_pidfd():
    """A pidfd of this handler: with it, an agent tells its death from its hang-up (a
    live handler that lets a client go still serves that client's children)."""
    global _pidfd
    if _pidfd[0] != os.getpid():
        _pidfd = (os.getpid(), os.pidfd_open(os.getpid()))
    return _pidfd[1]


class AgentDrops:
    """The spans one command has the agent drop, in its order, to tell its REMOVE events
    from the application's frees. Each madvise of the agent waits until its REMOVE has
    been read, so its events come in order: each starts where the one before ended (a
    span that crosses mappings comes as one event per mapping, each ending where the
    next begins) or at the next span. Any other REMOVE is the application's, even one of
    exactly a span the agent has not reached: taken for the agent's, it would hide a
    free from a child forked before the agent's own event came. (One of exactly the
    span the agent is at cannot be told from its own: it is taken for the agent's, and
    the agent's, after it, for the free.)"""

    def __init__(self, spans):
        self.spans = [(a, a + n) for a, n in np.asarray(spans).tolist()]
        self.next = 0                  # the span the agent is at
        self.at = self.spans[0][0] if self.spans else None   # where its next event starts

    def take(self, pid, start, end):
        """Whether a REMOVE of [start, end) in process pid is the agent's next."""
        if self.next == len(self.spans) or start != self.at:
            return False
        span_end = self.spans[self.next][1]
        if end > span_end or (end < span_end and not proc.vma_starts_at(pid, end)):
            return False
        if end < span_end:
            self.at = end
        else:
            self.next += 1
            self.at = self.spans[self.next][0] if self.next < len(self.spans) else None
        return True


class AgentLink:
    """Talks to one application's agent; the agent's thread id identifies its faults."""

    def __init__(self, sock):
        self.sock = sock
        self.seq = 0
        self.tid = -1

    def send(self, op, runs=None, staging_offset=0):
        """runs: (k, 2) array of (address, length) in bytes."""
        runs = np.empty((0, 2), np.uint64) if runs is None else np.asarray(runs, np.uint64)
        if len(runs) > MAX_RUNS:
            raise HandlerError(f"{len(runs)} runs in one agent command (max {MAX_RUNS})")
        self.seq += 1
        head = CMD.pack(lib.UFC_AGENT_MAGIC, op, self.seq, len(runs), staging_offset)
        self.sock.send(head + runs.astype("<u8").tobytes())
        return self.seq

    def recv(self):
        """(status, bytes, stayed) of the reply to the last command: stayed, after a
        MOVE, is the mask of pages that did not move, else None. HandlerError if the
        agent is gone."""
        data = self.sock.recv(REPLY.size + STAYED + 1)
        if len(data) not in (REPLY.size, REPLY.size + STAYED):
            raise HandlerError("the application's agent thread is gone")
        magic, seq, status, tid, nbytes = REPLY.unpack(data[:REPLY.size])
        if magic != lib.UFC_AGENT_MAGIC or seq != self.seq:
            raise HandlerError(f"agent reply out of order (seq {seq}, expected {self.seq})")
        self.tid = tid
        stayed = None
        if len(data) > REPLY.size:
            stayed = np.unpackbits(np.frombuffer(data, np.uint8, offset=REPLY.size),
                                   bitorder="little").astype(bool)
        return status, nbytes, stayed

    def adopt(self, uffd_fd):
        """Give the agent a forked child's uffd, to serve once this handler has exited.
        No reply, and the sequence is left alone: a fork can come while a command to
        this agent awaits its reply. OSError if it cannot be sent."""
        head = CMD.pack(lib.UFC_AGENT_MAGIC, lib.UFC_AGENT_ADOPT, 0, 0, 0)
        socket.send_fds(self.sock, [head], [uffd_fd, own_pidfd()])

    def moved(self, old, new, length):
        """Tell the agent that mremap moved [old, old + length) to new: it follows its
        record of dropped pages (lost, should this handler die). No reply, as adopt."""
        runs = np.array([[old, length], [new, length]], "<u8")
        self.sock.send(CMD.pack(lib.UFC_AGENT_MAGIC, lib.UFC_AGENT_MOVED, 0, 2, 0) +
                       runs.tobytes())

    def ping(self):
        self.send(lib.UFC_AGENT_PING)
        return self.recv()

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()
