"""cffi build script of the native shim (out-of-line API mode), run by `pip install`.

The cdef is native/ufcram_api.h (the one list of exported functions, also a C header)
plus native/constants.cdef (kernel and agent constants whose values C supplies).
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "constants.cdef").read_text() + (HERE / "ufcram_api.h").read_text())
ffibuilder.set_source(
    "ufcram._shim",
    '#include "ufcram_native.h"\n',
    sources=[str((HERE / s).relative_to(ROOT))
             for s in ("uffd.c", "agent.c", "own.c", "fallback.c", "dropped.c",
                       "fastpath.c")],
    include_dirs=[str(HERE.relative_to(ROOT))],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE / "_build"), verbose=True)
