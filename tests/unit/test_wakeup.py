import struct

import pytest

from ufcram.handler.wakeup import NO_CONSTRAINT, FastWake

pytestmark = pytest.mark.timeout(30)


def requests(path):
    """The latencies written to the (stand-in) device, in order."""
    data = path.read_bytes()
    return [v for (v,) in struct.iter_unpack("i", data)]


def test_held_from_a_fault_until_the_hold_time_after_the_last(tmp_path):
    dev = tmp_path / "latency"
    dev.touch()
    wake = FastWake(hold_ms=100, device=str(dev))
    assert wake.available and wake.timeout(0.0) is None
    wake.fault(now=1.0)
    wake.fault(now=1.05)                    # held already: nothing more written
    assert requests(dev) == [0]
    assert wake.timeout(1.1) == pytest.approx(0.05)
    wake.expire(1.1)                        # not yet
    assert requests(dev) == [0]
    wake.expire(1.2)
    assert requests(dev) == [0, NO_CONSTRAINT] and wake.timeout(2.0) is None
    wake.fault(now=3.0)
    assert requests(dev) == [0, NO_CONSTRAINT, 0]
    wake.close()


def test_zero_hold_never_asks(tmp_path):
    dev = tmp_path / "latency"
    dev.touch()
    wake = FastWake(hold_ms=0, device=str(dev))
    wake.fault(now=1.0)
    assert not wake.available and requests(dev) == []


def test_no_device_means_no_request(tmp_path):
    wake = FastWake(hold_ms=100, device=str(tmp_path / "missing"))
    wake.fault(now=1.0)
    wake.expire(5.0)
    assert not wake.available and wake.timeout(1.0) is None


def test_held_for_a_block(tmp_path):
    dev = tmp_path / "latency"
    dev.touch()
    with FastWake(hold_ms=100, device=str(dev)) as wake:
        wake.expire(1e9)                    # a block's request does not lapse
        assert requests(dev) == [0]
    assert not wake.available
