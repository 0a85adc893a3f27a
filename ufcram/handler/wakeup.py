"""Fast wake-ups: polling without sleeping for a moment before blocking, and, while
faults flow, a PM QoS request for 0 us CPU wake-up latency (/dev/cpu_dma_latency),
held from a fault until UFCRAM_FAST_WAKE_MS after the last.

A thread that faults sleeps until the handler's UFFDIO_COPY wakes it. If its CPU went
idle meanwhile, a virtual machine has halted that CPU, and the wake-up costs ~100 us
(measured here: the bare C round trip across CPUs, 96 us p50, is 15 us with the
request held). Zero latency makes idle CPUs poll instead of halting: they burn cycles
meanwhile, which is why the request is dropped once faults stop. The device is root's;
elsewhere the handler goes on without it.
"""
import errno
import logging
import os
import struct
import time

from ufcram import config

log = logging.getLogger("ufcram.handler")
DEVICE = "/dev/cpu_dma_latency"
NO_CONSTRAINT = 2_000_000_000   # us: the kernel's default, PM_QOS_CPU_LATENCY_DEFAULT_VALUE


def poll_spinning(poller, spin_s, timeout_ms):
    """poller.poll(timeout_ms), but polled without sleeping for spin_s first: a thread
    that finds us asleep on another CPU waits for our wake-up (~100 us in a VM)."""
    deadline = time.perf_counter() + spin_s
    while True:
        events = poller.poll(0)
        if events or time.perf_counter() >= deadline:
            return events or poller.poll(timeout_ms)


class FastWake:
    def __init__(self, hold_ms=None, device=DEVICE):
        hold = config.get("UFCRAM_FAST_WAKE_MS") if hold_ms is None else hold_ms
        self.hold = hold / 1000
        self.fd = self._open(device) if hold else None
        self.until = 0.0      # monotonic time the request lapses; 0 while not held

    @staticmethod
    def _open(device):
        try:
            return os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            level = logging.DEBUG if e.errno in (errno.EACCES, errno.ENOENT, errno.EPERM) \
                else logging.WARNING
            log.log(level, "no fast wake-ups (%s: %s); faults on idle CPUs wake slowly",
                    device, e.strerror)
            return None

    @property
    def available(self):
        return self.fd is not None

    def fault(self, now=None):
        """A fault arrived: hold the request (again) for the hold time from now."""
        if self.fd is None:
            return
        if not self.until:
            self._ask(0)
        self.until = (time.monotonic() if now is None else now) + self.hold

    def timeout(self, now):
        """Seconds until the request lapses (None while not held)."""
        return max(0.0, self.until - now) if self.until else None

    def expire(self, now):
        """Drop the request once no fault has come for the hold time."""
        if self.until and now >= self.until:
            self._ask(NO_CONSTRAINT)
            self.until = 0.0

    def _ask(self, latency_us):
        os.write(self.fd, struct.pack("i", latency_us))

    def close(self):
        if self.fd is not None:
            os.close(self.fd)   # closing removes the request
            self.fd = None
            self.until = 0.0

    def __enter__(self):
        """Hold the request for a whole block (the bench's kernel side, for a like
        machine state on both sides)."""
        if self.fd is not None:
            self._ask(0)
            self.until = float("inf")
        return self

    def __exit__(self, *exc):
        self.close()
