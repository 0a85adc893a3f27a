"""ufcram: compressed RAM for Linux processes, in user space, over userfaultfd.

Light to import: the native shim loads only when a Region or Node is first used.
"""

from .errors import (  # noqa: F401
    HandlerError, PoolError, PoolFullError, ProtocolError, RegionClosedError,
    RegionError, UfcramError, UffdError, UffdPermissionError, UffdRetry,
    UffdUnsupportedError,
)

__version__ = "0.1.0"

_LAZY = {"Region": "app.region", "Node": "app.node", "Pool": "store.pool",
         "PAGE_SIZE": "store.pagetable"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ufcram' has no attribute {name!r}")
