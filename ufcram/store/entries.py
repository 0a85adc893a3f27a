"""Pool entries read back, by the one decoder of their format (native/common/entries.c): the
pool's view that native code reads entries through, and the lz4 function it calls.
"""
import ctypes
import ctypes.util

import lz4.block
import numpy as np

from ufcram._shim import ffi, lib
from ufcram.errors import PoolError
from .pagetable import PAGE_SIZE


def lz4_decompress():
    """The address of LZ4_decompress_safe: the lz4 package's own (the library the pool
    compresses with), else the system's liblz4; None where neither exports it."""
    for path in (getattr(lz4.block._block, "__file__", None), ctypes.util.find_library("lz4")):
        try:
            return ctypes.cast(ctypes.CDLL(path).LZ4_decompress_safe, ctypes.c_void_p).value
        except (AttributeError, OSError, TypeError):   # TypeError: no path at all
            continue
    return None


class Entries:
    """The part of the Pool (pool.py) that reads entries back."""

    _decompress = None   # the C function, found once per process

    def view(self):
        """The pool as entries.c reads it (struct ufc_pool_view): rebuilt when the
        arrays or arenas it points into move, so valid until the pool next changes."""
        if getattr(self, "_view_generation", None) != self.layout_generation:
            if Entries._decompress is None:
                fn = lz4_decompress()
                if fn is None:
                    raise PoolError("neither the lz4 package nor a system liblz4 exports "
                                    "LZ4_decompress_safe: pool entries cannot be read")
                Entries._decompress = ffi.cast("int (*)(const char *, char *, int, int)", fn)
            location, size, arenas = self.layout()
            # held until the next rebuild: the view points into them
            self._view_arrays = [ffi.from_buffer("int64_t[]", location),
                                 ffi.from_buffer("int16_t[]", size),
                                 ffi.from_buffer("uint64_t[]", arenas)]
            view = self._view_struct = getattr(self, "_view_struct", None) or \
                ffi.new("struct ufc_pool_view *")
            view.location, view.size, view.arena = self._view_arrays
            view.nhandles, view.narenas = len(location), len(arenas)
            view.decompress = Entries._decompress
            self._view_generation = self.layout_generation
        return self._view_struct

    def load(self, handle, out=None):
        """The page of handle, written into out (a writable 4096-byte buffer) and out
        returned; a new bytes if out is None."""
        self._own()
        h = self._handle(handle)
        page = bytearray(PAGE_SIZE) if out is None else out
        dst = ffi.from_buffer("uint8_t[]", self._page(page, writable=True),
                              require_writable=True)
        if lib.ufc_load_entry(self.view(), h, dst) < 0:
            raise PoolError(f"entry {h} does not decode to a page")
        return bytes(page) if out is None else out

    def load_many(self, handles, out):
        """Pages of handles into the rows of out, a C-contiguous (n, 4096) uint8 array;
        returns out."""
        self._own()
        h, _ = self._handles(handles)
        out = self._rows(out, writable=True)
        if len(out) != len(h):
            raise PoolError(f"out has {len(out)} rows for {len(h)} handles")
        h = np.ascontiguousarray(h)
        done = lib.ufc_load_entries(self.view(), ffi.from_buffer("int64_t[]", h), len(h),
                                    ffi.from_buffer("uint8_t[]", out, require_writable=True))
        if done < 0:
            raise PoolError(f"entry {h[-done - 1]} does not decode to a page")
        return out
