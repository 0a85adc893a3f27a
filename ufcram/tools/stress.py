"""Stress test of a shared node: processes and threads read, write, free, demote, fork
and move the node's capacity at random, each against a reference copy of its memory.

    python -m ufcram.stress [--minutes N] [--processes P] [--threads T] [--seed S] [--json]

Each worker process holds one region under a resident limit (eviction pressure). Its
threads own disjoint pages and read (comparing every byte with the reference), write
and free them; its main thread demotes random ranges, forks children that check they
read the parent's bytes, and changes the node's capacity. The report gives the
operations done and the wrong bytes found; the exit status is 1 if any byte was wrong
or any process failed or hung.
"""
import argparse
import collections
import faulthandler
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from ufcram.app.node import Node
from ufcram.store.pagetable import PAGE_SIZE
from ufcram.app.region import Region

KINDS = ("reads", "writes", "frees", "demotions", "forks", "capacity_changes")
PAGES = 256                      # per worker process
RESIDENT_LIMIT = PAGES // 4      # pages: most of the region lives on the node
CAPACITIES = (PAGES * PAGE_SIZE // 4, PAGES * PAGE_SIZE, 16 * PAGES * PAGE_SIZE)
BUDGETS = (0, 8, "auto")
GRACE = 60.0                     # seconds a worker may overrun before it counts as hung
CHILD_TIMEOUT = 20.0             # seconds a forked child may take to check its bytes


def page_content(rng):
    """Same-filled, compressible or random: the kinds of page real memory has."""
    kind = rng.integers(3)
    if kind == 0:
        return np.full(PAGE_SIZE, rng.integers(256), np.uint8)
    if kind == 1:
        return np.repeat(rng.integers(0, 256, 64, np.uint8), 64)
    return rng.integers(0, 256, PAGE_SIZE, np.uint8)


class Worker:
    """One process's region, its reference copy, and the tallies of its threads."""

    def __init__(self, node, threads, seed):
        self.rng = np.random.default_rng(seed)
        self.node = node
        self.region = Region(PAGES * PAGE_SIZE, node=node,
                             resident_limit=RESIDENT_LIMIT * PAGE_SIZE,
                             write_budget=BUDGETS[seed % len(BUDGETS)])
        self.a = self.region.array(np.uint8, (PAGES, PAGE_SIZE))
        self.ref = np.zeros((PAGES, PAGE_SIZE), np.uint8)
        # a thread holds its lock for one operation, so a fork sees a and ref agree
        self.locks = [threading.Lock() for _ in range(threads)]
        self.counts = collections.Counter()
        self.failures = []
        self.stop = threading.Event()

    def wrong(self, where, pages=None):
        """Bytes of pages (default: all) that differ from the reference; each bad
        page is also a failure that says where it was seen."""
        pages = np.arange(PAGES) if pages is None else np.atleast_1d(pages)
        per_page = np.count_nonzero(self.a[pages] != self.ref[pages], axis=1)
        for page, count in zip(pages[per_page > 0].tolist(), per_page[per_page > 0].tolist()):
            self.failures.append(f"pid {os.getpid()}: {where}: page {page} has {count} "
                                 "wrong bytes")
        return int(per_page.sum())

    # --- the threads: disjoint pages each ------------------------------------------
    def thread(self, t, seed):
        rng = np.random.default_rng(seed)
        mine = np.arange(t, PAGES, len(self.locks))
        counts = collections.Counter()
        try:
            while not self.stop.is_set():
                with self.locks[t]:
                    self.operate(rng, int(rng.choice(mine)), counts)
        except Exception as e:   # a thread's death must fail the run, not go unseen
            self.failures.append(f"pid {os.getpid()}: thread {t}: {e!r}")
        with self.locks[t]:
            self.counts.update(counts)

    def operate(self, rng, page, counts):
        op = rng.integers(10)
        if op < 5:
            counts["reads"] += 1
            counts["wrong_bytes"] += self.wrong("read", page)
        elif op < 9:
            counts["writes"] += 1
            if op == 8:
                self.ref[page] = page_content(rng)
                self.a[page] = self.ref[page]
            else:
                lo = int(rng.integers(0, PAGE_SIZE - 64))
                chunk = page_content(rng)[:int(rng.integers(1, 64))]
                self.a[page, lo:lo + len(chunk)] = chunk
                self.ref[page, lo:lo + len(chunk)] = chunk
        else:
            counts["frees"] += 1     # zeros from now on
            self.region._mm.madvise(mmap.MADV_DONTNEED, page * PAGE_SIZE, PAGE_SIZE)
            self.ref[page] = 0

    # --- the main thread: demotions, forks, capacity ----------------------------------
    def control(self, deadline):
        while time.monotonic() < deadline:
            choice = self.rng.integers(20)
            if choice == 0:
                self.fork_and_check()
            elif choice == 1:
                self.node.set_capacity(int(self.rng.choice(CAPACITIES)))
                self.counts["capacity_changes"] += 1
            else:
                first = int(self.rng.integers(PAGES))
                count = int(self.rng.integers(1, PAGES - first + 1))
                self.region.demote(first * PAGE_SIZE, count * PAGE_SIZE)
                self.counts["demotions"] += 1
            time.sleep(0.002)

    def fork_and_check(self):
        """A child must read exactly the parent's bytes as of the fork, and keep its
        own writes; it reports its wrong bytes through a pipe."""
        r, w = os.pipe()
        for lock in self.locks:
            lock.acquire()
        try:
            pid = os.fork()
            if pid == 0:   # the child: no locks, no printing, no node requests
                os.close(r)
                os.write(w, self.child_check().encode())
                os._exit(0)
        finally:
            if pid != 0:
                for lock in self.locks:
                    lock.release()
        os.close(w)
        self.counts["forks"] += 1
        self.collect_child(pid, r)

    def child_check(self):
        """'wrong bytes, first wrong page or -1', then, for that page, what the child
        saw and what it should have (a byte of each of its first 16 runs of 64, and its
        zero bytes), so a failure says whether the child read zeros, an older page or
        another one."""
        mapped = pagemap(self.a)   # before any read faults a page in
        differs = self.a != self.ref
        bad = np.flatnonzero(differs.any(axis=1))
        wrong = int(np.count_nonzero(differs))
        saw = self.a[bad[0]].copy() if len(bad) else None   # before the write below
        page = PAGES // 2
        self.a[page] = self.ref[page] = 0x5A   # the child's write stays its own
        if not np.array_equal(self.a[page], self.ref[page]):
            wrong, bad = wrong + PAGE_SIZE, np.append(bad, page)
        if not len(bad):
            return f"{wrong} -1"
        first = int(bad[0])
        saw = self.a[first] if saw is None else saw
        want = self.ref[first]
        return (f"{wrong} {first} saw {saw[::64][:16].tobytes().hex()} "
                f"({np.count_nonzero(saw == 0)} zero bytes), want "
                f"{want[::64][:16].tobytes().hex()} ({np.count_nonzero(want == 0)} zero "
                f"bytes); the child's page was {describe_pte(mapped[first])} before it read")

    def collect_child(self, pid, r):
        ready, _, _ = select.select([r], [], [], CHILD_TIMEOUT)
        answer = os.read(r, 1024) if ready else b""
        os.close(r)
        if not answer:
            self.failures.append(f"pid {os.getpid()}: its forked child never answered "
                                 f"({threads_in_faults(pid)} threads waiting in a userfault)")
            os.kill(pid, signal.SIGUSR1)   # its stack, on the stderr it inherited
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
        else:
            wrong, page, *seen = answer.decode().split(maxsplit=2)
            self.counts["wrong_bytes"] += int(wrong)
            if int(wrong):
                self.failures.append(f"pid {os.getpid()}: forked child: {wrong} wrong "
                                     f"bytes, first on page {page} ({' '.join(seen)}); "
                                     f"{self.parent_page(int(page))}")
        os.waitpid(pid, 0)

    def parent_page(self, page):
        """Whether the parent's own copy of a page its child read wrong is right: tells a
        bad page inherited at fork from one the child's books gave it."""
        if page < 0:
            return ""
        with self.locks[page % len(self.locks)]:
            pte = describe_pte(pagemap(self.a)[page])
            right = np.array_equal(self.a[page], self.ref[page])
        return f"the parent's page was {pte} and reads {'right' if right else 'WRONG'}"

    def finish(self, workers):
        self.stop.set()
        for t in workers:
            t.join(CHILD_TIMEOUT)
            if t.is_alive():
                self.failures.append(f"pid {os.getpid()}: a thread never finished")
                return
        self.counts["wrong_bytes"] += self.wrong("final check")
        stats = self.region.stats()
        if stats["demoting"] or sum(stats[k] for k in ("untouched", "normal", "demoted",
                                                       "readonly", "writable")) != PAGES:
            self.failures.append(f"pid {os.getpid()}: inconsistent page states {stats}")
        self.counts["pages_demoted"] += stats["demotions"]
        self.counts["restores"] += stats["restores"]


def work(path, seconds, threads, seed):
    """One worker process; returns its report."""
    node = Node.connect(path)
    w = Worker(node, threads, seed)
    workers = [threading.Thread(target=w.thread, args=(t, seed * 100 + t), daemon=True)
               for t in range(threads)]
    for t in workers:
        t.start()
    try:
        w.control(time.monotonic() + seconds)
    finally:
        w.finish(workers)
    if not w.failures:   # a stuck thread would fault forever on a released region
        del w.a
        w.region.close()
        node.close()
    return {"counts": dict(w.counts), "failures": w.failures}


def pagemap(a):
    """The kernel's page-table entry for each page of array a (/proc/self/pagemap)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(a.ctypes.data // PAGE_SIZE * 8)
        return np.frombuffer(f.read(len(a) * 8), np.uint64)


def describe_pte(entry):
    bits = {63: "present", 62: "swapped", 57: "uffd-wp", 56: "exclusive"}
    return "+".join(name for bit, name in bits.items() if int(entry) >> bit & 1) or "absent"


# --- the coordinator -----------------------------------------------------------------------
def run(minutes, processes, threads, seed):
    """Start a node and the worker processes; returns the combined report."""
    seconds = minutes * 60
    with tempfile.TemporaryDirectory(prefix="ufcram-stress-") as tmp:
        path = os.path.join(tmp, "node.sock")
        with Node(capacity=CAPACITIES[1], path=path) as node:
            procs = [subprocess.Popen(
                [sys.executable, "-m", "ufcram.tools.stress", "--worker", path, "--seconds",
                 str(seconds), "--threads", str(threads), "--seed", str(seed * 1000 + i)],
                stdout=subprocess.PIPE, text=True) for i in range(processes)]
            reports = [collect(p, seconds + GRACE) for p in procs]
            if node.process.poll() is not None:
                reports.append({"failures": ["the handler died"]})
    return combine(reports)


def collect(proc, timeout):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        blocked = threads_in_faults(proc.pid)
        proc.send_signal(signal.SIGUSR1)   # its stacks, on its stderr
        time.sleep(1)
        proc.kill()
        proc.communicate()
        return {"failures": [f"worker pid {proc.pid} hung ({blocked} threads waiting in "
                             "a userfault)"]}
    if proc.returncode != 0 or not out.strip():
        return {"failures": [f"worker pid {proc.pid} exited with {proc.returncode}"]}
    return json.loads(out.strip().splitlines()[-1])


def threads_in_faults(pid):
    """How many threads of pid the kernel holds in handle_userfault right now."""
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                count += f.read() == "handle_userfault"
        except OSError:
            pass
    return count


def combine(reports):
    counts = collections.Counter()
    failures = []
    for report in reports:
        counts.update(report.get("counts", {}))
        failures += report["failures"]
    return {"ops": {k: counts[k] for k in KINDS},
            "pages_demoted": counts["pages_demoted"], "restores": counts["restores"],
            "wrong_bytes": counts["wrong_bytes"], "failures": failures}


def describe(report):
    lines = [f"{kind:>17}: {report['ops'][kind]}" for kind in KINDS]
    lines += [f"{'pages demoted':>17}: {report['pages_demoted']}",
              f"{'restores':>17}: {report['restores']}",
              f"{'wrong bytes':>17}: {report['wrong_bytes']}"]
    lines += [f"FAILURE: {f}" for f in report["failures"]]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ufcram.stress",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--worker", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        # a hung worker shows where: faulthandler dumps even a thread holding the GIL
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        report = work(args.worker, args.seconds, args.threads, args.seed)
        print(json.dumps(report), flush=True)
        return 0
    report = run(args.minutes, args.processes, args.threads, args.seed)
    print(json.dumps(report) if args.json else describe(report), flush=True)
    return 1 if report["wrong_bytes"] or report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
