"""The handler's request for fast wake-ups on the real kernel: held while faults come,
dropped after the hold time. Root only: /dev/cpu_dma_latency is root's (mode 0600),
so elsewhere the handler runs without the request and there is nothing to observe."""
import struct
import time

import numpy as np
import pytest

import ufcram
from ufcram import PAGE_SIZE, Region
from ufcram.handler.wakeup import DEVICE, NO_CONSTRAINT

pytestmark = [pytest.mark.timeout(60), pytest.mark.root]


def cpu_latency_target():
    """The kernel's aggregated CPU latency constraint, in microseconds."""
    with open(DEVICE, "rb") as f:
        return struct.unpack("i", f.read(4))[0]


def test_faults_hold_zero_wake_latency_until_they_stop(monkeypatch):
    monkeypatch.setenv("UFCRAM_FAST_WAKE_MS", "300")
    if cpu_latency_target() != NO_CONSTRAINT:
        pytest.skip("another process holds a CPU latency request: nothing to tell apart")
    with ufcram.Node(capacity=16 << 20) as node:
        r = Region(16 * PAGE_SIZE, node=node)
        a = r.array(np.uint8, (16, PAGE_SIZE))
        a[:] = 7
        r.demote()
        assert int(a.sum()) == 7 * a.size                  # faults (restores)
        assert cpu_latency_target() == 0
        deadline = time.monotonic() + 10
        while cpu_latency_target() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu_latency_target() == NO_CONSTRAINT       # lapsed without faults
        del a
        r.close()
