# Only here because cffi's build hook is a setup() keyword, and the preload library is
# a plain C extension (never imported: `ufcram run` puts it in LD_PRELOAD). Metadata is
# in pyproject.toml.
import runpy
from pathlib import Path

from setuptools import Extension, setup

SOURCES = runpy.run_path(str(Path(__file__).resolve().parent / "native" / "sources.py"))
preload = Extension(
    "ufcram._preload",
    sources=[f"native/{s}" for s in SOURCES["PRELOAD"]],
    include_dirs=SOURCES["INCLUDE_DIRS"],
    # hidden: only the mapping calls it watches are exported, so its copy of the shim
    # never shadows ufcram._shim in a Python program run under it
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11",
                        "-fvisibility=hidden"],
    # bound at load: lazy binding would have our threads read the loader's data, which
    # lives in memory the node may hold (possibly pages of the batch being demoted)
    extra_link_args=["-Wl,-z,now"],
    libraries=["pthread"],
)

setup(cffi_modules=["native/build_shim.py:ffibuilder"], ext_modules=[preload])
