"""Compressed-capacity pool: the CRAM node's storage, where demoted 4 KiB pages live.
Pages are lz4-compressed into mmap-backed numpy arenas split by size class (zsmalloc-like).
"""
import mmap
import sys
import threading

import lz4.block
import numpy as np

from .accounting import Accounting, checked_capacity
from .compaction import Compaction
from .entries import Entries
from .owners import Owners
from ufcram.errors import PoolError, PoolFullError
from .pagetable import PAGE_SIZE

HANDLE_NONE = -1
CLASS_STEP = 32          # slot size step: mean internal waste 16 bytes per entry
_OFF = 0xFFFFFFFF        # an entry's location: arena << 32 | its byte offset (this part)
_compress = lz4.block.compress


def _pg(nbytes):
    """Bytes of the whole pages covering nbytes."""
    return -(-nbytes // PAGE_SIZE) * PAGE_SIZE


class Pool(Entries, Compaction, Accounting, Owners):
    """Compressed pages under a physical byte limit. Single-owner: see transfer_owner().

    A handle indexes per-entry numpy arrays: ``_location`` (int64: arena << 32 | byte offset, or
    the fill word of a same-filled page) and ``_size`` (int16: -1 free, 0 same-filled, 4096
    stored raw, else the lz4 size). Free handles sit on an int32 stack, freed slots on an
    int64 stack per class. An arena holds the slots of one class; a class takes freed slots
    first, then bumps through its current arena: only that arena has never-used slots.

    Memory: arenas are private anonymous mmaps without transparent huge pages, so the OS
    backs only the 4 KiB pages the pool has written; an arena costs its bumped bytes rounded
    up to whole pages (``arena_bytes``, which equals the RSS the arenas add). ``capacity``
    limits arena_bytes: a store that needs a new page beyond it is refused whole.
    ``mem_used_total`` = arena_bytes + the nbytes of every metadata array: per handle 14
    bytes at allocated size (<= 21 per live entry with 1.5x growth), 8 per freed slot and per
    arena, and a 32 KiB histogram. Python objects per class and per arena (~0.3 KiB per
    2 MiB arena) are not counted.
    """
    OFFSET_MASK = _OFF

    def __init__(self, capacity, *, arena_size=2 << 20, huge_threshold=3072):
        if (not isinstance(arena_size, int) or not PAGE_SIZE <= arena_size <= 1 << 32
                or arena_size % PAGE_SIZE):
            raise PoolError(f"arena_size must be a multiple of {PAGE_SIZE} up to 4 GiB")
        if not isinstance(huge_threshold, int) or not 0 < huge_threshold <= PAGE_SIZE:
            raise PoolError(f"huge_threshold must be an int in 1..{PAGE_SIZE}")
        self._owner = threading.get_ident()
        self._capacity_bytes = checked_capacity(capacity)
        self._arena_size, self._huge_threshold = arena_size, min(huge_threshold, PAGE_SIZE - 1)
        self._huge_class = -(-huge_threshold // CLASS_STEP)   # raw pages: the last class
        self._slot_size = [min((c + 1) * CLASS_STEP, PAGE_SIZE)
                           for c in range(self._huge_class)] + [PAGE_SIZE]
        self._slots_per_arena = [arena_size // s for s in self._slot_size]
        self._class_of = [0] + [(n - 1) // CLASS_STEP for n in range(1, PAGE_SIZE)] + \
            [self._huge_class]
        ncls = len(self._slot_size)
        self._free_top, self._current_arena = [0] * ncls, [-1] * ncls
        self._bumped = list(self._slots_per_arena)   # slots used in the current arena
        self._meta = 0
        self._free_slots = [np.empty(0, np.int64) for _ in range(ncls)]
        self._arena_class = np.empty(0, np.int64)    # per arena: class, -1 once released
        # per arena: a memoryview of it and its mmap; released arenas' numbers to reuse
        self._arena_view, self._arena_map, self._spare = [], [], []
        self._location, self._size = np.empty(0, np.int64), np.empty(0, np.int16)
        self._free_handles = np.empty(0, np.int32)
        self._handles_issued = self._handles_free = 0
        self._size_histogram = np.zeros(PAGE_SIZE + 1, np.int64)
        self._percentiles = {}   # q -> ratio, until the histogram changes (write faults ask)
        self._meta += self._size_histogram.nbytes
        self._arena_bytes = self._peak = self._compacted = 0
        # live entries' stored bytes, same-filled and raw counts: stats() in O(1), as
        # `ufcram run` samples them while a program runs
        self._live_bytes = self._live_same = self._live_huge = 0
        self.layout_generation = 0   # changes whenever layout()'s arrays move
        self._extra_owners = np.zeros(0, np.int32)   # per handle, past the first

    def layout(self):
        """(location, size, arena addresses) per handle and arena: what native code
        needs to load entries (entries.c). A location is arena << 32 | offset, or a
        same-filled page's value where size is 0; size is -1 for no entry; a released
        arena's address is 0. Valid until layout_generation changes."""
        arenas = np.array([0 if v is None else np.frombuffer(v, np.uint8).ctypes.data
                           for v in self._arena_view], np.uint64)
        return self._location, self._size, arenas

    # --- ownership, validation, metadata arrays ---
    def _own(self):
        if threading.get_ident() != self._owner:
            raise PoolError(f"Pool is single-owner; it belongs to thread {self._owner}, not "
                            f"{threading.get_ident()}: call transfer_owner() from the new owner")

    def transfer_owner(self):
        """Make the calling thread the owner (the handler builds the pool, then runs it in
        its loop thread). A handover, not a lock: the old owner must have stopped using it."""
        self._owner = threading.get_ident()

    def _resize(self, a, n, fill=-1):
        """Copy of a with capacity n; the change counted in the metadata bytes."""
        b = np.full(n, fill, a.dtype)
        b[:min(n, len(a))] = a[:n]
        self._meta += b.nbytes - a.nbytes
        return b

    def _handle(self, handle):
        if isinstance(handle, bool) or not isinstance(handle, (int, np.integer)):
            raise PoolError(f"handle must be an int, got {handle!r}")
        if not 0 <= handle < self._handles_issued or self._size[handle] < 0:
            raise PoolError(f"unknown or freed handle {handle}")
        return int(handle)

    def _handles(self, handles):
        """Validated int64 handles and their sizes; PoolError naming a bad one."""
        h = np.asarray(handles)
        if h.ndim != 1 or (h.size and h.dtype.kind not in "iu"):
            raise PoolError("handles must be a 1-D array of ints")
        h = h.astype(np.int64, copy=False)
        if h.size and (h.min() < 0 or h.max() >= self._handles_issued):
            bad = h[(h < 0) | (h >= self._handles_issued)][0]
            raise PoolError(f"unknown handle {bad}; nothing done")
        sizes = self._size[h]
        if h.size and sizes.min() < 0:
            raise PoolError(f"freed handle {h[sizes < 0][0]}; nothing done")
        return h, sizes

    @staticmethod
    def _page(page, writable=False):
        try:
            mv = memoryview(page)
        except TypeError:
            raise PoolError(f"a page must be a buffer, not {type(page).__name__}") from None
        if mv.nbytes != PAGE_SIZE or not mv.c_contiguous or (writable and mv.readonly):
            raise PoolError(f"a page must be {PAGE_SIZE} contiguous{' writable' * writable} "
                            f"bytes, got {mv.nbytes}")
        return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv

    @staticmethod
    def _rows(pages, writable=False):
        if (not isinstance(pages, np.ndarray) or pages.dtype != np.uint8 or pages.ndim != 2
                or pages.shape[1] != PAGE_SIZE):
            raise PoolError(f"pages must be a uint8 ndarray of shape (n, {PAGE_SIZE})")
        if writable and not (pages.flags.c_contiguous and pages.flags.writeable):
            raise PoolError("out must be C-contiguous and writable")
        return pages if pages.flags.c_contiguous else np.ascontiguousarray(pages)

    # --- arenas and slots ---
    def _new_arena(self, c):
        mm = mmap.mmap(-1, self._arena_size, flags=mmap.MAP_PRIVATE)
        mm.madvise(mmap.MADV_NOHUGEPAGE)   # a huge page would commit 2 MiB on first touch
        a = self._spare.pop() if self._spare else len(self._arena_view)
        if a == len(self._arena_view):
            self._arena_view.append(None)
            self._arena_map.append(None)
            if a == len(self._arena_class):
                self._arena_class = self._resize(self._arena_class, max(16, a * 3 // 2))
        # the arena is a numpy array; slicing its memoryview is the cheapest per-page access
        self._arena_view[a], self._arena_map[a] = memoryview(np.frombuffer(mm, np.uint8)), mm
        self.layout_generation += 1
        self._arena_class[a] = c
        self._current_arena[c], self._bumped[c] = a, 0

    def _release(self, a):
        """Unmap arena a: its memory goes back to the OS now."""
        c = int(self._arena_class[a])
        bumped = self._bumped[c] if self._current_arena[c] == a else self._slots_per_arena[c]
        self._arena_bytes -= _pg(bumped * self._slot_size[c])
        self._arena_view[a].release()              # drops the numpy array, then the mapping goes
        self._arena_map[a].close()
        self._arena_view[a] = self._arena_map[a] = None
        self.layout_generation += 1
        self._arena_class[a] = -1
        if self._current_arena[c] == a:
            self._current_arena[c], self._bumped[c] = -1, self._slots_per_arena[c]
        self._spare.append(a)

    def _slot(self, c, limit=True):
        """Location of a free slot of class c, or -1 if it needs memory beyond capacity."""
        top = self._free_top[c]
        if top:
            self._free_top[c] = top - 1
            return self._free_slots[c].item(top - 1)
        s, h = self._slot_size[c], self._bumped[c]
        full = h == self._slots_per_arena[c]
        need = _pg(s) if full else _pg((h + 1) * s) - _pg(h * s)
        if limit and need and self._arena_bytes + need > self._capacity_bytes:
            return -1
        if full:
            self._new_arena(c)
            h = 0
        self._bumped[c] = h + 1
        self._arena_bytes += need
        return (self._current_arena[c] << 32) | (h * s)

    # --- store ---
    def store(self, page):
        """Store one page (any 4096-byte buffer); its handle. PoolFullError: nothing stored."""
        self._own()
        mv = self._page(page)
        raw = mv.tobytes()         # for one page, a bytes compare beats numpy's call costs
        lo, sz, refused = self._place(mv, [raw[8:] == raw[:-8]], [int.from_bytes(
            raw[:8], sys.byteorder, signed=True)])
        if refused:
            raise PoolFullError(f"pool full: {self._arena_bytes} of {self._capacity_bytes} "
                                f"arena bytes "
                                f"used; this page needs a new 4 KiB page of arena memory")
        return int(self._record(lo, sz)[0])

    def store_many(self, pages, over_capacity=False):
        """Store the rows of a (n, 4096) uint8 array, in order; their handles (int64).

        A page that does not fit gets HANDLE_NONE and none of its bytes are stored (no
        exception); later pages are still tried, so one that fits (same-filled, or one for
        a freed slot of its class) may be stored after a refused one. With over_capacity
        every page is stored, past the capacity if need be (bytes that exist nowhere else).
        """
        self._own()
        pages = self._rows(pages)
        words = pages.view(np.int64)
        first = words[:, 0]
        same = first == words[:, 1]            # cheap filter before the whole-page check
        flags = same.tolist()
        if True in flags:
            same[same] = (words[same] == words[same, :1]).all(axis=1)
            flags = same.tolist()
        lo, sz, refused = self._place(memoryview(pages.reshape(-1)), flags, first.tolist(),
                                      limit=not over_capacity)
        if not refused:
            return self._record(lo, sz)
        ok = [i for i, n in enumerate(sz) if n >= 0]
        out = np.full(len(sz), HANDLE_NONE, np.int64)
        out[ok] = self._record([lo[i] for i in ok], [sz[i] for i in ok])
        return out

    def _place(self, flat, same, first_words, limit=True):
        """Write pages (flat holds them back to back) into slots, in order: per page its
        location (the fill word if same-filled), stored size (-1: did not fit), and
        whether any page was refused."""
        P, thr, cls_of, off_mask = PAGE_SIZE, self._huge_threshold, self._class_of, _OFF
        ftop, stacks, slot, mvs = self._free_top, self._free_slots, self._slot, self._arena_view
        lo, sz = [], []
        add_lo, add_sz, refused = lo.append, sz.append, False
        for at, is_same, word in zip(range(0, len(flat), P), same, first_words):
            if is_same:            # zram's same_pages: the word is the whole entry
                add_lo(word)
                add_sz(0)
                continue
            page = flat[at:at + P]
            d = _compress(page, store_size=False)
            n = len(d)
            if n > thr:
                d, n = page, P
            c = cls_of[n]
            top = ftop[c]
            if top:                # _slot()'s free-slot pop, inlined: the hot path
                ftop[c] = top = top - 1
                loc = stacks[c].item(top)
            else:
                loc = slot(c, limit)
            if loc < 0:
                n, refused = -1, True
            else:
                o = loc & off_mask
                mvs[loc >> 32][o:o + n] = d
            add_lo(loc)
            add_sz(n)
        return lo, sz, refused

    def _record(self, lo, sz):
        """Handles for entries already written, given their locations and sizes."""
        k, nf = len(lo), self._handles_free
        if k <= nf:
            h = self._free_handles[nf - k:nf].astype(np.int64)
            self._handles_free -= k
        else:
            fresh = np.arange(self._handles_issued, self._handles_issued + k - nf)
            h = np.concatenate((self._free_handles[:nf], fresh),
                               dtype=np.int64)
            self._handles_issued += k - nf
            self._handles_free = 0
        if self._handles_issued > len(self._location):
            cap = max(self._handles_issued, len(self._location) * 3 // 2, 1024)
            self._location = self._resize(self._location, cap)
            self._size = self._resize(self._size, cap)
            self._free_handles = self._resize(self._free_handles, cap)
            self.layout_generation += 1
        sizes = np.fromiter(sz, np.int64, k)
        self._location[h], self._size[h] = lo, sizes
        self._count_live(sizes, 1)
        np.add.at(self._size_histogram, sizes, 1)
        self._percentiles.clear()
        self._peak = max(self._peak, self._arena_bytes + self._meta)
        return h

    # --- free and compaction ---
    def free(self, handle):
        """Drop one entry; its slot is reused. PoolError if unknown or already freed."""
        self._own()
        h = self._handle(handle)
        n = int(self._size[h])
        if n:
            self._push(self._class_of[n], int(self._location[h]))
        self._live_bytes -= n
        self._live_same -= n == 0
        self._live_huge -= n == PAGE_SIZE
        self._size[h] = -1
        self._free_handles[self._handles_free] = h
        self._handles_free += 1
        if h < len(self._extra_owners):   # its handle is reused for a new entry
            self._extra_owners[h] = 0

    def free_many(self, handles):
        """Drop entries; all handles are checked (known, live, not repeated) before any."""
        self._own()
        h, sizes = self._handles(handles)
        if len(set(h.tolist())) != len(h):
            raise PoolError("a handle is repeated in free_many (double free); nothing done")
        cls_of, push = self._class_of, self._push
        for n, loc in zip(sizes.tolist(), self._location[h].tolist()):
            if n:
                push(cls_of[n], loc)
        self._count_live(sizes, -1)
        self._size[h] = -1
        self._free_handles[self._handles_free:self._handles_free + len(h)] = h
        self._handles_free += len(h)
        self._forget_owners(h)

    def _count_live(self, sizes, sign):
        self._live_bytes += sign * int(sizes.sum(dtype=np.int64))
        self._live_same += sign * int(np.count_nonzero(sizes == 0))
        self._live_huge += sign * int(np.count_nonzero(sizes == PAGE_SIZE))

    def _push(self, c, loc):
        """Put a freed slot on its class's stack."""
        top = self._free_top[c]
        if top == len(self._free_slots[c]):
            self._free_slots[c] = self._resize(self._free_slots[c], max(64, top * 3 // 2))
            self._peak = max(self._peak, self._arena_bytes + self._meta)
        self._free_slots[c][top] = loc
        self._free_top[c] = top + 1
