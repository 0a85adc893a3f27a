"""cffi build script of the native shim (out-of-line API mode), run by `pip install`.

The cdef is native/common/ufcram_api.h (the one list of exported functions, also a C header)
plus native/common/constants.cdef (kernel and agent constants whose values C supplies).
"""
import runpy
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = runpy.run_path(str(HERE / "sources.py"))

ffibuilder = FFI()
COMMON = HERE / "common"
ffibuilder.cdef((COMMON / "constants.cdef").read_text() + (COMMON / "ufcram_api.h").read_text())
ffibuilder.set_source(
    "ufcram._shim",
    '#include "ufcram_native.h"\n',
    sources=[str((HERE / s).relative_to(ROOT)) for s in SOURCES["SHIM"]],
    include_dirs=SOURCES["INCLUDE_DIRS"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE / "_build"), verbose=True)
