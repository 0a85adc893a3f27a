"""Compaction, the node's TRIM: the entries of a size class's sparsest arenas move into
free slots of its other arenas, and the emptied arenas are unmapped. Part of Pool.
"""
import numpy as np


class Compaction:
    """The part of the Pool (pool.py) that compacts; handles stay valid."""

    def compact(self):
        """Move entries out of the sparsest arenas into free slots of their class and unmap
        the emptied arenas (the node's TRIM). Handles stay valid. Returns bytes released."""
        self._own()
        before = self._arena_bytes
        live = np.flatnonzero(self._size[:self._handles_issued] > 0)
        arenas = self._location[live] >> 32
        alive = np.bincount(arenas, minlength=len(self._arena_class))
        plans = [(c, v) for c in range(len(self._slot_size)) if len(v := self._victims(c, alive))]
        if not plans:
            return 0
        moving = np.isin(arenas, np.concatenate([v for _, v in plans]))
        hs, hcls = live[moving], self._arena_class[arenas[moving]]
        for c, victims in plans:
            self._evacuate(c, victims, hs[hcls == c])
            for a in victims.tolist():
                self._release(a)
        return before - self._arena_bytes

    def _victims(self, c, alive):
        """Sparsest arenas of class c whose entries fit in the free slots of the others."""
        ids = np.flatnonzero(self._arena_class == c)
        ids = ids[np.argsort(alive[ids], kind="stable")]
        live = alive[ids]
        moved = np.concatenate(([0], np.cumsum(live)))
        room = np.concatenate((np.cumsum((self._slots_per_arena[c] - live)[::-1])[::-1], [0]))
        return ids[:np.count_nonzero(moved <= room) - 1]

    def _evacuate(self, c, victims, hs):
        stack = self._free_slots[c][:self._free_top[c]]
        dst = stack[~np.isin(stack >> 32, victims)]
        m = len(hs)
        self._free_top[c] = 0          # so that _slot() below bumps instead of popping
        # the victims were chosen so that this bumps only into a kept current arena
        extra = [self._slot(c, limit=False) for _ in range(m - len(dst))]
        dst, keep = np.concatenate((dst, np.array(extra, np.int64))), dst[m:]
        self._free_slots[c] = self._resize(self._free_slots[c], max(len(keep) * 3 // 2, 64))
        self._free_slots[c][:len(keep)] = keep
        self._free_top[c] = len(keep)
        dst, mvs = dst[:m], self._arena_view
        off = self.OFFSET_MASK
        for s, d, n in zip(self._location[hs].tolist(), dst.tolist(), self._size[hs].tolist()):
            so, do = s & off, d & off
            mvs[d >> 32][do:do + n] = mvs[s >> 32][so:so + n]
        self._location[hs] = dst
        self._compacted += m
