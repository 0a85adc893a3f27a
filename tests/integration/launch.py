"""Running programs under `ufcram run` for the integration tests: a run in a session of
its own (killed whole on a timeout), the summary `ufcram run` prints, and the checks
the tests share. The C programs of preload_progs/ are built by the `build` fixture
(conftest.py)."""
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

SUMMARY = re.compile(r"demoted (?P<demoted>\d+) pages, restored (?P<restored>\d+), "
                     r"clean re-demotions (?P<clean_redemotions>\d+), "
                     r"promotions (?P<promotions>\d+), faults (?P<faults>\d+)")


def environment(**changes):
    """Ours without any UFCRAM_* or LD_PRELOAD setting: each test sets what it means."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("UFCRAM_") and k != "LD_PRELOAD"}
    env.update({k: str(v) for k, v in changes.items()})
    return env


@dataclass
class Done:
    returncode: int
    stdout: bytes
    stderr: str

    def counters(self):
        """The node's counters from the summary of `ufcram run`."""
        m = SUMMARY.search(self.stderr)
        assert m, f"no summary from ufcram run in its stderr:\n{self.stderr}"
        return {k: int(v) for k, v in m.groupdict().items()}


def run(argv, env=None, timeout=60):
    """Run argv in a session of its own, so that on a timeout its whole process group
    goes: a program stuck on a fault would otherwise outlive `ufcram run`."""
    argv = [str(a) for a in argv]
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=environment() if env is None else env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(argv)} did not finish in {timeout} s; its stderr:\n"
                        f"{err.decode(errors='replace')[-3000:]}")
    return Done(proc.returncode, out, err.decode(errors="replace"))


def ufcram_run(*cmd, limit=None, options=(), env=None, timeout=60):
    """`ufcram run [--resident-limit limit] [options] -- cmd`."""
    return run([sys.executable, "-m", "ufcram", "run",
                *(["--resident-limit", limit] if limit else []), *options, "--", *cmd],
               env, timeout)


def assert_ok(done, what):
    assert done.returncode == 0, f"{what} exited with status {done.returncode}:\n{done.stderr}"


def assert_node_worked(counters):
    """Pages went to the node and came back: the run was not on resident memory alone."""
    assert counters["demoted"] > 0 and counters["restored"] > 0, counters
