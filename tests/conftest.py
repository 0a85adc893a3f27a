"""Markers that skip with a reason: `uffd` needs a working userfaultfd with write-protect
on anonymous memory; `root` needs root. Every test also runs under pytest-timeout."""
import faulthandler
import os
import sys

import pytest

# Every page-state move is checked against the state machine (pagetable.LEGAL), here and
# in every handler the tests start (they inherit it): an illegal one raises where it
# happens instead of being made.
os.environ.setdefault("UFCRAM_CHECK_STATES", "1")


def _uffd_unavailable():
    if not sys.platform.startswith("linux"):
        return "userfaultfd is Linux-only"
    try:
        from ufcram.app.uffd import Uffd
        Uffd.open().close()
    except Exception as e:   # the reason is the skip message
        return f"userfaultfd unusable here: {e}"
    return None


_UFFD_REASON = _uffd_unavailable()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "uffd" in item.keywords and _UFFD_REASON:
            item.add_marker(pytest.mark.skip(reason=_UFFD_REASON))
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (see the test's docstring)"))


@pytest.fixture(autouse=True)
def hard_timeout(request):
    """A thread that faults while holding the GIL stops every Python thread, including
    pytest-timeout's. faulthandler's watchdog is a C thread: it dumps the stacks and
    exits even then, so a lost fault can never hang CI."""
    marker = request.node.get_closest_marker("timeout")
    limit = (marker.args[0] if marker and marker.args else
             request.config.getini("timeout") or 120)
    faulthandler.dump_traceback_later(float(limit) + 15, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
