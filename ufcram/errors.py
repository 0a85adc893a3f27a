"""The one exception hierarchy of ufcram.

Every error the package raises derives from UfcramError, so callers can catch it whole.
"""


class UfcramError(Exception):
    """Base of every ufcram error."""


class UffdError(UfcramError, OSError):
    """A userfaultfd syscall or ioctl failed; errno and a what-to-do message attached."""

    def __init__(self, errno_, message):
        OSError.__init__(self, errno_, message)


class UffdRetry(UffdError):
    """Benign: the mappings are changing (an event is pending); read events, then retry."""


class UffdPermissionError(UffdError):
    """userfaultfd is not granted to this user; the message says which grant applies."""


class UffdUnsupportedError(UffdError):
    """The kernel lacks a feature ufcram needs (e.g. write-protect on anonymous memory)."""


class PoolError(UfcramError):
    """Misuse of the compressed pool: bad page size, unknown or freed handle, bad capacity."""


class PoolFullError(PoolError):
    """A store did not fit in the pool's physical capacity; nothing was written."""


class RegionError(UfcramError, ValueError):
    """Bad region input: size, alignment, or a range outside the region."""


class RegionClosedError(RegionError):
    """The region was used after close()."""


class StateError(UfcramError):
    """A page-state move the state machine does not allow: a bug of ufcram's, refused
    (rather than made) where UFCRAM_CHECK_STATES=1, as in the test suite."""


class HandlerError(UfcramError):
    """The fault handler refused a request or is gone."""


class ProtocolError(HandlerError):
    """A malformed, oversized, truncated or out-of-order message on the handler socket."""
