"""No leaks: the handler's and the client's memory, descriptors and threads stay flat
across thousands of region cycles and hundreds of clients that come and go.

Each test warms up first (allocator pools, lazy imports, pool arenas), then measures,
repeats the cycle many times, and measures again.
"""
import gc
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

import ufcram
from ufcram import PAGE_SIZE, Region

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
RSS_SLACK = 8 * MiB


def footprint(pid):
    """(RSS bytes, open descriptors, threads) of a process."""
    proc = psutil.Process(pid)
    return proc.memory_info().rss, len(os.listdir(f"/proc/{pid}/fd")), proc.num_threads()


def settled(pid, expected, timeout=10.0):
    """The footprint of pid once its descriptors and threads are back to `expected`'s
    (a departing client is let go asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        now = footprint(pid)
        if now[1:] == expected[1:] or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def assert_flat(before, after, who):
    grew = after[0] - before[0]
    assert grew < RSS_SLACK, f"{who} RSS grew by {grew / MiB:.1f} MiB"
    assert after[1:] == before[1:], f"{who} (fds, threads) went from {before[1:]} to {after[1:]}"


def measured(node, cycle, warmup, repeats):
    """Run cycle warmup times, then repeats times; assert handler and client stay flat."""
    for i in range(warmup):
        cycle(i)
    handler = settled(node.pid, footprint(node.pid))
    client = settled(os.getpid(), footprint(os.getpid()))
    stored = node.stats()["pages_stored"]
    for i in range(repeats):
        cycle(warmup + i)
    assert_flat(handler, settled(node.pid, handler), "handler")
    assert_flat(client, settled(os.getpid(), client), "client")
    assert node.stats()["pages_stored"] == stored, "pool entries left behind"


def fill_demote_check(region, seed):
    """Random bytes in, demoted, and back exact."""
    a = region.array()
    data = np.random.default_rng(seed).integers(0, 256, region.nbytes, np.uint8)
    a[:] = data
    assert region.demote() == region.nbytes // PAGE_SIZE
    assert np.array_equal(a, data)
    del a


def test_region_cycles_leave_nothing_behind():
    with ufcram.Node(capacity=64 * MiB) as node:
        def cycle(i):
            with Region(64 * PAGE_SIZE, node=node) as r:
                fill_demote_check(r, i)
        measured(node, cycle, warmup=200, repeats=2000)


def test_clients_that_come_and_go_leave_nothing_behind(tmp_path):
    path = tmp_path / "n.sock"
    with ufcram.Node(capacity=64 * MiB, path=path) as node:
        def cycle(i):
            with ufcram.Node.connect(path) as other:
                with Region(16 * PAGE_SIZE, node=other) as r:
                    fill_demote_check(r, i)
        measured(node, cycle, warmup=30, repeats=300)


KILLED_CLIENT = textwrap.dedent("""
    import sys, numpy as np, ufcram
    node = ufcram.Node.connect(sys.argv[1])
    r = ufcram.Region(32 * 4096, node=node)
    r.array()[:] = 7
    r.demote()
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_killed_clients_leave_nothing_behind_in_the_handler(tmp_path):
    """Clients killed with their pages on the node: the handler reclaims everything."""
    path = tmp_path / "n.sock"
    with ufcram.Node(capacity=64 * MiB, path=path) as node:
        def cycle(_):
            p = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(path)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline() == "ready\n"
            p.kill()
            p.wait(10)
            p.stdin.close()
            p.stdout.close()
        measured(node, cycle, warmup=3, repeats=25)
