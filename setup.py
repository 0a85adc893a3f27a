# Only here because cffi's build hook is a setup() keyword, and the preload library is
# a plain C extension (never imported: `ufcram run` puts it in LD_PRELOAD). Metadata is
# in pyproject.toml.
from setuptools import Extension, setup

preload = Extension(
    "ufcram._preload",
    sources=["native/preload.c", "native/coverage.c", "native/nodelink.c", "native/uffd.c",
             "native/agent.c", "native/own.c", "native/fallback.c",
             "native/dropped.c"],
    include_dirs=["native"],
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
