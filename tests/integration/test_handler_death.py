"""Handler death (issue 7): after a kill -9 of the handler, no application ever reads
zeros where its data was. Pages the handler held raise SIGBUS; resident and untouched
memory keep working; munmap, MADV_DONTNEED, mremap and fork of managed memory return.

Each application runs in a process of its own, bounded by a timeout: an access that
nobody serves would block it forever, and a lost page kills it with SIGBUS.
"""
import os
import random
import resource
import select
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(180)
SIGBUS = -signal.SIGBUS

# A region of 64 pages: 0-15 demoted, of which 8 read back (read-only, restored);
# 16-47 resident; 48-63 never touched. Then the handler is killed.
PRELUDE = textwrap.dedent("""
    import ctypes, errno, os, signal, sys, time
    import numpy as np, ufcram
    from ufcram import PAGE_SIZE
    PAGES = 64
    node = ufcram.Node(capacity=16 << 20)
    region = ufcram.Region(PAGES * PAGE_SIZE, node=node)
    a = region.array(np.uint8, (PAGES, PAGE_SIZE))
    data = np.random.default_rng(1).integers(1, 256, (PAGES, PAGE_SIZE), np.uint8)
    a[:48] = data[:48]
    assert region.demote(0, 16 * PAGE_SIZE) == 16
    assert np.array_equal(a[8], data[8])
    node.process.kill()
    node.process.wait()

    def check(what, ok):
        print(what, "ok" if ok else "WRONG", flush=True)

    def touch_lost(view):
        print("touching a lost page", flush=True)
        int(view[3].sum())
        print("read a lost page and lived", flush=True)
""")


def no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_app(body, timeout=60):
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=timeout, preexec_fn=no_core)


def assert_checks(out, expected):
    lines = [line for line in out.stdout.splitlines() if line.endswith((" ok", " WRONG"))]
    assert lines == [f"{what} ok" for what in expected], out.stdout + out.stderr


def assert_lost_page_raised_sigbus(out):
    assert out.returncode == SIGBUS, (out.returncode, out.stdout, out.stderr)
    assert out.stdout.splitlines()[-1] == "touching a lost page"
    assert "ufcram: the fault handler is gone" in out.stderr
    assert "lost with its handler" in out.stderr and "SIGBUS" in out.stderr


def test_lost_pages_raise_sigbus_and_the_rest_keeps_working():
    out = run_app("""
        check("resident", np.array_equal(a[16:48], data[16:48]))
        check("restored", np.array_equal(a[8], data[8]))
        check("untouched", not a[48:].any())
        a[8] = 3    # write-protected (read-only on the node)
        a[16] = 4
        a[50] = 5
        check("writes", (a[8] == 3).all() and (a[16] == 4).all() and (a[50] == 5).all())
        r, w = os.pipe()
        for what, call in (("write(2) from a lost page", lambda: os.write(w, a[5])),
                           ("read(2) into a lost page",
                            lambda: os.write(w, b"x") and os.readv(r, [a[6]]))):
            try:
                call()
                check(what, False)
            except OSError as e:
                check(what, e.errno == errno.EFAULT)
        touch_lost(a)
    """)
    assert_checks(out, ["resident", "restored", "untouched", "writes",
                        "write(2) from a lost page", "read(2) into a lost page"])
    assert_lost_page_raised_sigbus(out)
    assert out.stderr.count("the fault handler is gone") == 1


def test_closing_after_death_unmaps_and_says_why():
    out = run_app("""
        del a
        try:
            node.close()
            check("close raised", False)
        except ufcram.HandlerError as e:
            check("close names the handler", "exited with status -9" in str(e))
        check("closed", region.closed and node.closed and region._mm.closed)
    """)
    assert_checks(out, ["close names the handler", "closed"])
    assert out.returncode == 0, out.stderr


def test_closing_after_death_with_views_alive_keeps_lost_pages_loud():
    """The mapping stays for the views, still registered: never zeros."""
    out = run_app("""
        try:
            region.close()
        except ufcram.HandlerError:
            pass
        check("closed", region.closed)
        check("resident", np.array_equal(a[16:48], data[16:48]))
        check("untouched", not a[48:].any())
        touch_lost(a)
    """)
    assert_checks(out, ["closed", "resident", "untouched"])
    assert_lost_page_raised_sigbus(out)


def test_madvise_and_mremap_after_death():
    """Freed pages read zeros, as they would anyway; moved lost pages stay lost."""
    out = run_app("""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.mremap.restype = ctypes.c_void_p
        libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                                ctypes.c_int, ctypes.c_void_p]
        size = PAGES * PAGE_SIZE
        check("madvise", libc.madvise(region.address + 2 * PAGE_SIZE, PAGE_SIZE, 4) == 0)
        check("freed reads zeros", not a[2].any())
        spot = libc.mmap(None, size, 0, 0x22, -1, 0)             # PROT_NONE, private anon
        moved = libc.mremap(region.address, size, size, 3, spot)  # MAYMOVE | FIXED
        check("mremap", moved == spot)
        b = np.frombuffer((ctypes.c_uint8 * size).from_address(moved), np.uint8)
        b = b.reshape(PAGES, PAGE_SIZE)
        check("moved resident", np.array_equal(b[16:48], data[16:48]))
        check("moved restored", np.array_equal(b[8], data[8]))
        check("moved freed", not b[2].any())
        check("moved untouched", not b[48:].any())
        touch_lost(b)
    """)
    assert_checks(out, ["madvise", "freed reads zeros", "mremap", "moved resident",
                        "moved restored", "moved freed", "moved untouched"])
    assert_lost_page_raised_sigbus(out)


def test_fork_after_death():
    """Children are served too: they read what their parent had, lost pages included,
    and their uffds are let go once they exit."""
    out = run_app("""
        def uffds():
            n = 0
            for fd in os.listdir("/proc/self/fd"):
                try:
                    n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
                except OSError:
                    pass
            return n

        def in_child(fn):
            pid = os.fork()
            if pid == 0:
                os._exit(0 if fn() else 3)
            return os.waitpid(pid, 0)[1]

        def writes():
            a[8] = 9
            a[16] = 9
            a[50] = 9
            return (a[8] == 9).all() and (a[16] == 9).all() and (a[50] == 9).all()

        def unchanged():
            return np.array_equal(a[8], data[8]) and np.array_equal(a[16:48], data[16:48]) \
                and not a[48:].any()

        before = uffds()
        check("child reads", in_child(unchanged) == 0)
        check("child writes", in_child(writes) == 0)
        status = in_child(lambda: a[3].sum() + 1)
        check("child touching a lost page gets SIGBUS",
              os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS)
        check("parent unchanged", unchanged())
        deadline = time.monotonic() + 10
        while uffds() > before and time.monotonic() < deadline:
            time.sleep(0.1)
        check("children's uffds let go", uffds() == before)
    """)
    assert_checks(out, ["child reads", "child writes", "child touching a lost page gets SIGBUS",
                        "parent unchanged", "children's uffds let go"])
    assert out.returncode == 0, out.stderr


WORKLOAD = textwrap.dedent("""
    import os, sys, threading, time
    import numpy as np, ufcram
    from ufcram import PAGE_SIZE
    PAGES = 256
    node = ufcram.Node(capacity=16 << 20)
    region = ufcram.Region(PAGES * PAGE_SIZE, node=node, resident_limit=32 * PAGE_SIZE)
    a = region.array(np.uint8, (PAGES, PAGE_SIZE))
    rng = np.random.default_rng(int(sys.argv[1]))
    ref = rng.integers(1, 256, (PAGES, PAGE_SIZE), np.uint8)   # never a zero byte
    a[:] = ref

    def work():
        end = time.monotonic() + 20
        while time.monotonic() < end:
            p = int(rng.integers(PAGES))
            if rng.random() < 0.3:
                v = int(rng.integers(1, 256))
                a[p] = v
                ref[p] = v
            elif not np.array_equal(a[p], ref[p]):
                print("WRONG page", p, flush=True)
                os._exit(3)

    worker = threading.Thread(target=work)
    worker.start()
    while region.stats()["demotions"] < 300:
        time.sleep(0.01)
    print("ready", node.pid, flush=True)
    worker.join()
    print("finished", flush=True)
""")


def test_kill_during_a_workload_never_yields_wrong_bytes():
    """A thread reads and writes while the resident limit keeps the handler demoting;
    the handler dies at a random moment (mid-demotion included). Every read returns the
    right bytes, or the process dies of SIGBUS."""
    outcomes = []
    for seed in range(6):
        p = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(seed)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=no_core)
        try:
            assert select.select([p.stdout], [], [], 60)[0], "the workload never got going"
            ready, handler = p.stdout.readline().split()
            assert ready == "ready"
            select.select([], [], [], random.Random(seed).uniform(0, 0.3))
            os.kill(int(handler), signal.SIGKILL)
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert "WRONG" not in out, out + err
        assert p.returncode in (0, SIGBUS), (p.returncode, out, err)
        assert "ufcram: the fault handler is gone" in err, err
        outcomes.append(p.returncode)
    # the worker touches a page the handler held soon after its death
    assert SIGBUS in outcomes, outcomes
