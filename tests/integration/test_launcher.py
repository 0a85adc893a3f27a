"""The launcher of `ufcram run` around its program: the programs the preload library cannot
enter (named, or refused with --strict), the launcher only observing its node (never a
client), and signals (passed on once, the private node's directory gone on every exit).
Each run gets a private TMPDIR, so that its `ufcram-run-*` directory can be looked for."""
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from .launch import environment, run, ufcram_run

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
def static_program(gcc, tmp_path_factory):
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


# A process tree: the program forks a child that reads the memory it inherited (demoted
# under the limit, so it faults: its pid is learnt then) and starts another program. The
# limit leaves the three interpreters' own memory room (about 8 MiB each): at 4M they
# thrashed for up to minutes.
TREE = """
import os, subprocess, sys
b = bytearray(64 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(w)
    ok = sum(b[::4096]) == len(b) // 4096
    os.read(r, 1)
    os._exit(0 if ok else 1)
os.close(r)
started = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
started.stdout.readline()
print(os.getpid(), child, started.pid, flush=True)
sys.stdin.read()
os.write(w, b"x")
started.stdin.close()
sys.exit(started.wait() or os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
"""


def test_stat_shows_every_process_of_the_tree(tmp_path):
    """The program, its forked child (the memory it inherited and its own) and the program
    it started are the run's clients; the launcher is not."""
    with Launch(tmp_path, [sys.executable, "-c", TREE, CLIENT], options=["--resident-limit",
                "32M"], stdin=subprocess.PIPE) as launch:
        ready, _, _ = select.select([launch.proc.stdout], [], [], 60)
        assert ready, "the tree's program did not say its pids within 60 s"
        tree = set(map(int, launch.proc.stdout.readline().split()))
        [sock] = [d / "node.sock" for d in run_dirs(tmp_path)]
        listed = wait_for(lambda: (lambda pids: pids if pids == tree else None)(
            {c["pid"] for c in stat_json(sock)["per_client"]}), "the tree's three pids")
        assert launch.proc.pid not in listed
        launch.close_stdin()
        status, _, err = launch.finish()
        assert status == 0, err


# --- signals --------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_a_signal_to_ufcram_run_goes_to_the_program(tmp_path, sig):
    with Launch(tmp_path, ["sleep", "30"]) as launch:
        launch.program("sleep")
        assert len(run_dirs(tmp_path)) == 1
        launch.proc.send_signal(sig)
        status, _, err = launch.finish()
    assert status == 128 + sig, err
    assert f"sleep was killed by signal {int(sig)} ({sig.name})" in err
    assert run_dirs(tmp_path) == []


def test_sigterm_while_the_node_starts_leaves_nothing_behind(tmp_path):
    """Sent as soon as the private directory exists: the node is starting, the program
    is not running yet (or only just)."""
    with Launch(tmp_path, ["sleep", "30"]) as launch:
        wait_for(lambda: run_dirs(tmp_path), "the private node's directory", timeout=30)
        launch.proc.terminate()
        status, _, err = launch.finish()
    assert status == 128 + signal.SIGTERM, err
    assert run_dirs(tmp_path) == []


TRAPS_TERM = """import signal, sys, time
def leave(signum, frame):
    print("caught", signal.Signals(signum).name, flush=True)
    sys.exit(7)
signal.signal(signal.SIGTERM, leave)
print("ready", flush=True)
time.sleep(30)
"""


def test_a_program_that_traps_sigterm_decides_the_status(tmp_path):
    with Launch(tmp_path, [sys.executable, "-c", TRAPS_TERM]) as launch:
        assert launch.proc.stdout.readline() == b"ready\n"
        launch.proc.terminate()
        status, out, err = launch.finish()
    assert (status, out) == (7, "caught SIGTERM\n"), err
    assert run_dirs(tmp_path) == []


def test_a_missing_program_leaves_no_directory(tmp_path):
    with Launch(tmp_path, [tmp_path / "no-such-program"]) as launch:
        status, _, err = launch.finish()
    assert status == 1 and "cannot run" in err
    assert run_dirs(tmp_path) == []


# the si_code of each SIGINT the program gets: 128 (SI_KERNEL) from the terminal, 0
# (SI_USER) from a kill; in its own process group only what ufcram run passes on reaches it
SIGINTS = """import os, signal, sys
if sys.argv[1] == "own-group":
    os.setpgid(0, 0)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
print("ready", flush=True)
got = []
while (info := signal.sigtimedwait([signal.SIGINT], 1 if got else 5)) is not None:
    got.append(info.si_code)
print("sigint", got, flush=True)
"""


def read_until(fd, text, timeout=30):
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} from the terminal; it showed {seen!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:   # EIO: the other side has closed
                break
    return seen.decode(errors="replace")


@pytest.mark.parametrize("group, expected", [("same-group", [128]), ("own-group", [])])
def test_ctrl_c_at_a_terminal_is_not_passed_on(tmp_path, group, expected):
    """The terminal sends SIGINT to the whole foreground process group, the program
    included: ufcram run must not pass on its copy as well (in the program's own process
    group, nothing at all reaches it)."""
    master, slave = os.openpty()

    def take_the_terminal():   # a session of its own, with the pty as its terminal
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        with Launch(tmp_path, [sys.executable, "-c", SIGINTS, group], stdin=slave,
                    stdout=slave, stderr=slave, start_new_session=False,
                    preexec_fn=take_the_terminal) as launch:
            os.close(slave)
            read_until(master, "ready")
            os.write(master, b"\x03")   # Ctrl-C
            shown = read_until(master, "exited with status")
            assert launch.proc.wait(timeout=30) == 0, shown
    finally:
        os.close(master)
    assert f"sigint {expected}" in shown, shown


def sig_lines(done):
    return {k: int(v, 16) for k, v in (line.split(":") for line in done.stdout.decode().splitlines())}


def test_the_program_gets_the_mask_and_dispositions_we_got():
    """Not our blocked signals, nor the ones Python or we ignore (SIGPIPE, SIGXFSZ,
    SIGINT, SIGQUIT). Signals 32 and 33 are glibc's own: posix_spawn ignores them."""
    show = ["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]   # not a shell: it resets them
    plain, under = sig_lines(run(show)), sig_lines(ufcram_run(*show))
    assert under["SigBlk"] == plain["SigBlk"]
    assert under["SigIgn"] & 0x7FFFFFFF == plain["SigIgn"] & 0x7FFFFFFF, (plain, under)
