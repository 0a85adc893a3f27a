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
# 16-47 resident; 48-63 never touched. Then (PRELUDE) the handler is killed.
SETUP = textwrap.dedent("""
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
""")
HELPERS = textwrap.dedent("""
    def check(what, ok):
        print(what, "ok" if ok else "WRONG", flush=True)

    def touch_lost(view):
        print("touching a lost page", flush=True)
        int(view[3].sum())
        print("read a lost page and lived", flush=True)

    def libc_calls():
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.mremap.restype = ctypes.c_void_p
        libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                                ctypes.c_int, ctypes.c_void_p]
        return libc

    def move_region():
        # mremap the whole region elsewhere; a view of it at its new address
        libc = libc_calls()
        size = PAGES * PAGE_SIZE
        spot = libc.mmap(None, size, 0, 0x22, -1, 0)             # PROT_NONE, private anon
        moved = libc.mremap(region.address, size, size, 3, spot)  # MAYMOVE | FIXED
        check("mremap", moved == spot)
        b = np.frombuffer((ctypes.c_uint8 * size).from_address(moved), np.uint8)
        return b.reshape(PAGES, PAGE_SIZE)

    def fds(kind=None):
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += kind is None or os.readlink(f"/proc/self/fd/{fd}") == kind
            except OSError:
                pass
        return n
""")
SETUP += HELPERS
PRELUDE = SETUP + textwrap.dedent("""
    node.process.kill()
    node.process.wait()
""")


def no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_app(body, timeout=60, prelude=PRELUDE):
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)],
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
        libc = libc_calls()
        check("madvise", libc.madvise(region.address + 2 * PAGE_SIZE, PAGE_SIZE, 4) == 0)
        check("freed reads zeros", not a[2].any())
        b = move_region()
        check("moved resident", np.array_equal(b[16:48], data[16:48]))
        check("moved restored", np.array_equal(b[8], data[8]))
        check("moved freed", not b[2].any())
        check("moved untouched", not b[48:].any())
        touch_lost(b)
    """)
    assert_checks(out, ["madvise", "freed reads zeros", "mremap", "moved resident",
                        "moved restored", "moved freed", "moved untouched"])
    assert_lost_page_raised_sigbus(out)


def test_memory_moved_while_the_handler_lived_stays_loud_after_its_death():
    """The agent follows mremap (told by the handler): a lost page at its new address
    raises SIGBUS, not zeros."""
    out = run_app("""
        b = move_region()
        check("moved restored", np.array_equal(b[8], data[8]))
        region.stats()                     # a round trip: the handler has read the move
        node.process.kill()
        node.process.wait()
        check("moved resident", np.array_equal(b[16:48], data[16:48]))
        check("moved untouched", not b[48:].any())
        touch_lost(b)
    """, prelude=SETUP)
    assert_checks(out, ["mremap", "moved restored", "moved resident", "moved untouched"])
    assert_lost_page_raised_sigbus(out)


def test_fork_after_death():
    """Children are served too: they read what their parent had, lost pages included,
    and their uffds are let go once they exit."""
    out = run_app("""
        def uffds():
            return fds("anon_inode:[userfaultfd]")

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


def test_children_forked_while_the_handler_lived():
    """A child and a grandchild forked while the handler lives have uffds only the
    handler held: the parent's agent keeps a copy and serves them after the death. Their
    lost pages raise SIGBUS, never zeros; pages they had read or written keep their
    bytes, and so do resident ones."""
    out = run_app("""
        ready_r, ready_w = os.pipe()
        go_child_r, go_child_w = os.pipe()
        go_grand_r, go_grand_w = os.pipe()

        def grandchild():
            ok = np.array_equal(a[5], data[5])   # restored into it while the handler lives
            os.write(ready_w, b"g")
            os.read(go_grand_r, 1)
            check("grandchild read before the death", ok and np.array_equal(a[5], data[5]))
            check("grandchild resident", np.array_equal(a[16:48], data[16:48]))
            check("grandchild restored", np.array_equal(a[8], data[8]))
            check("grandchild untouched", not a[48:].any())
            touch_lost(a)
            os._exit(0)

        def child():
            ok = np.array_equal(a[4], data[4])
            a[7] = 7                              # a demoted page written: promoted
            grand = os.fork()
            if grand == 0:
                grandchild()
            os.write(ready_w, b"c")
            os.read(go_child_r, 1)
            os.write(go_grand_w, b"x")
            status = os.waitpid(grand, 0)[1]
            check("grandchild got SIGBUS",
                  os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS)
            check("child read before the death", ok and np.array_equal(a[4], data[4]))
            check("child wrote before the death", (a[7] == 7).all())
            check("child resident", np.array_equal(a[16:48], data[16:48]))
            check("child restored", np.array_equal(a[8], data[8]))
            check("child untouched", not a[48:].any())
            a[16] = 4
            a[50] = 5
            check("child writes", (a[16] == 4).all() and (a[50] == 5).all())
            touch_lost(a)
            os._exit(0)

        pid = os.fork()
        if pid == 0:
            child()
        os.read(ready_r, 1)
        os.read(ready_r, 1)
        node.process.kill()
        node.process.wait()
        os.write(go_child_w, b"x")
        status = os.waitpid(pid, 0)[1]
        check("child got SIGBUS", os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS)
        check("parent resident", np.array_equal(a[16:48], data[16:48]))
    """, prelude=SETUP)
    assert_checks(out, ["grandchild read before the death", "grandchild resident",
                        "grandchild restored", "grandchild untouched", "grandchild got SIGBUS",
                        "child read before the death", "child wrote before the death",
                        "child resident", "child restored", "child untouched", "child writes",
                        "child got SIGBUS", "parent resident"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("touching a lost page") == 2
    assert "read a lost page and lived" not in out.stdout
    assert out.stderr.count("lost with its handler") == 2, out.stderr


def test_a_live_handler_keeps_serving_children_after_their_parent_left(tmp_path):
    """The parent leaves a persistent node (the handler hangs up on its agent) while a
    child it forked stays: the handler still serves that child, and the agent must not
    (a page read then has its bytes); only once the handler has exited does the agent
    serve it (a lost page raises SIGBUS)."""
    path = tmp_path / "node.sock"
    handler = subprocess.Popen([sys.executable, "-m", "ufcram.handler", "--listen", str(path),
                                "--persist", "--capacity", str(16 << 20)],
                               env={**os.environ, "UFCRAM_SPIN_US": "0"})
    try:
        out = run_app(f"""
            node = ufcram.Node.connect({str(path)!r})
            region = ufcram.Region(PAGES * PAGE_SIZE, node=node)
            a = region.array(np.uint8, (PAGES, PAGE_SIZE))
            a[:48] = data[:48]
            assert region.demote(0, 16 * PAGE_SIZE) == 16
            go_r, go_w = os.pipe()
            done_r, done_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                # the child's copy of the connection kept the parent a client
                os.close(node.connection.sock.fileno())
                os.read(go_r, 1)
                right = []
                for i in (0, 1, 2, 4, 5, 6, 7, 9, 10, 11):   # each a fair race, were
                    time.sleep(0.01)                          # the agent to read too
                    right.append(np.array_equal(a[i], data[i]))
                check("served by the live handler", all(right))
                os.write(done_w, b"x")
                os.read(go_r, 1)
                check("resident", np.array_equal(a[16:48], data[16:48]))
                touch_lost(a)
                os._exit(0)
            del a
            node.close()
            time.sleep(0.5)                    # the agent has seen the hang-up
            os.write(go_w, b"x")
            os.read(done_r, 1)
            os.kill({handler.pid}, signal.SIGKILL)
            os.write(go_w, b"x")
            status = os.waitpid(pid, 0)[1]
            check("child got SIGBUS",
                  os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS)
        """, prelude=textwrap.dedent("""
            import os, signal, time
            import numpy as np, ufcram
            from ufcram import PAGE_SIZE
            PAGES = 64
            data = np.random.default_rng(1).integers(1, 256, (PAGES, PAGE_SIZE), np.uint8)
        """) + HELPERS)
    finally:
        handler.kill()
        handler.wait()
    assert_checks(out, ["served by the live handler", "resident", "child got SIGBUS"])
    assert out.returncode == 0, out.stderr
    assert "pages it held for children of pid" in out.stderr, out.stderr


def test_forks_while_the_handler_lives_do_not_pile_up_descriptors():
    """The agent keeps a uffd per child forked while the handler lives, and lets each go
    once its child has exited: the parent's descriptors stay bounded."""
    out = run_app("""
        def cycle():
            pid = os.fork()
            if pid == 0:
                os._exit(0 if np.array_equal(a[16], data[16]) else 3)
            return os.waitpid(pid, 0)[1]

        check("first child", cycle() == 0)
        time.sleep(0.2)
        before, uffds_before = fds(), fds("anon_inode:[userfaultfd]")
        check("children", all(cycle() == 0 for _ in range(50)))
        time.sleep(0.2)
        after, uffds_after = fds(), fds("anon_inode:[userfaultfd]")
        print("descriptors", before, after, "uffds", uffds_before, uffds_after)
        check("descriptors bounded", after <= before + 1 and uffds_after <= uffds_before + 1)
        check("parent unchanged", np.array_equal(a[16:48], data[16:48]) and
              np.array_equal(a[8], data[8]))
    """, prelude=SETUP)
    assert_checks(out, ["first child", "children", "descriptors bounded", "parent unchanged"])
    assert out.returncode == 0, out.stderr
    # the handler leaves at exit with no child alive: nothing of theirs was lost
    assert "the fault handler is gone" not in out.stderr, out.stderr


def test_malformed_adopt_commands_are_refused_without_a_leak():
    """ADOPT (a child's uffd and the handler's pidfd, no reply) is checked like every
    agent command: anything else is closed, said once, and the agent keeps serving."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import mmap, os, socket, struct
        from ufcram._shim import lib
        from ufcram.handler.agent import CMD, REPLY
        from ufcram.app.uffd import Uffd, address_of
        STAGING = 16 * 4096
        uffd = Uffd.open()
        staging_fd = os.memfd_create("staging")
        os.ftruncate(staging_fd, STAGING)
        staging = mmap.mmap(staging_fd, STAGING)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert lib.ufc_agent_start(uffd.fd, ours.fileno(), address_of(staging), STAGING) == 0
        ours.detach()
        theirs.settimeout(10)

        def count():
            return len(os.listdir("/proc/self/fd"))

        def head(op=lib.UFC_AGENT_ADOPT, seq=0, nruns=0, magic=lib.UFC_AGENT_MAGIC):
            return CMD.pack(magic, op, seq, nruns, 0)

        seq = 0
        def ping(extra=b"", fds=()):
            global seq
            seq += 1
            socket.send_fds(theirs, [head(lib.UFC_AGENT_PING, seq) + extra], list(fds))
            for fd in fds:
                os.close(fd)
            _, rseq, status, _, _ = REPLY.unpack(theirs.recv(64))
            return rseq == seq and status

        def adopt(data, fds):
            socket.send_fds(theirs, [data], fds)
            for fd in fds:
                os.close(fd)

        child = lambda: Uffd.open().fd
        pidfd = lambda: os.pidfd_open(os.getpid())
        def pipe():
            r, w = os.pipe()
            os.close(w)
            return r

        assert ping() == 0
        before = count()
        adopt(head(), [])
        adopt(head(), [child()])
        adopt(head(), [pipe(), pidfd()])
        adopt(head(), [child(), pipe()])
        adopt(head(), [pidfd(), child()])
        adopt(head(), [child(), pidfd(), pipe()])
        adopt(head(nruns=1) + bytes(16), [child(), pidfd()])
        adopt(head(magic=0), [child(), pidfd()])
        adopt(head() + bytes(8), [child(), pidfd()])
        print("ping with a descriptor", ping(fds=[pipe()]) == -74)   # EBADMSG
        print("nothing kept", ping() == 0 and count() == before)
        adopt(head(), [child(), pidfd()])
        adopt(head(), [child(), pidfd()])
        print("two kept, one pidfd", ping() == 0 and count() == before + 3)
    """)], capture_output=True, text=True, timeout=60, preexec_fn=no_core)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "ping with a descriptor True", "nothing kept True", "two kept, one pidfd True"], \
        out.stdout + out.stderr
    assert out.stderr.count("refused a forked child's uffd") == 1, out.stderr


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
