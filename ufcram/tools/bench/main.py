"""`ufcram bench`: the same workloads, on the same data, through ufcram and through
kernel zram (lz4) as swap under an equal cgroup memory limit, in one run, side by side.
"""
import contextlib
import json
import signal
import sys

import numpy as np
import psutil

from . import floor as bench_floor, report as bench_report, zram as bench_zram
from ufcram.handler.wakeup import FastWake
from .work import (MiB, PAGE_SIZE, BenchError, Plan, anon_rss, footprint_of, in_child,
                         run_workloads, sequences)
from ufcram.tools.check import report as report_check

DEFAULT_MIB = 128     # working set; the resident limit is a quarter of it
QUICK_MIB = 32
LIMIT_SHARE = 4       # working set / resident limit


class UfcramSide:
    """The workloads' view of a ufcram region: its memory and its node's counters."""
    name = "ufcram"

    def __init__(self, plan, node, region, rss0):
        self.node, self.region, self.rss0 = node, region, rss0
        self.array = region.array(np.uint8, (plan.pages, PAGE_SIZE))
        self.mem = memoryview(self.array.reshape(-1))

    def counters(self):
        return self.region.stats()

    def moved(self, before):
        now = self.counters()
        return {"swapins": now["restores"] - before["restores"],
                "swapouts": sum(now[k] - before[k] for k in ("demotions", "clean_redemotions"))}

    def footprint(self):
        pool = self.node.stats()
        return footprint_of(anon_rss() - self.rss0, pool["mem_used_total"],
                            pool["orig_data_size"])

    def demote(self, first, n):
        self.region.demote(first * PAGE_SIZE, n * PAGE_SIZE)

    def release(self):
        # no view may outlive the region, or closing it would restore every page
        self.mem.release()
        self.array = self.mem = None


def ufcram_child(plan):
    from ufcram.app.node import Node
    from ufcram.app.region import Region
    seqs, lat = sequences(plan), np.ones(plan.pages, np.int64)
    rss0 = anon_rss()
    # room for the whole working set, so the pool never overflows during the run
    with Node(capacity=plan.nbytes + plan.nbytes // 4 + 4 * MiB) as node:
        region = Region(plan.nbytes, node=node, resident_limit=plan.limit_bytes)
        side = UfcramSide(plan, node, region, rss0)
        try:
            results = run_workloads(side, plan, seqs, lat)
            results["handler_rss_bytes"] = psutil.Process(node.pid).memory_info().rss
        finally:
            side.release()
            region.close()
    return results


def plan_for(mib=None, quick=False):
    mib = mib or (QUICK_MIB if quick else DEFAULT_MIB)
    if mib < 1:
        raise BenchError(f"--mib must be at least 1, got {mib}")
    pages = mib * MiB // PAGE_SIZE
    return Plan(pages=pages, limit_pages=pages // LIMIT_SHARE)


def child_timeout(plan):
    """Generous: ~1 ms per page and workload would already be far slower than expected."""
    return 120 + plan.pages * 0.01


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM unwinds like Ctrl-C, so that every `finally` (swapoff, zram reset,
    cgroup removal, killing the child) runs."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def measure(plan):
    """Everything, as one JSON-able report."""
    faults = min(plan.pages, 8192)
    report = {"plan": plan.to_json(), "floor": bench_floor.measure(faults)}
    with sigterm_interrupts():
        report["ufcram"] = in_child(ufcram_child, plan, timeout=child_timeout(plan))
        # the request ufcram's handler holds while faults come, held for the kernel side
        # too: both sides then run on the same machine state
        with FastWake(hold_ms=1) as wake:
            report["fast_wake"] = wake.available
            if wake.available:
                report["floor_fast_wake"] = bench_floor.measure(faults)
            report["zram"] = bench_zram.measure(plan, timeout=child_timeout(plan))
    report["summary"] = bench_report.summarise(report)
    return report


def main(args):
    """The `ufcram bench` command; args: quick, json, plot, mib."""
    if args.plot and not bench_report.can_plot():
        print("ufcram bench: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    verdict = report_check()
    if not verdict["works"]:
        print(f"ufcram bench: {verdict['verdict']} (see `ufcram check`)", file=sys.stderr)
        return 1
    try:
        report = measure(plan_for(args.mib, args.quick))
    except BenchError as e:
        print(f"ufcram bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # the children are gone and the kernel side undone by now
        print("ufcram bench: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2) if args.json else bench_report.table(report))
    if args.plot:
        bench_report.plot(report, args.plot)
    return 0 if report["zram"].get("teardown", {}).get("clean", True) else 1
