"""The launcher of `ufcram run` around its program: the programs the preload library cannot
enter (named, or refused with --strict), and the launcher only observing its node (never a
client).
Each run gets a private TMPDIR, so that its `ufcram-run-*` directory can be looked for."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_preload import environment, run, ufcram_run

pytestmark = [pytest.mark.timeout(90)]

UFCRAM = [sys.executable, "-m", "ufcram"]
STATIC_LINE = "is statically linked: no loader reads LD_PRELOAD for it"


def run_dirs(tmp):
    return sorted(Path(tmp).glob("ufcram-run-*"))


def children(pid):
    """The child processes of pid: {pid: command line}."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return {}
    found = {}
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                found[kid] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return found


def wait_for(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.02)
    return found


class Launch:
    """`ufcram run [options] -- cmd` in a session of its own (killed whole at the end),
    with a private TMPDIR."""

    def __init__(self, tmp, cmd, options=(), **popen):
        self.tmp = tmp
        args = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                "stderr": subprocess.PIPE, "start_new_session": True, **popen}
        self.proc = subprocess.Popen([*UFCRAM, "run", *options, "--", *map(str, cmd)],
                                     env=environment(TMPDIR=tmp), **args)

    def program(self, name):
        """The program's pid, once it runs (exec'd: its command line is name's)."""
        return wait_for(lambda: next((p for p, cmd in children(self.proc.pid).items()
                                      if name in cmd.split(" ")[0]), None),
                        f"{name} under ufcram run")

    def close_stdin(self):
        """The program's stdin reaches its end (communicate cannot take a closed one)."""
        self.proc.stdin.close()
        self.proc.stdin = None

    def finish(self, timeout=30):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(), err.decode()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # whatever is left of the session
        except ProcessLookupError:
            pass
        self.proc.communicate()


# --- programs the preload library cannot enter ---------------------------------------------
@pytest.fixture(scope="module")
def static_program(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("static")
    (out / "static.c").write_text('#include <stdio.h>\nint main(void) '
                                  '{ puts("static ran"); return 0; }\n')
    done = subprocess.run([gcc, "-static", "-o", out / "static-prog", out / "static.c"],
                          capture_output=True, text=True, timeout=120)
    if done.returncode:
        pytest.skip(f"no static C library here (gcc -static failed):\n{done.stderr}")
    return out / "static-prog"


def test_a_static_program_is_named_then_runs_unmanaged(static_program):
    done = ufcram_run(static_program)
    assert done.returncode == 0 and done.stdout == b"static ran\n"
    line = f"ufcram run: {static_program} {STATIC_LINE}; it runs unmanaged, on plain memory"
    assert done.stderr.splitlines()[0] == line, done.stderr
    assert "static-prog exited with status 0" in done.stderr


def test_strict_refuses_a_static_program_with_status_2(static_program):
    done = ufcram_run(static_program, options=["--strict"])
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr == f"ufcram run: {static_program} {STATIC_LINE}; not run (--strict)\n"


def test_a_script_is_judged_by_the_interpreter_env_finds(static_program, tmp_path):
    script = tmp_path / "script"
    script.write_text("#!/usr/bin/env static-prog\n")
    script.chmod(0o755)
    env = environment(PATH=f"{static_program.parent}:{os.environ['PATH']}")
    done = run([*UFCRAM, "run", "--strict", "--", script], env)
    assert done.returncode == 2
    assert f"{static_program} (the interpreter of {script}) {STATIC_LINE}" in done.stderr


def test_a_dynamic_program_gets_no_such_line():
    done = ufcram_run("sh", "-c", "exit 0", options=["--strict"])
    assert done.returncode == 0 and "ufcram run: sh exited" in done.stderr.splitlines()[0]


@pytest.mark.root
def test_a_set_user_id_program_is_named_and_indeed_loses_ld_preload(tmp_path):
    """Root: a copy of printenv owned by nobody, set-user-ID; the loader drops
    LD_PRELOAD from its environment, which a plain copy keeps."""
    plain = tmp_path / "printenv"
    shutil.copy(shutil.which("printenv"), plain)
    setuid = tmp_path / "printenv-setuid"
    shutil.copy(plain, setuid)
    os.chown(setuid, 65534, 65534)
    setuid.chmod(0o4755)
    if os.statvfs(tmp_path).f_flag & os.ST_NOSUID:
        pytest.skip(f"{tmp_path} is on a nosuid mount")
    kept = ufcram_run(plain, "LD_PRELOAD")
    assert kept.returncode == 0 and b"_preload" in kept.stdout
    assert "unmanaged" not in kept.stderr
    dropped = ufcram_run(setuid, "LD_PRELOAD")
    assert (dropped.returncode, dropped.stdout) == (1, b"")   # printenv: not set
    assert dropped.stderr.startswith(f"ufcram run: {setuid} is set-user-ID: the loader "
                                     "ignores LD_PRELOAD for it; it runs unmanaged"), \
        dropped.stderr


# --- the launcher observes its node --------------------------------------------------------
# a client of the node once its 8 MiB buffer is managed; it leaves when its stdin closes
CLIENT = "import os, sys\nb = bytearray(8 << 20)\nprint(os.getpid(), flush=True)\nsys.stdin.read()"


def stat_json(sock):
    done = subprocess.run([*UFCRAM, "stat", "--node", sock, "--json"], capture_output=True,
                          text=True, timeout=30, env=environment())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture()
def shared_node(tmp_path):
    sock = tmp_path / "shared.sock"
    node = subprocess.Popen([*UFCRAM, "node", "--listen", sock], env=environment())
    try:
        wait_for(sock.exists, "the shared node's socket")
        yield sock
    finally:
        node.terminate()
        node.wait(timeout=30)


def test_the_launcher_of_a_private_node_is_no_client(tmp_path):
    with Launch(tmp_path, [sys.executable, "-c", CLIENT], stdin=subprocess.PIPE) as launch:
        program = int(launch.proc.stdout.readline())
        [sock] = [d / "node.sock" for d in run_dirs(tmp_path)]
        stats = stat_json(sock)
        assert [c["pid"] for c in stats["per_client"]] == [program]   # not the launcher's
        assert stats["clients"] == 1
        [handler] = [p for p, cmd in children(launch.proc.pid).items() if "ufcram.handler" in cmd]
        launch.close_stdin()
        t0 = time.monotonic()
        status, _, err = launch.finish()
        # the handler left as the launcher closed: Node.close did not wait 10 s to kill it
        assert time.monotonic() - t0 < 8
        assert status == 0 and "exited with status 0" in err
        faults = int(err.split("faults ")[1].split()[0])
        assert faults > 0, err   # the program's counters, read after it left
    assert not os.path.exists(f"/proc/{handler}")
    assert run_dirs(tmp_path) == []


def test_the_launcher_on_a_shared_node_is_no_client(tmp_path, shared_node):
    with Launch(tmp_path, [sys.executable, "-c", CLIENT], options=["--node", shared_node],
                stdin=subprocess.PIPE) as launch:
        program = int(launch.proc.stdout.readline())
        stats = stat_json(shared_node)
        assert [c["pid"] for c in stats["per_client"]] == [program]
        assert stats["clients"] == 1
        launch.close_stdin()
        status, _, err = launch.finish()
        assert status == 0, err
    after = stat_json(shared_node)
    assert (after["clients"], after["departed"]["clients"]) == (0, 1)
