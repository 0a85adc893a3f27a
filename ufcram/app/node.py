"""A compressed-capacity node as the application sees it: a handler process with its
pool, spawned on demand, and this process's connection to it.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import weakref

from ufcram import protocol as P
from .connection import Channel, Connection
from ufcram.errors import HandlerError

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Node:
    _default = None
    _default_lock = threading.Lock()

    def __init__(self, capacity=None, path=None, observe=False):
        """Start a node: a handler process with a pool of `capacity` bytes. With `path`,
        other processes of the same user can join it with Node.connect(path). With
        observe, this process only reads its stats (no uffd, agent or regions here); the
        handler still serves until this process and every client have gone."""
        if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
            raise HandlerError(f"node capacity must be a non-negative int, got {capacity!r}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "ufcram.handler", "--fd", str(theirs.fileno())]
        if capacity is not None:
            cmd += ["--capacity", str(capacity)]
        if path is not None:
            cmd += ["--listen", os.fspath(path)]
        env = dict(os.environ)
        # a handler serving its own allocations from itself would deadlock on its first
        # fault: it never runs under the preload library, even if this process does
        env["LD_PRELOAD"] = ":".join(p for p in env.get("LD_PRELOAD", "").split(":")
                                     if p and "ufcram/_preload" not in p)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.regions = weakref.WeakSet()
        try:
            self.connection = (Channel if observe else Connection)(ours, self._describe)
        except BaseException:
            ours.close()
            self._reap()
            raise

    @classmethod
    def connect(cls, path, timeout=10.0, observe=False):
        """Join a running node that listens on `path` (started by Node(path=...)); with
        observe, only to read its stats, as `ufcram stat` does."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(os.fspath(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    sock.close()
                    raise HandlerError(f"no ufcram node listens on {path}") from None
                time.sleep(0.02)
        node = cls.__new__(cls)
        node.process = None
        node.regions = weakref.WeakSet()
        link = Channel if observe else Connection
        try:
            node.connection = link(sock, lambda: f"the ufcram node at {path}")
        except BaseException:
            sock.close()
            raise
        return node

    @classmethod
    def default(cls):
        """This process's private node, started on first use."""
        with cls._default_lock:
            if cls._default is None or cls._default.closed:
                cls._default = cls()
            return cls._default

    @property
    def closed(self):
        return self.connection is None

    @property
    def observer(self):
        """This process only reads the node's stats: it can hold no region."""
        return not isinstance(self.connection, Connection)

    @property
    def pid(self):
        return None if self.process is None else self.process.pid

    def _describe(self):
        code = self.process.poll()
        state = "running" if code is None else f"exited with status {code}"
        return f"the ufcram handler (pid {self.process.pid}, {state})"

    def stats(self, summary=False):
        """The node's counters, with its largest clients unless summary (then O(1) in
        the pool's entries: for sampling while programs run)."""
        if self.closed:
            raise HandlerError("node is closed")
        return json.loads(self.connection.call(P.STATS, P.NODE_SUMMARY if summary else P.NODE))

    def set_capacity(self, capacity):
        """Change the node's physical capacity (bytes) while it runs, as a balloon would.
        Below current use the node closes to new entries and promotes pages back."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise HandlerError(f"node capacity must be a non-negative int, got {capacity!r}")
        if self.closed:
            raise HandlerError("node is closed")
        self.connection.call(P.SET_CAPACITY, capacity)

    def close(self):
        """Close every region of this node, then let the handler go."""
        if self.closed:
            return
        released = False
        failure = None
        try:
            for region in list(self.regions):
                try:
                    region.close()
                except HandlerError as e:   # the others are still let go
                    failure = failure or e
            released = failure is None
        finally:
            # Closing the uffd while a region may still hold demoted pages would make
            # them read as zeros: if the handler could not release them, keep it open
            # so such an access fails visibly instead.
            self.connection.close(keep_uffd=not released)
            self.connection = None
            self._reap()
        if failure is not None:
            raise failure

    def _reap(self):
        if self.process is None:
            return
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _forget_default_in_child():
    # a forked child has no agent thread and no handler of its own
    Node._default = None


os.register_at_fork(after_in_child=_forget_default_in_child)
