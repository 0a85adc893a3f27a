"""`ufcram run`: an unmodified program on compressed memory, through the preload library
and a node (its own, or a running one), then a one-screen summary of what the node did.
"""
import importlib.util
import os
import re
import signal
import sys
import tempfile
import threading
import time

from .errors import UfcramError
from .node import Node
from .reach import unreachable

PAGE = 4096
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text):
    """Bytes from '64M', '1G', '4096' (binary units, as zramctl and cgroups)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise UfcramError(f"{text!r} is not a size (e.g. 4096, 512K, 64M, 2G)")
    return int(m[1]) * UNITS[m[2].upper()]


def budget(text):
    if text == "auto":
        return text
    if not text.isdigit():
        raise UfcramError(f"write budget {text!r}: a number of pages or 'auto'")
    return text


def preload_library():
    spec = importlib.util.find_spec("ufcram._preload")
    if spec is None or not spec.origin:
        raise UfcramError("the preload library is not built: reinstall ufcram "
                          "(pip install -e .) with a C compiler present")
    return spec.origin


def program_environment(args, node_path):
    """The program's environment: ours with the preload library put first in LD_PRELOAD
    (what was there stays) and the settings the library reads."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [preload_library(), env.get("LD_PRELOAD")]))
    env["UFCRAM_NODE"] = os.fspath(node_path)
    for name, value in (("UFCRAM_RESIDENT_LIMIT", args.resident_limit),
                        ("UFCRAM_WRITE_BUDGET", args.write_budget),
                        ("UFCRAM_THRESHOLD", args.threshold)):
        if value is not None:
            env[name] = str(value)
    return env


class Sampler(threading.Thread):
    """Peaks the end-of-run totals cannot show (the pool is empty once the program has
    gone): node use, pages held for clients, the compression ratio at that time, and the
    program's RSS high-water mark. (wait4's ru_maxrss would do for the last, but it also
    counts our own memory, which the program shared until its exec.)"""

    def __init__(self, node, interval=0.05):
        super().__init__(daemon=True)
        self.node, self.interval = node, interval
        self.pid = None
        self.stop = threading.Event()
        self.peak = {"held_pages": 0, "pool_bytes": 0, "stored_pages": 0, "compr_bytes": 0,
                     "rss": 0}

    def run(self):
        while not self.stop.wait(self.interval):
            try:
                self.sample(self.node.stats(summary=True))
            except UfcramError:
                return
            self.peak["rss"] = max(self.peak["rss"], high_water_rss(self.pid))

    def sample(self, s):
        held = s["demoted_pages"]
        peak = self.peak
        peak["held_pages"] = max(peak["held_pages"], held)
        peak["pool_bytes"] = max(peak["pool_bytes"], s["mem_used_total"])
        if s["pages_stored"] > peak["stored_pages"]:   # the ratio when the most was held
            peak.update(stored_pages=s["pages_stored"], compr_bytes=s["compr_data_size"])


def high_water_rss(pid):
    """VmHWM of a process in bytes (0 once it has gone, or before its exec)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, TypeError, ValueError):
        pass
    return 0


def mib(n):
    return f"{n / (1 << 20):.1f} MiB"


def summary(argv, status, seconds, gone, peak):
    """The lines printed after the program ends (on stderr: stdout is the program's)."""
    name = os.path.basename(argv[0])
    how = (f"exited with status {os.waitstatus_to_exitcode(status)}" if os.WIFEXITED(status)
           else f"was killed by signal {os.WTERMSIG(status)} "
                f"({signal.Signals(os.WTERMSIG(status)).name})")
    ratio = (f"{peak['stored_pages'] * PAGE / peak['compr_bytes']:.2f}"
             if peak["compr_bytes"] else "n/a (nothing compressed was held at a sample)")
    rss = peak["rss"]
    held = peak["held_pages"] * PAGE
    return "\n".join([
        f"ufcram run: {name} {how} after {seconds:.2f} s",
        f"  demoted {gone.get('demotions', 0)} pages, restored {gone.get('restores', 0)}, "
        f"clean re-demotions {gone.get('clean_redemotions', 0)}, "
        f"promotions {gone.get('promotions', 0)}, faults {gone.get('faults', 0)}",
        f"  compression ratio {ratio}; pool peak {mib(peak['pool_bytes'])}",
        f"  peak RSS {mib(rss)} (sampled); without ufcram about {mib(rss + held)} "
        f"({mib(held)} held on the node at its peak)",
    ])


def departed_since(node, before, timeout=5.0):
    """What the clients that left since `before` did: the program and whatever it started
    (on a shared node, others that left meanwhile too). The handler may not have seen
    the program's socket close yet when we ask: wait for it, briefly."""
    deadline = time.monotonic() + timeout
    while True:
        now = node.stats()
        if now["clients"] <= before["clients"] or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return {k: v - before["departed"][k] for k, v in now["departed"].items()}


def start_node(args):
    """The node the program joins, observed from here (no client of it): a running one
    (--node), or a private one whose socket lives in a private directory for the length
    of the run."""
    if args.node:
        return Node.connect(args.node, observe=True), args.node, None
    tmp = tempfile.TemporaryDirectory(prefix="ufcram-run-")
    path = os.path.join(tmp.name, "node.sock")
    return Node(capacity=args.capacity, path=path, observe=True), path, tmp


def check_reach(argv0, strict):
    """None if the program may run, else the exit status: one line on stderr for a
    program the preload library cannot enter; with --strict it is not run."""
    why = unreachable(argv0)
    if why is None:
        return None
    if strict:
        print(f"ufcram run: {why}; not run (--strict)", file=sys.stderr)
        return 2
    print(f"ufcram run: {why}; it runs unmanaged, on plain memory", file=sys.stderr)
    return None


def main(args):
    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not argv:
        raise UfcramError("ufcram run: no program given (ufcram run [options] -- cmd args...)")
    refused = check_reach(argv[0], args.strict)
    if refused is not None:
        return refused
    node, path, tmp = start_node(args)
    try:
        env = program_environment(args, path)
        before = node.stats()
        sampler = Sampler(node)
        sampler.start()
        started = time.monotonic()
        # like time(1): a Ctrl-C or quit at the terminal is the program's to act on
        old = [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT)]
        try:
            pid = sampler.pid = os.posix_spawnp(argv[0], argv, env)
        except OSError as e:
            raise UfcramError(f"ufcram run: cannot run {argv[0]}: {e.strerror}") from None
        try:
            _, status = os.waitpid(pid, 0)
        finally:
            for s, handler in zip((signal.SIGINT, signal.SIGQUIT), old):
                signal.signal(s, handler)
        seconds = time.monotonic() - started
        sampler.stop.set()
        sampler.join()
        gone = departed_since(node, before)
        if not args.quiet:
            print(summary(argv, status, seconds, gone, sampler.peak), file=sys.stderr)
    finally:
        node.close()
        if tmp is not None:
            tmp.cleanup()
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
