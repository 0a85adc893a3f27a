"""`ufcram run`: an unmodified program on compressed memory, through the preload library
and a node (its own, or a running one), then a one-screen summary of what the node did.
"""
import contextlib
import importlib.util
import os
import re
import signal
import sys
import tempfile
import threading
import time

from ufcram.errors import UfcramError
from .reach import unreachable

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# passed on to the program when a process sends them to `ufcram run` (forward_until_exit)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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
    # every process of the program's tree joins with this group, which the resident
    # limit holds for as a whole (as a cgroup's memory.max does)
    env["UFCRAM_GROUP"] = str(int.from_bytes(os.urandom(8), "little") | 1)
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

    def finish(self):
        """Stop sampling (again: harmless)."""
        self.stop.set()
        if self.is_alive():
            self.join()

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
    from ufcram.store.pagetable import PAGE_SIZE as PAGE   # numpy: imported late, as in main()
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


def start_node(args, stack):
    """The node the program joins, observed from here (no client of it): a running one
    (--node), or a private one whose socket lives in a private directory for the length
    of the run. Its closing, and the directory's removal, are pushed onto `stack`."""
    # Imported only now, with the terminating signals blocked (main): numpy starts
    # threads when imported (OpenBLAS), they inherit the mask then, and one that did not
    # block them would take those signals whenever main is not in sigtimedwait.
    from ufcram.app.node import Node
    if args.node:
        node, path = Node.connect(args.node, observe=True), args.node
    else:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ufcram-run-"))
        path = os.path.join(tmp, "node.sock")
        node = Node(capacity=args.capacity, path=path, observe=True)
    stack.callback(node.close)
    return node, path


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


def forward_until_exit(pid, signals):
    """Wait for the program, passing on to it those of `signals` that a process sent us
    (kill, sigqueue: si_code <= 0). The kernel's, such as a terminal's Ctrl-C, went to
    the whole foreground process group, the program included: passing them on would
    deliver them twice. The signals (and SIGCHLD) are blocked: sigtimedwait takes them."""
    wanted = [*signals, signal.SIGCHLD]
    while True:
        info = signal.sigtimedwait(wanted, 1.0)   # the timeout: in case a SIGCHLD is lost
        if info is not None and info.si_signo != signal.SIGCHLD and info.si_code <= 0:
            os.kill(pid, info.si_signo)   # not reaped yet: the pid is still the program's
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status


def main(args):
    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not argv:
        raise UfcramError("ufcram run: no program given (ufcram run [options] -- cmd args...)")
    refused = check_reach(argv[0], args.strict)
    if refused is not None:
        return refused
    # From here to the end, the terminating signals are blocked and taken only by
    # sigtimedwait: whenever one comes, the cleanup on the way out (the node, its private
    # directory) still runs. The node's handler, started next, inherits the mask: a
    # SIGHUP or SIGTERM sent to the whole process group (a hung-up terminal, a service
    # manager) leaves the program's memory served while the program acts on it, and the
    # handler leaves with its last client, as it does on SIGINT. Ignored ones stay
    # ignored, for the program too (nohup).
    caught = [s for s in FORWARDED if signal.getsignal(s) != signal.SIG_IGN]
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [*caught, signal.SIGCHLD])
    with contextlib.ExitStack() as stack:
        stack.callback(restore_signals, caught, mask)   # last, after the cleanup
        node, path = start_node(args, stack)
        env = program_environment(args, path)
        before = node.stats()
        early = signal.sigtimedwait(caught, 0)
        if early is not None:   # asked to stop before the program started: it does not
            return 128 + early.si_signo
        sampler = Sampler(node)
        sampler.start()
        stack.callback(sampler.finish)   # before the node closes
        # like time(1): quitting at the terminal is the program's to act on (SIGQUIT is
        # not passed on: the terminal sends it to the program too)
        quit_was = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        stack.callback(signal.signal, signal.SIGQUIT, quit_was)
        # the program gets our mask and dispositions as we got them: Python ignores
        # SIGPIPE and SIGXFSZ (subprocess restores them likewise), we ignore SIGQUIT
        defaults = [signal.SIGPIPE, signal.SIGXFSZ]
        if quit_was != signal.SIG_IGN:
            defaults.append(signal.SIGQUIT)
        started = time.monotonic()
        try:
            pid = sampler.pid = os.posix_spawnp(argv[0], argv, env, setsigmask=mask,
                                                setsigdef=defaults)
        except OSError as e:
            raise UfcramError(f"ufcram run: cannot run {argv[0]}: {e.strerror}") from None
        status = forward_until_exit(pid, caught)
        seconds = time.monotonic() - started
        sampler.finish()
        gone = departed_since(node, before)
        if not args.quiet:
            print(summary(argv, status, seconds, gone, sampler.peak), file=sys.stderr)
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def restore_signals(caught, mask):
    """Drop the signals that came after the program ended (it is gone; we are leaving
    anyway), then unblock."""
    while signal.sigtimedwait(caught, 0) is not None:
        pass
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
