"""`ufcram run` and its preload library end to end: unmodified programs (the demos,
python with numpy, sort, gzip, and the small C programs in preload_progs/) under a
resident limit well below their working set, each checked against a plain run or against
its own checks, and the summary `ufcram run` prints parsed for what the node did.

The C programs exit 0 when their checks pass, 1 when one fails and 2 when a precondition
fails; with --demoted they insist that the memory an operation uses was demoted first
(see preload_progs/common.c)."""
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .launch import assert_node_worked, assert_ok, environment, run, ufcram_run

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(90)]

MiB = 1 << 20
HERE = Path(__file__).parent
DEMOS = HERE.parents[1] / "demos"
PLAIN_MEMORY = "this program runs on plain memory"


@pytest.fixture(scope="module")
def preload_library():
    from ufcram.tools.run import preload_library
    return preload_library()


# --- the demos ----------------------------------------------------------------------------
# Sizes: a working set 4x the limit, as small as still shows each behaviour (faults cost
# ~100-200 us each today).
DEMO_ARGS = {"kvstore": ["--mib", 8, "--ops", 40000], "writeheavy": ["--mib", 8],
             "scan": ["--mib", 8]}
DEMO_LIMIT = "2M"


@pytest.fixture(scope="module")
def demo_runs():
    """run_demo(name, *options): the demo's native run and its run under ufcram, once each
    per module."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the demos cannot be built")
    built = subprocess.run(["bash", DEMOS / "build.sh"], capture_output=True, text=True,
                           timeout=120)
    if built.returncode:
        pytest.fail(f"the demos do not build (demos/build.sh):\n{built.stderr[-2000:]}")
    cache = {}

    def run_demo(name, *options):
        if (name, options) not in cache:
            argv = [DEMOS / "bin" / name, *DEMO_ARGS[name], "--seed", 3]
            native = run(argv)
            assert_ok(native, f"{name} (native)")
            cache[name, options] = native, ufcram_run(*argv, limit=DEMO_LIMIT, options=options)
        return cache[name, options]
    return run_demo


@pytest.mark.parametrize("name", sorted(DEMO_ARGS))
def test_demo_output_matches_its_native_run(demo_runs, name):
    native, under = demo_runs(name)
    assert_ok(under, f"{name} under ufcram run")
    assert under.stdout == native.stdout
    assert under.stdout.splitlines()[-1].startswith(b"checksum ")
    assert_node_worked(under.counters())


def test_kvstore_cold_reads_are_re_demoted_clean(demo_runs):
    """Read-mostly: pages read back come in read-only, so demoting them again only drops
    them."""
    _, under = demo_runs("kvstore")
    assert under.counters()["clean_redemotions"] > 0


def test_writeheavy_writes_stay_on_the_node_within_an_auto_budget(demo_runs):
    """With the default budget (as much as the node's free capacity covers), a write to a
    demoted page makes it writable on the node instead of promoting it."""
    _, under = demo_runs("writeheavy")
    assert under.counters()["promotions"] == 0


def test_writeheavy_writes_over_a_zero_budget_promote(demo_runs):
    native, under = demo_runs("writeheavy", "--write-budget", "0")
    assert_ok(under, "writeheavy --write-budget 0 under ufcram run")
    assert under.stdout == native.stdout
    counters = under.counters()
    assert_node_worked(counters)
    assert counters["promotions"] > 0, counters


# --- programs from the base system ----------------------------------------------------------
NUMPY_WORK = textwrap.dedent("""
    import hashlib
    import numpy as np
    rng = np.random.default_rng(7)
    a = rng.standard_normal(2 << 20)           # 16 MiB of float64
    b = np.sqrt(np.abs(a)) * 3 + a             # and as many in temporaries
    c = np.sort(a[: 1 << 19])
    print(f"{a.sum():.9f} {b.mean():.9f} {c[::4096].sum():.9f}")
    print(hashlib.sha256(b.tobytes()).hexdigest())
""")


def test_python_numpy_output_matches_a_plain_run():
    """numpy advises huge pages for each array of 4 MiB or more from its first page
    boundary on, which splits the array's mapping in two (allocs.c's split-mapping
    check below isolates that)."""
    pytest.importorskip("numpy")
    plain = run([sys.executable, "-c", NUMPY_WORK])
    assert_ok(plain, "python (plain)")
    under = ufcram_run(sys.executable, "-c", NUMPY_WORK, limit="8M")
    assert_ok(under, "python under ufcram run")
    assert under.stdout.decode() == plain.stdout.decode()
    assert_node_worked(under.counters())


def lines_file(path, nbytes, seed=5):
    """Text lines with many duplicate keys, about nbytes of them."""
    rng = random.Random(seed)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()
    lines = [f"{rng.choice(words)} {rng.randrange(10**6):06d} {rng.choice(words)}\n"
             for _ in range(nbytes // 22)]
    path.write_text("".join(lines))
    return path


def test_sort_of_a_file_larger_than_the_limit_matches_plain_sort(tmp_path):
    """sort mallocs its whole -S buffer (3 MiB here, a mapping of its own) and, for an input
    larger than it, sorts chunk by chunk through temporary files. A buffer as large as
    the input would be sorted by random access, which is far too slow under a limit
    today (minutes)."""
    data = lines_file(tmp_path / "lines.txt", 8 * MiB)
    env = environment(LC_ALL="C", TMPDIR=tmp_path)
    plain = run(["sort", "-S", "3M", data], env)
    assert_ok(plain, "sort (plain)")
    under = ufcram_run("sort", "-S", "3M", data, limit="2M", env=env)
    assert_ok(under, "sort under ufcram run")
    assert under.stdout == plain.stdout
    assert_node_worked(under.counters())


def test_gzip_round_trip_through_a_pipe_is_exact(tmp_path):
    """gzip and gunzip work in static buffers and map nothing as large as the threshold:
    the node stays idle (0 demotions), and the three processes must simply run as ever."""
    data = lines_file(tmp_path / "lines.txt", 8 * MiB)
    under = ufcram_run("sh", "-c", 'gzip -c "$1" | gunzip -c', "sh", data, limit="2M")
    assert_ok(under, "gzip | gunzip under ufcram run")
    assert under.stdout == data.read_bytes()


# --- fork, threads and system calls on demoted memory ------------------------------------------
@pytest.mark.parametrize("scenario", ["child-writes", "child-reads", "child-frees",
                                      "parent-writes"])
def test_fork_child_and_parent_each_keep_their_own_bytes(build, scenario):
    """child-writes: the child reads the parent's demoted buffer and writes its copy;
    child-reads: the child reads it, its copy is demoted in turn, and it reads it again;
    child-frees: the child frees it and allocates anew, 16 times, forking right after
    the parent rewrote its buffer; parent-writes: the parent writes its demoted buffer
    while the child still holds the bytes of the fork. The buffer is 4 MiB: a small
    limit makes the node demote often, so that forks land amid demotions."""
    done = ufcram_run(build("forker"), scenario, "--demoted", limit="512K")
    assert_ok(done, f"forker {scenario}")
    assert done.stdout == b"ok\n"


def test_threads_fill_and_verify_own_and_shared_buffers(build):
    done = ufcram_run(build("threads"), limit="2M")
    assert_ok(done, "threads")
    assert_node_worked(done.counters())


@pytest.mark.parametrize("how", ["file", "socket"])
def test_syscalls_copy_into_and_out_of_demoted_buffers(build, how):
    """file: write() then read(); socket: send() and recv() over a socketpair."""
    done = ufcram_run(build("io"), how, "--demoted", limit="2M")
    assert_ok(done, f"io {how}")
    assert done.stdout == b"ok\n"


# --- the allocation calls -----------------------------------------------------------------------
ALLOC_CHECKS = ["realloc", "aligned", "calloc", "mmap", "munmap-partial", "mremap-grow",
                "split-mapping", "usable-size"]


@pytest.mark.parametrize("check", ALLOC_CHECKS)
def test_allocation_call_keeps_its_contract_on_demoted_memory(build, check):
    """One check of preload_progs/allocs.c: realloc across glibc's mmap threshold both ways,
    64 KiB-aligned allocations, zeroed calloc, mmap/munmap, partial munmap, mremap
    growth, a mapping split in two by madvise, malloc_usable_size."""
    done = ufcram_run(build("allocs"), check, "--demoted", limit="2M")
    assert_ok(done, f"allocs {check}")
    assert done.stdout == b"ok\n"


@pytest.mark.parametrize("check", ALLOC_CHECKS)
def test_without_a_node_the_library_leaves_memory_plain(build, preload_library, check):
    """LD_PRELOAD set by hand and no UFCRAM_NODE: every call behaves as libc's, and the
    library says once why."""
    env = environment(LD_PRELOAD=preload_library, UFCRAM_DEBUG=1)
    done = run([build("allocs"), check], env)
    assert_ok(done, f"allocs {check} with the library and no node")
    assert done.stdout == b"ok\n"
    assert done.stderr.count(PLAIN_MEMORY) == 1, done.stderr


# --- the program's environment ---------------------------------------------------------------
@pytest.fixture(scope="module")
def with_own_preload(build):
    """A program run with an LD_PRELOAD of its own (whose constructor reports)."""
    own = build("own_preload", shared=True)
    done = ufcram_run(build("allocs"), "realloc", "--demoted", limit="2M",
                      env=environment(LD_PRELOAD=own))
    # `ufcram run` and its handler run with the program's LD_PRELOAD too: keep its line
    reports = [line for line in done.stderr.splitlines()
               if line.startswith("own preload ran in allocs:")]
    return done, reports


def test_program_keeps_its_own_ld_preload(with_own_preload):
    done, reports = with_own_preload
    assert_ok(done, "allocs with an LD_PRELOAD of its own")
    assert reports == ["own preload ran in allocs: its malloc works"], done.stderr
    assert_node_worked(done.counters())


# --- exit status ---------------------------------------------------------------------------------
def test_exit_status_is_the_programs():
    done = ufcram_run("sh", "-c", "exit 3")
    assert done.returncode == 3
    assert "sh exited with status 3" in done.stderr


KILLERS = {
    # killed while its memory is on the node: the handler must let go of a dead client
    signal.SIGKILL: "import numpy as np, os, signal\n"
                    "a = np.ones(2 << 20)\n"
                    "os.kill(os.getpid(), signal.SIGKILL)",
    signal.SIGSEGV: "import ctypes; ctypes.string_at(0)",
}


@pytest.mark.parametrize("sig", KILLERS, ids=lambda s: s.name)
def test_killed_program_exits_128_plus_the_signal(sig):
    if sig == signal.SIGKILL:
        pytest.importorskip("numpy")
    done = ufcram_run(sys.executable, "-c", KILLERS[sig], limit="4M")
    assert done.returncode == 128 + sig
    assert f"killed by signal {int(sig)} ({sig.name})" in done.stderr


@pytest.mark.parametrize("argv", [[], ["--"]], ids=["nothing", "dashes-only"])
def test_run_without_a_program_says_so(argv):
    done = run([sys.executable, "-m", "ufcram", "run", *argv], timeout=30)
    assert done.returncode != 0
    assert "no program given" in done.stderr


def test_run_of_a_missing_program_says_so(tmp_path):
    missing = tmp_path / "no-such-program"
    done = ufcram_run(missing, timeout=30)
    assert done.returncode != 0
    assert f"cannot run {missing}" in done.stderr and "No such file" in done.stderr
    assert "Traceback" not in done.stderr
