"""The stress module, bounded for CI: processes, threads, forks and capacity changes on
one node find no wrong byte; and the fork races it found, each pinned by a test.
"""
import json
import os
import select
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import ufcram
from ufcram import PAGE_SIZE, Region
from ufcram.tools.stress import KINDS

pytestmark = pytest.mark.timeout(150)
MiB = 1 << 20


def test_bounded_stress_run_finds_no_wrong_byte():
    cmd = [sys.executable, "-m", "ufcram.tools.stress", "--minutes", "0.4", "--processes", "2",
           "--threads", "2", "--seed", "7", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=130)
    assert done.stdout.strip(), f"no report; stderr ends with:\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failures"] == [] and report["wrong_bytes"] == 0, report
    assert all(report["ops"][kind] > 0 for kind in KINDS), report["ops"]
    assert report["pages_demoted"] > 0 and report["restores"] > 0
    assert done.returncode == 0


def child_writes_every_page(a, trial):
    """Fork; the child checks its bytes and writes every page. True if it answered."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: numpy only, then out
        ok = bool((a[:, 0] == np.uint8(trial)).all())
        a[:, 1] = 1
        os.write(wfd, b"1" if ok else b"0")
        os._exit(0)
    os.close(wfd)
    ready, _, _ = select.select([rfd], [], [], 3.0)
    answer = os.read(rfd, 1) if ready else b""
    os.close(rfd)
    if not answer:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    assert answer != b"0", "the child read wrong bytes"
    return bool(answer)


def test_child_forked_during_a_demotion_can_write_its_pages():
    with ufcram.Node(capacity=1024 * MiB) as node:
        r = Region(64 * MiB, node=node)
        a = r.array(np.uint8, (r.nbytes // PAGE_SIZE, PAGE_SIZE))
        try:
            for trial in range(25):   # each fork lands in a batch in flight ~1 in 3
                a[:, 0] = trial
                demotion = threading.Thread(target=r.demote)
                demotion.start()
                time.sleep(0.05)      # well inside the demotion's batches
                answered = child_writes_every_page(a, trial)
                demotion.join()
                assert answered, f"trial {trial}: the child hung on a write"
        finally:
            del a
            r.close()


def forked_child_checks_after(a, trial):
    """Fork a child that waits for a byte on a pipe, then checks its bytes; returns
    (go, answer) descriptors and its pid."""
    go_r, go_w = os.pipe()
    ans_r, ans_w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: numpy only, then out
        os.read(go_r, 1)
        ok = bool((a[:, 0] == np.uint8(trial)).all() and (a[:, 7] == np.uint8(7)).all())
        os.write(ans_w, b"1" if ok else b"0")
        os._exit(0)
    os.close(go_r)
    os.close(ans_w)
    return go_w, ans_r, pid


def test_child_forked_during_a_clean_drop_keeps_its_bytes_through_promotion():
    """A child forked while clean pages are being dropped has them absent or still
    mapped; when overflow later promotes its read-only pages, every byte must stay."""
    with ufcram.Node(capacity=1024 * MiB) as node:
        r = Region(64 * MiB, node=node)
        a = r.array(np.uint8, (r.nbytes // PAGE_SIZE, PAGE_SIZE))
        a[:, 7] = 7
        try:
            for trial in range(8):
                a[:, 0] = trial
                r.demote()
                assert (a[:, 0] == trial).all()            # read back: read-only
                demotion = threading.Thread(target=r.demote)   # clean drops
                demotion.start()
                time.sleep(0.002 * (trial % 4))
                go, answer, pid = forked_child_checks_after(a, trial)
                demotion.join()
                node.set_capacity(1)                       # overflow: promote all
                node.set_capacity(1024 * MiB)
                os.write(go, b"1")
                ready, _, _ = select.select([answer], [], [], 10.0)
                got = os.read(answer, 1) if ready else b""
                os.close(go)
                os.close(answer)
                if not got:
                    os.kill(pid, 9)
                os.waitpid(pid, 0)
                assert got == b"1", f"trial {trial}: the child read wrong bytes ({got!r})"
        finally:
            del a
            r.close()
