"""Runs a program plainly or under `ufcram run` while sampling its process tree's anonymous
memory from /proc: the measure and the bound of issue 14's acceptance (test_programs.py).

The figure is the sum of Pss_Anon (/proc/PID/smaps_rollup) over the program and every
process it starts, sampled every 20 ms: its anonymous resident memory, each page counted
once, as a cgroup charges it. The sum of RssAnon (/proc/PID/status) is sampled alongside
and printed: it counts a page a fork shares in every process that maps it (redis's
BGSAVE child doubles it, 214 MiB for a 107 MiB dataset, in the plain run too). Under
`ufcram run` the launcher itself and the handler (`python -m ufcram.handler`) are left
out: they are ufcram's, not the program's.
"""
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ufcram.tools.run import size

from .launch import environment

MiB = 1 << 20
HANDLER = b"ufcram.handler"
INTERVAL = 0.02
# where ./dev test says why it could not install a program (see install_programs there)
INSTALL_LOG = Path(sys.prefix) / "programs-install.log"


def bound(limit):
    """The most the tree may hold under `--resident-limit limit`: L + 25% + 16 MiB."""
    n = size(limit)
    return n + n // 4 + 16 * MiB


def mib(n):
    return f"{n / MiB:.1f} MiB"


def need(program):
    """The path of a program from the distribution, or a skip that says why it is missing."""
    # memtester lives in /usr/sbin, which a non-root PATH may lack
    path = shutil.which(program, path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path:
        return path
    try:
        lines = [line for line in INSTALL_LOG.read_text(errors="replace").splitlines()
                 if line.strip()]
        why = " / ".join(lines[-3:]) or "apt-get said nothing"
    except OSError:
        why = ("this run did not go through `./dev test`, which installs it as root "
               "with apt-get")
    pytest.skip(f"{program} is not installed and could not be installed: {why}")


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:   # the process has gone: it holds nothing
        return b""


def _ppid(pid):
    stat = _read(f"/proc/{pid}/stat")
    # the command name may hold spaces and parentheses: the fields start after the last ')'
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None


def _kib_field(text, name):
    start = text.find(name)
    if start < 0:
        return 0
    return int(text[start + len(name):].split(None, 1)[0]) * 1024


class TreeSampler(threading.Thread):
    """Samples the anonymous memory of the tree under `root` until stopped, and keeps the
    peaks. With count_root=False the root is a launcher: its children are counted, not it.

    A process joins the tree when it is first seen with a parent in the tree, and stays in
    it while it lives, so that a process whose parent exits (and which the kernel then
    reparents) still counts."""

    def __init__(self, root, count_root):
        super().__init__(daemon=True)
        self.root, self.count_root = root, count_root
        self.stop = threading.Event()
        self.parent = {}       # pid -> ppid, read once per process
        self.members = {root} if count_root else set()
        self.left_out = set()  # the handler: it and what it starts are never counted
        self.root_cmdline = _read(f"/proc/{root}/cmdline")
        self.peak_rss = self.peak_pss = 0
        self.at_peak = ""      # which processes held what at the RssAnon peak
        self.samples = 0

    def run(self):
        while not self.stop.wait(INTERVAL):
            self.sample()

    def finish(self):
        self.stop.set()
        self.join()
        self.sample()          # one last look, in case the run was shorter than a tick

    def _join(self, pid):
        """Whether pid (a child of the tree or of the root) joins now: False while it
        cannot yet tell."""
        cmdline = _read(f"/proc/{pid}/cmdline")
        if not cmdline:   # mid-exec (the new image's arguments are not set up yet) or gone:
            return False  # a handler caught here would be counted for good
        if HANDLER in cmdline:
            self.left_out.add(pid)
            return False
        # a child of the launcher before its exec is still the launcher (posix_spawn and
        # subprocess share its memory until then): look again at the next sample. The
        # launcher's own cmdline is read once it has one: Popen returns at its exec, which
        # is before the new image's arguments are set up
        if not self.root_cmdline:
            self.root_cmdline = _read(f"/proc/{self.root}/cmdline")
        if not self.count_root and self.parent.get(pid) == self.root \
                and cmdline == self.root_cmdline:
            return False
        self.members.add(pid)
        return True

    def sample(self):
        alive = {int(name) for name in os.listdir("/proc") if name.isdigit()}
        self.parent = {pid: ppid for pid, ppid in self.parent.items() if pid in alive}
        self.members &= alive
        self.left_out &= alive
        for pid in alive - self.parent.keys():
            self.parent[pid] = _ppid(pid)
        parents = self.members | {self.root}
        grew = True
        while grew:    # a child and its parent may both be new since the last sample
            grew = False
            for pid, ppid in self.parent.items():
                if ppid in parents and pid not in parents and pid not in self.left_out \
                        and pid != self.root and self._join(pid):
                    parents.add(pid)
                    grew = True
        rss = pss = 0
        held = []
        for pid in self.members:
            status = _read(f"/proc/{pid}/status")
            anon = _kib_field(status, b"RssAnon:")
            rss += anon
            pss += _kib_field(_read(f"/proc/{pid}/smaps_rollup"), b"Pss_Anon:")
            name = status[6:status.find(b"\n")].decode(errors="replace").strip()
            held.append(f"{name}[{pid}] {mib(anon)}")
        self.samples += 1
        self.peak_pss = max(self.peak_pss, pss)
        if rss > self.peak_rss:
            self.peak_rss, self.at_peak = rss, ", ".join(sorted(held))


@dataclass
class Run:
    """A finished run: its status, output and measured figures."""
    what: str
    returncode: int
    stdout: bytes
    stderr: str
    seconds: float
    peak_rss: int
    peak_pss: int
    at_peak: str
    samples: int = field(default=0)

    def figures(self):
        return (f"{self.what}: peak anon RSS {mib(self.peak_rss)} (PSS {mib(self.peak_pss)}), "
                f"{self.seconds:.2f} s, status {self.returncode}, {self.samples} samples; "
                f"at the peak: {self.at_peak or 'nothing'}")


class Watched:
    """A program in a session of its own, plain or (with limit) under `ufcram run
    --resident-limit limit`, its tree sampled from the start. Leaving the `with` block
    kills whatever is left of its session: a failed test must not leave a server behind.
    Its stdout and stderr go to files in workdir, so that nothing blocks on a full pipe."""

    def __init__(self, argv, workdir, limit=None, env=None, name=None):
        name = name or os.path.basename(str(argv[0]))
        self.what = name + (f" under ufcram run --resident-limit {limit}" if limit
                            else " (plain)")
        if limit:
            argv = [sys.executable, "-m", "ufcram", "run", "--resident-limit", limit,
                    "--", *argv]
        self.argv = [str(a) for a in argv]
        tag = f"{name.replace(' ', '-')}-{'ufcram' if limit else 'plain'}"
        workdir = Path(workdir)
        self.out_path, self.err_path = workdir / f"{tag}.out", workdir / f"{tag}.err"
        self.env = environment() if env is None else env
        self.limit = limit

    def __enter__(self):
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=self.env, start_new_session=True)
        self.started = time.monotonic()
        self.sampler = TreeSampler(self.proc.pid, count_root=not self.limit)
        self.sampler.start()
        self.ended = None
        return self

    def alive(self):
        return self.proc.returncode is None and not self._exited(0)

    def _exited(self, timeout):
        """Whether the program has exited, without reaping it: while it is a zombie its
        pid stays its session's, so killing the session cannot reach anyone else's."""
        fd = os.pidfd_open(self.proc.pid)
        try:
            return bool(select.select([fd], [], [], timeout)[0])
        finally:
            os.close(fd)

    def wait(self, timeout):
        """Wait for the program to end by itself; past timeout, kill it and fail."""
        if not self._exited(timeout):
            self._kill()
            pytest.fail(f"{' '.join(self.argv)} did not finish in {timeout} s; its stderr:\n"
                        f"{self.stderr()[-3000:]}")
        self.ended = time.monotonic()

    def _kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stderr(self):
        return self.err_path.read_bytes().decode(errors="replace")

    def __exit__(self, *exc):
        # what the program left behind goes too (a forked child, a handler), then it
        self._kill()
        self.proc.wait()
        self.sampler.finish()

    def result(self):
        """The finished run (after the `with` block)."""
        s = self.sampler
        ended = self.ended or time.monotonic()
        return Run(self.what, self.proc.returncode, self.out_path.read_bytes(), self.stderr(),
                   ended - self.started, s.peak_rss, s.peak_pss, s.at_peak, s.samples)


def measure(argv, workdir, limit=None, env=None, timeout=90, name=None):
    """Run argv to its end, plainly or under ufcram, and return the Run."""
    with Watched(argv, workdir, limit, env, name) as w:
        w.wait(timeout)
    return w.result()


def check(plain, managed, limit, same_output):
    """The two checks of the acceptance: same_output(plain, managed) gives what differs
    (or nothing), and the managed tree's peak stays within bound(limit). Preconditions
    first: the plain run must have worked, and its working set must be at least four
    times the limit and above the bound, or a pass would prove nothing."""
    most = bound(limit)
    figures = "\n".join([plain.figures(), managed.figures(),
                         f"limit {limit}, bound (L + 25% + 16 MiB) {mib(most)}"])
    print(figures)
    # the working set is the plain run's peak PSS: a page that a fork shares is used once
    assert plain.peak_pss >= 4 * size(limit) and plain.peak_pss > most, (
        f"the plain run's working set is too small for limit {limit}: the test could not "
        f"tell a managed run from an unmanaged one\n{figures}")
    differs = same_output(plain, managed)
    assert not differs, "\n".join([f"its results differ from the plain run's: {differs}",
                                   figures, "ufcram run's stderr (its end):",
                                   managed.stderr[-2000:]])
    assert managed.peak_pss <= most, "\n".join([
        f"the tree's peak anonymous memory {mib(managed.peak_pss)} (Pss_Anon) is over the "
        f"bound {mib(most)}", figures, "ufcram run's stderr (its end):", managed.stderr[-2000:]])
