"""The handler's view of one connected application process: its descriptors (uffd,
agent, staging buffer), its regions' page tables, and per-region counters.
"""
import mmap
import os
import socket
import struct

import numpy as np

from .agent import AgentLink
from .errors import HandlerError, ProtocolError
from .pagetable import PAGE_SIZE, PageTable
from .uffd import WANTED, Uffd

COUNTERS = ("demotions", "restores", "zero_fills", "refused_full")


class Client:
    def __init__(self, conn):
        self.conn = conn
        self.pid, self.uid, _ = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        self.uffd = None
        self.agent = None
        self.staging = None
        self.staging_pages = None
        self.regions = {}
        self.counters = {}
        self.next_region = 1
        self._starts = np.empty(0, np.uint64)
        self._ids = np.empty(0, np.int64)

    @property
    def ready(self):
        return self.uffd is not None

    def attach(self, fds, staging_bytes):
        """Take the descriptors of HELLO: uffd, agent socket, staging memfd."""
        if self.ready:
            raise ProtocolError("HELLO sent twice")
        if len(fds) != 3:
            raise ProtocolError(f"HELLO carries {len(fds)} descriptors, expected 3")
        uffd_fd, agent_fd, staging_fd = fds
        if os.readlink(f"/proc/self/fd/{uffd_fd}") != "anon_inode:[userfaultfd]":
            raise ProtocolError("HELLO's first descriptor is not a userfaultfd")
        if staging_bytes <= 0 or staging_bytes % PAGE_SIZE or \
                os.fstat(staging_fd).st_size < staging_bytes:
            raise ProtocolError(f"staging buffer of {staging_bytes} bytes is not usable")
        self.staging = mmap.mmap(staging_fd, staging_bytes)
        os.close(staging_fd)
        fds[:] = []   # owned from here on; closed by close()
        self.staging_pages = np.frombuffer(self.staging, np.uint8).reshape(-1, PAGE_SIZE)
        self.agent = AgentLink(socket.socket(fileno=agent_fd))
        self.uffd = Uffd(uffd_fd, WANTED)

    def add_region(self, start, length):
        if start % PAGE_SIZE or length <= 0 or length % PAGE_SIZE:
            raise ProtocolError(f"region {start:#x}+{length:#x} is not page-aligned")
        if any(t.base < start + length and start < t.end for t in self.regions.values()):
            raise ProtocolError(f"region {start:#x}+{length:#x} overlaps a registered one")
        rid = self.next_region
        self.next_region += 1
        self.regions[rid] = PageTable(start, length // PAGE_SIZE)
        self.counters[rid] = dict.fromkeys(COUNTERS, 0)
        self._index()
        return rid

    def region(self, rid):
        table = self.regions.get(rid)
        if table is None:
            raise HandlerError(f"no region {rid} for this client")
        return table

    def remove_region(self, rid):
        self.region(rid)
        del self.regions[rid], self.counters[rid]
        self._index()

    def locate(self, addr):
        """(region id, table) holding addr, or (None, None)."""
        i = int(np.searchsorted(self._starts, addr, side="right")) - 1
        if i < 0:
            return None, None
        rid = int(self._ids[i])
        table = self.regions[rid]
        return (rid, table) if addr < table.end else (None, None)

    def _index(self):
        order = sorted(self.regions, key=lambda r: self.regions[r].base)
        self._starts = np.array([self.regions[r].base for r in order], np.uint64)
        self._ids = np.array(order, np.int64)

    def close(self):
        for closable in (self.agent, self.uffd, self.conn):
            if closable is not None:
                closable.close()
        self.staging_pages = None
        if self.staging is not None:
            self.staging.close()
