"""Owners of pool entries: a forked child's page table refers to its parent's entries, so an
entry has an owner per table that holds it and is freed with its last. Part of Pool.
"""
import numpy as np


class Owners:
    """The part of the Pool (pool.py) that counts each entry's owners beyond the first."""

    def share(self, handles):
        """One more owner for each of these entries."""
        handles = np.asarray(handles, np.int64)
        if len(handles) == 0:
            return
        top = int(handles.max()) + 1
        if top > len(self._extra_owners):
            grown = np.zeros(max(top, 2 * len(self._extra_owners)), np.int32)
            grown[:len(self._extra_owners)] = self._extra_owners
            self._extra_owners = grown
        np.add.at(self._extra_owners, handles, 1)

    def release(self, handles):
        """One owner less for each of these entries; those that had one are freed."""
        handles = np.asarray(handles, np.int64)
        if len(handles) == 0:
            return
        shared = handles < len(self._extra_owners)
        shared[shared] = self._extra_owners[handles[shared]] > 0
        np.subtract.at(self._extra_owners, handles[shared], 1)
        self.free_many(handles[~shared])

    def owners(self, handle):
        """How many page tables hold the entry (0 once it is freed)."""
        if handle not in self:
            return 0
        return 1 + int(self._extra_owners[handle]) if handle < len(self._extra_owners) else 1

    def _forget_owners(self, handles):
        """Freed entries have no owners: their handles are reused for new ones."""
        handles = np.asarray(handles, np.int64)
        self._extra_owners[handles[handles < len(self._extra_owners)]] = 0
