"""The kernel side of `ufcram bench`: a zram (lz4) swap device and a memory cgroup whose
limit equals ufcram's resident limit, set up for one run and always torn down after it.
"""
import errno
import mmap
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from .work import (PAGE_SIZE, BenchError, footprint_of, in_child, run_workloads,
                         sequences, trim)

SWAP_PRIORITY = 32767      # the highest: the child must swap to our device, not another
CONTROL = "/sys/class/zram-control"
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)   # Linux 5.4+; Python 3.11 lacks the name
# zram's disksize is only a cap (memory is used as pages arrive); a cap close to the data
# made the cgroup OOM here with swap half full, so leave a wide margin
MIN_DISKSIZE = 512 << 20
MM_STAT = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
           "mem_used_max", "same_pages", "pages_compacted", "huge_pages")


class Unavailable(Exception):
    """The kernel side cannot run here; the message says why."""


def _read(path):
    with open(path) as f:
        return f.read().strip()


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def _run(*cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise Unavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")


def _swaps():
    """Device paths in /proc/swaps."""
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.readlines()[1:]]


def vmstat():
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


class Zram:
    """One zram device used as swap: zram0 if nobody uses it, else one we hot-add."""

    def __init__(self):
        self.name = None
        self.added = False

    @property
    def sys(self):
        return f"/sys/block/{self.name}"

    @property
    def dev(self):
        return f"/dev/{self.name}"

    def setup(self, disksize):
        if not os.path.isdir("/sys/block/zram0") and not os.path.isdir(CONTROL):
            _run("modprobe", "zram")
        self.name = self._free_device()
        offered = _read(f"{self.sys}/comp_algorithm").replace("[", "").replace("]", "").split()
        if "lz4" not in offered:
            raise Unavailable(f"zram offers no lz4 here (only {' '.join(offered)})")
        _write(f"{self.sys}/comp_algorithm", "lz4")
        _write(f"{self.sys}/disksize", disksize)
        for _ in range(50):   # a hot-added device's node appears in devtmpfs shortly
            if os.path.exists(self.dev):
                break
            time.sleep(0.02)
        _run("mkswap", self.dev)
        _run("swapon", "-p", str(SWAP_PRIORITY), self.dev)

    def _free_device(self):
        if os.path.isdir("/sys/block/zram0") and not self._in_use("zram0"):
            return "zram0"
        if not os.path.exists(f"{CONTROL}/hot_add"):
            raise Unavailable("zram0 is in use and zram-control/hot_add is missing")
        self.added = True
        return f"zram{int(_read(f'{CONTROL}/hot_add'))}"

    @staticmethod
    def _in_use(name):
        return int(_read(f"/sys/block/{name}/disksize")) != 0 or f"/dev/{name}" in _swaps()

    def mm_stat(self):
        return dict(zip(MM_STAT, map(int, _read(f"{self.sys}/mm_stat").split())))

    def teardown(self):
        """swapoff, reset, hot_remove what we added; a list of what failed."""
        if self.name is None:
            return []
        errors = []
        if self.dev in _swaps():
            done = subprocess.run(["swapoff", self.dev], capture_output=True, text=True)
            if done.returncode:
                errors.append(f"swapoff {self.dev}: {done.stderr.strip()}")
        steps = [(f"{self.sys}/reset", 1)]
        if self.added:
            steps.append((f"{CONTROL}/hot_remove", self.name[len("zram"):]))
        for path, value in steps:
            try:
                _write(path, value)
            except OSError as e:
                errors.append(f"{path}: {e}")
        return errors

    def gone(self):
        """Not swap any more, and empty (or removed)."""
        return self.name is None or (self.dev not in _swaps() and (
            not os.path.isdir(self.sys) or not self._in_use(self.name)))


class MemCgroup:
    """A memory cgroup of our own, v1 (memory.limit_in_bytes) or v2 (memory.max)."""
    V1 = {"root": "/sys/fs/cgroup/memory", "limit": "memory.limit_in_bytes",
          "usage": "memory.usage_in_bytes", "swap": "memory.memsw.limit_in_bytes",
          "events": "memory.oom_control", "unlimited": "-1"}
    V2 = {"root": "/sys/fs/cgroup", "limit": "memory.max", "usage": "memory.current",
          "swap": "memory.swap.max", "events": "memory.events", "unlimited": "max"}

    def __init__(self, files):
        self.files = files
        self.path = os.path.join(files["root"], f"ufcram-bench-{os.getpid()}")
        self.created = False

    @classmethod
    def detect(cls):
        if os.path.exists(os.path.join(cls.V1["root"], cls.V1["limit"])):
            return cls(cls.V1)
        try:
            if "memory" in _read("/sys/fs/cgroup/cgroup.subtree_control").split():
                return cls(cls.V2)
        except OSError:
            pass
        raise Unavailable("no memory cgroup: neither v1 /sys/fs/cgroup/memory nor v2 "
                          "with the memory controller enabled")

    def file(self, key):
        return os.path.join(self.path, self.files[key])

    def create(self):
        os.mkdir(self.path)
        self.created = True
        if os.path.exists(self.file("swap")):   # a swap limit must not stop swapping
            _write(self.file("swap"), self.files["unlimited"])

    def enter(self, pid):
        _write(os.path.join(self.path, "cgroup.procs"), pid)

    def usage(self):
        return int(_read(self.file("usage")))

    def set_limit(self, nbytes=None):
        _write(self.file("limit"), self.files["unlimited"] if nbytes is None else nbytes)

    def oom_kills(self):
        """How many processes the kernel OOM-killed in this cgroup so far."""
        lines = dict(line.split() for line in _read(self.file("events")).splitlines())
        return int(lines.get("oom_kill", 0))

    def remove(self):
        """rmdir, killing what is left inside (only our child can be); errors as a list."""
        if not self.created:
            return []
        for _ in range(100):
            try:
                os.rmdir(self.path)
                return []
            except FileNotFoundError:
                return []
            except OSError as e:
                if e.errno != errno.EBUSY:
                    return [f"rmdir {self.path}: {e}"]
                for pid in _read(os.path.join(self.path, "cgroup.procs")).split():
                    os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.05)
        return [f"rmdir {self.path}: still busy"]

    def gone(self):
        return not os.path.exists(self.path)


class KernelSide:
    """The workloads' view of plain anonymous memory swapped to zram by the cgroup."""
    name = "zram"

    def __init__(self, plan, zram, cgroup, usage0):
        self.zram, self.cgroup, self.usage0 = zram, cgroup, usage0
        self.mm = mmap.mmap(-1, plan.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mm.madvise(mmap.MADV_NOHUGEPAGE)   # as a ufcram region: page-sized swap
        self.array = np.frombuffer(self.mm, np.uint8).reshape(plan.pages, PAGE_SIZE)
        self.mem = memoryview(self.mm)

    def counters(self):
        v = vmstat()
        # every swap-in here is a major fault of this process; swap-outs are system-wide
        # counts, ours alone while nothing else swaps
        return {"in": resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
                "out": v.get("pswpout", 0) + v.get("swpout_zero", 0)}

    def moved(self, before):
        now = self.counters()
        return {"swapins": now["in"] - before["in"], "swapouts": now["out"] - before["out"]}

    def footprint(self):
        trim()
        stat = self.zram.mm_stat()
        return footprint_of(self.cgroup.usage() - self.usage0, stat["mem_used_total"],
                         stat["orig_data_size"])

    def demote(self, first, n):
        # the kernel's own "swap these out now", as region.demote() is ufcram's
        self.mm.madvise(MADV_PAGEOUT, first * PAGE_SIZE, n * PAGE_SIZE)

    def release(self):
        self.mem.release()
        self.array = self.mem = None
        self.mm.close()


def kernel_child(plan, zram, cgroup):
    cgroup.enter(os.getpid())   # before anything is allocated, so all of it is charged
    seqs, lat = sequences(plan), np.ones(plan.pages, np.int64)
    trim()
    usage0 = cgroup.usage()
    # the limit leaves the data exactly ufcram's resident limit on top of what this
    # process had charged before the working set existed
    cgroup.set_limit(usage0 + plan.limit_bytes)
    side = KernelSide(plan, zram, cgroup, usage0)
    try:
        results = run_workloads(side, plan, seqs, lat)
    finally:
        side.release()
    results.update(device=zram.name, cgroup=cgroup.path, baseline_charge_bytes=usage0,
                   cgroup_limit_bytes=usage0 + plan.limit_bytes)
    return results


def unavailable():
    """Why the kernel side cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root: setting up zram swap and a memory cgroup needs root"
    missing = [tool for tool in ("mkswap", "swapon", "swapoff") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH"
    try:
        MemCgroup.detect()
    except Unavailable as e:
        return str(e)
    return None


def teardown(zram, cgroup):
    """Undo everything, then check that it is undone."""
    errors = cgroup.remove() + zram.teardown()
    state = {"device": zram.name, "swap_removed": zram.gone(), "cgroup": cgroup.path,
             "cgroup_removed": cgroup.gone(), "errors": errors}
    state["clean"] = state["swap_removed"] and state["cgroup_removed"] and not errors
    if not state["clean"]:
        print(f"ufcram bench: TEARDOWN INCOMPLETE, check by hand: {state}", file=sys.stderr)
    return state


def measure(plan, timeout, attempts=3):
    """The kernel side's results, or {"skipped": why}; always with its teardown state
    when it set anything up."""
    reason = unavailable()
    if reason:
        return {"skipped": reason}
    zram, cgroup = Zram(), MemCgroup.detect()
    result = {}
    try:
        zram.setup(disksize=max(4 * plan.nbytes, MIN_DISKSIZE))
        cgroup.create()
        result = _run_with_retries(plan, zram, cgroup, timeout, attempts)
    except (Unavailable, OSError) as e:
        result = {"skipped": f"kernel side not set up: {e}"}
    finally:
        result["teardown"] = teardown(zram, cgroup)
    return result


def _run_with_retries(plan, zram, cgroup, timeout, attempts):
    """Under so small a limit the kernel now and then OOM-kills the child although swap is
    nearly empty (seen here about once in ten runs): run it again, and say so."""
    for _ in range(attempts):
        cgroup.set_limit(None)   # the next child sets its own, from its own baseline
        try:
            result = in_child(kernel_child, plan, zram, cgroup, timeout=timeout)
        except BenchError:
            if not cgroup.oom_kills():
                raise
            continue
        result["oom_kills"] = cgroup.oom_kills()
        return result
    return {"skipped": f"the kernel OOM-killed the zram child {cgroup.oom_kills()} times "
                       "under the cgroup limit, with swap free"}
