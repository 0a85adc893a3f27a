"""What `ufcram bench` runs on each side: the data, the workloads and their timing,
and the child process each side runs in. Shared by ufcram and the kernel zram side.
"""
import ctypes
import json
import os
import select
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np

from ufcram.store.pagetable import PAGE_SIZE
MiB = 1 << 20
CHUNK = 4096          # accesses per timed chunk; progress is printed between chunks
REDEMOTE_ROUNDS = 3
FILL_PAGES = 256      # pages of data generated at a time, so no copy of it stays resident
WORKLOADS = ("seq_scan", "random_read", "hot_mix", "random_write", "redemote")
TITLES = {"seq_scan": "sequential scan", "random_read": "random read",
          "hot_mix": "hot-set mix (90/10, 10% writes)", "random_write": "random write",
          "redemote": "re-demotion of clean pages"}


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Plan:
    """Sizes and seed of one run; both sides get the same one, hence the same data and
    the same access sequences."""
    pages: int            # working set
    limit_pages: int      # resident limit (ufcram) = cgroup memory limit (zram)
    seed: int = 6

    @property
    def nbytes(self):
        return self.pages * PAGE_SIZE

    @property
    def limit_bytes(self):
        return self.limit_pages * PAGE_SIZE

    def to_json(self):
        return asdict(self)


# --- data -----------------------------------------------------------------------------
def _text_blob(seed):
    rng = np.random.default_rng(seed)
    words = np.array("the of and to in is that for it as was with be by on not this are "
                     "error warning info debug request user id status ok failed".split())
    lines = [f"{i:08d} {' '.join(rng.choice(words, rng.integers(3, 10)))} "
             f"v={rng.integers(0, 1 << 20)}\n" for i in range(2000)]
    return np.frombuffer("".join(lines).encode(), np.uint8)


def data_pages(plan, first, n, blob):
    """Pages [first, first + n) of the working set: a mix shaped like real memory (zero
    pages, log text, counters, a rounded signal, some noise), the same on both sides."""
    rng = np.random.default_rng([plan.seed, first])
    kind = rng.choice(5, n, p=[0.15, 0.35, 0.25, 0.15, 0.10])
    pages = np.zeros((n, PAGE_SIZE), np.uint8)
    text = np.flatnonzero(kind == 1)
    starts = rng.integers(0, len(blob) - PAGE_SIZE, len(text))
    pages[text] = np.lib.stride_tricks.sliding_window_view(blob, PAGE_SIZE)[starts]
    ints = kind == 2
    pages.view(np.int32)[ints] = np.cumsum(rng.integers(0, 3, (ints.sum(), PAGE_SIZE // 4)),
                                           axis=1, dtype=np.int32)
    sig = kind == 3
    wave = np.sin(np.outer(rng.uniform(1, 9, sig.sum()), np.arange(PAGE_SIZE // 8) / 64))
    pages.view(np.float64)[sig] = np.round(wave, 2)
    noise = kind == 4
    pages[noise] = rng.integers(0, 256, (noise.sum(), PAGE_SIZE), dtype=np.uint8)
    return pages


def fill(plan, array):
    blob = _text_blob(plan.seed)
    for first in range(0, plan.pages, FILL_PAGES):
        n = min(FILL_PAGES, plan.pages - first)
        array[first:first + n] = data_pages(plan, first, n, blob)


# --- access sequences -------------------------------------------------------------------
def byte_of(pages):
    """One byte per accessed page, at an offset that varies with the page."""
    return pages * PAGE_SIZE + (pages * 67) % PAGE_SIZE


def sequences(plan):
    """(byte indices, write mask or None) per access workload, made before anything is
    measured so that their memory is in both sides' baselines."""
    rng = np.random.default_rng(plan.seed + 1)
    n = plan.pages
    hot = rng.choice(n, max(1, n // 10), replace=False)
    is_hot = rng.random(n) < 0.9
    mix = np.where(is_hot, hot[rng.integers(0, len(hot), n)], rng.integers(0, n, n))
    return {"seq_scan": (byte_of(np.arange(n)), None),
            "random_read": (byte_of(rng.integers(0, n, n)), None),
            "hot_mix": (byte_of(mix), rng.random(n) < 0.1),
            "random_write": (byte_of(rng.integers(0, n, n)), np.ones(n, bool))}


def timed_accesses(mem, addrs, writes, lat, progress):
    """Touch mem[addrs[k]] (a write where writes[k]) one at a time, timing each access
    into lat[k] (ns). Returns the sum of the bytes read: the same on both sides."""
    clock, total = time.perf_counter_ns, 0
    for start in range(0, len(addrs), CHUNK):
        idx = addrs[start:start + CHUNK].tolist()
        wr = [False] * len(idx) if writes is None else writes[start:start + CHUNK].tolist()
        times = [0] * len(idx)
        prev = clock()
        for k, (i, w) in enumerate(zip(idx, wr)):
            if w:
                mem[i] = (start + k) & 0xFF
            else:
                total += mem[i]
            now = clock()
            times[k] = now - prev
            prev = now
        lat[start:start + len(idx)] = times
        progress(start + len(idx), len(addrs))
    return total


def timed_pages(mem, first, n, write):
    """Read (or write) one byte of each page in [first, first + n): a bulk touch."""
    addrs = byte_of(np.arange(first, first + n)).tolist()
    if write:
        for k, i in enumerate(addrs):
            mem[i] = k & 0xFF
    else:
        sum(mem[i] for i in addrs)


# --- running the workloads ---------------------------------------------------------------
def access_result(side, lat, n, checksum, before):
    elapsed = float(lat[:n].sum()) / 1e9
    p50, p99 = np.percentile(lat[:n], [50, 99]) / 1e3
    moved = side.moved(before)
    return {"accesses": n, "elapsed_s": elapsed, "pages_per_s": n / elapsed,
            "p50_us": float(p50), "p99_us": float(p99), "checksum": checksum, **moved,
            # all the time spent, hits included, per page brought back
            "us_per_swapin": elapsed * 1e6 / moved["swapins"] if moved["swapins"] else None,
            **side.footprint()}


def demote_step(side, first, n):
    """Demote pages [first, first + n) once, timed: (pages demoted, seconds)."""
    before = side.counters()
    t0 = time.perf_counter()
    side.demote(first, n)
    elapsed = time.perf_counter() - t0
    return side.moved(before)["swapouts"], elapsed


def redemote_round(side, n):
    """Dirty pages demoted (compressed) first, then the same pages, read back and still
    clean, demoted again: ((pages, seconds) first, (pages, seconds) again)."""
    timed_pages(side.mem, 0, n, write=True)
    first = demote_step(side, 0, n)
    timed_pages(side.mem, 0, n, write=False)
    return first, demote_step(side, 0, n)


def _per_page(steps):
    pages, seconds = (sum(x) for x in zip(*steps))
    return {"pages": pages, "elapsed_s": seconds,
            "us_per_page": seconds * 1e6 / pages if pages else None}


def redemote(side, plan):
    """Re-demotion of clean pages against first demotion, summed over a few rounds (one
    round is a few ms: one load spike would decide it). On ufcram the second should cost
    next to nothing: the node still holds the pages."""
    n = max(1, plan.limit_pages // 2)
    before = side.counters()
    rounds = [redemote_round(side, n) for _ in range(REDEMOTE_ROUNDS)]
    first, again = _per_page([r[0] for r in rounds]), _per_page([r[1] for r in rounds])
    cost = first["us_per_page"] / again["us_per_page"] if again["pages"] and first["pages"] \
        else None
    return {"pages": n, "rounds": REDEMOTE_ROUNDS, "elapsed_s": again["elapsed_s"],
            "pages_per_s": again["pages"] / again["elapsed_s"], "first": first,
            "again": again, "cost_ratio": cost, **side.moved(before), **side.footprint()}


def run_workloads(side, plan, seqs, lat):
    """Every workload on one side, in order; a dict of results by workload."""
    progress = Progress(side.name)
    t0 = time.perf_counter()
    progress.say("fill")
    fill(plan, side.array)
    results = {"fill_s": time.perf_counter() - t0}
    for name in WORKLOADS[:-1]:
        addrs, writes = seqs[name]
        before = side.counters()
        checksum = timed_accesses(side.mem, addrs, writes, lat,
                                  lambda done, total: progress.say(name, done, total))
        results[name] = access_result(side, lat, len(addrs), checksum, before)
    progress.say("redemote")
    results["redemote"] = redemote(side, plan)
    progress.done()
    return results


class Progress:
    """One progress line on stderr: rewritten in place on a terminal, else a line per
    step (logs stay readable)."""

    def __init__(self, side):
        self.side = side
        self.tty = sys.stderr.isatty()
        self.last = None

    def say(self, step, done=None, total=None):
        line = f"bench: {self.side}: {TITLES.get(step, step)}"
        if self.tty:
            count = "" if done is None else f" {done}/{total}"
            sys.stderr.write(f"\r{line + count:<72}")
        elif step != self.last:
            sys.stderr.write(line + ("" if total is None else f" ({total} accesses)") + "\n")
        self.last = step
        sys.stderr.flush()

    def done(self):
        if self.tty:
            sys.stderr.write("\r" + " " * 72 + "\r")
            sys.stderr.flush()


def footprint_of(resident, store_used, store_orig):
    """Memory the data costs on one side: what stays resident plus the compressed store."""
    return {"footprint_bytes": resident + store_used, "resident_bytes": resident,
            "store_bytes": store_used, "store_orig_bytes": store_orig,
            "comp_ratio": store_orig / store_used if store_used else None}


def trim():
    """Give freed heap back to the kernel: glibc keeps what the data generator freed,
    which would otherwise count as footprint (RSS, cgroup charge) on both sides."""
    ctypes.CDLL(None).malloc_trim(0)


def anon_rss():
    """This process's anonymous + shared-memory RSS: the memory a cgroup charges it for.
    File pages (libraries) are left out, as the cgroup charged them to whoever read them."""
    trim()
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem"))


# --- the child process ---------------------------------------------------------------
def in_child(fn, *args, timeout):
    """fn(*args) in a forked child (fresh RSS, its own cgroup if fn moves it, and no
    other code of ours sharing a process with memory that may block); its JSON result.
    The child is killed if it overruns or this process is interrupted."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - child
        os.close(r)
        code = 0
        try:
            out = {"ok": fn(*args)}
        except BaseException:
            out, code = {"error": traceback.format_exc()}, 1
        try:
            with os.fdopen(w, "wb") as f:
                f.write(json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = _read_all(r, time.monotonic() + timeout)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not data:
        raise BenchError("the benchmark child died without a result")
    out = json.loads(data)
    if "error" in out:
        raise BenchError(f"the benchmark child failed:\n{out['error']}")
    return out["ok"]


def _read_all(fd, deadline):
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BenchError("the benchmark child did not finish in time")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
