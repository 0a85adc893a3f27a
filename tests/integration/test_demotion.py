"""Demotion's two ways out, on the real kernel: moved (UFFDIO_MOVE), or copied
(write-protect, copy, MADV_DONTNEED) and dropped. Both give every byte back; pages shared
with a forked child cannot move and go the old way, and the child keeps its own."""
import os

import numpy as np
import pytest

import ufcram
from ufcram import PAGE_SIZE
from ufcram.errors import HandlerError

from .pages import filled, random_pages, text_pages

pytestmark = pytest.mark.timeout(90)
MiB = 1 << 20


def mixed(n, seed):
    data = np.concatenate([random_pages(n // 2, seed), text_pages(n - n // 2, seed)])
    data[::7] = 0          # same-filled pages, stored as one word
    return data[np.random.default_rng(seed).permutation(n)]


class Child:
    """A forked child that compares its view a with data once told to (check), after
    the parent has demoted the pages they share."""

    def __init__(self, a, data):
        go_r, self.go = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.go)
            os.read(go_r, 1)
            os._exit(0 if np.array_equal(a, data) else 1)
        os.close(go_r)

    def check(self):
        os.write(self.go, b"!")
        os.close(self.go)
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child read wrong bytes"


@pytest.fixture(params=["1", "0"], ids=["move", "copy"])
def way(request, monkeypatch):
    """UFCRAM_MOVE for the handler the test starts (it reads it at start)."""
    monkeypatch.setenv("UFCRAM_MOVE", request.param)
    return request.param


def test_dirty_pages_come_back_exact_by_either_way(way):
    data = mixed(512, 1)
    with ufcram.Node(capacity=64 * MiB) as node:
        r, a = filled(node, data, write_budget=0)
        first, count = 37, 300   # runs that start and end inside the region
        assert r.demote(first * PAGE_SIZE, count * PAGE_SIZE) == count
        s = r.stats()
        assert s["demoted"] == count and s["moved"] == (count if way == "1" else 0)
        assert np.array_equal(a, data)
        a[first:first + count:2] = data[::-1][first:first + count:2]   # written back
        data[first:first + count:2] = data[::-1][first:first + count:2]
        r.demote()
        assert np.array_equal(a, data)
        r.close()


def test_pages_shared_with_a_live_child_go_by_copy_and_both_keep_their_bytes(way):
    data = mixed(256, 2)
    with ufcram.Node(capacity=64 * MiB) as node:
        r, a = filled(node, data, write_budget=0)
        child = Child(a, data)   # reads its pages once the parent has demoted them
        moved_before = r.stats()["moved"]
        assert r.demote() == len(data)
        assert r.stats()["moved"] == moved_before   # shared: none could move
        child.check()
        assert np.array_equal(a, data)
        r.close()


def test_once_the_child_has_written_its_copy_the_parents_pages_move_again():
    """A page stays shared until one side writes it: the child's write gives it a copy
    of its own, after which the parent's page is its alone and moves."""
    data = mixed(64, 3)
    with ufcram.Node(capacity=64 * MiB) as node:
        r, a = filled(node, data, write_budget=0)
        pid = os.fork()
        if pid == 0:
            a[:] = 1   # every page copied, then the child exits
            os._exit(0)
        os.waitpid(pid, 0)
        a[:] = data    # the parent writes too: a page shared once is no longer movable
        moved_before = r.stats()["moved"]
        assert r.demote() == len(data)
        assert r.stats()["moved"] - moved_before == len(data)
        assert np.array_equal(a, data)
        r.close()


def test_memory_the_books_hold_but_the_uffd_does_not_is_never_taken():
    """A move needs no registration of its source, so the agent checks it: pages the
    handler's books hold where the client's uffd no longer has the range (here
    unregistered under the handler's feet) do not move; the copy's protection then
    fails there (ENOENT), the demotion is refused, and every byte stays."""
    data = mixed(32, 4)
    with ufcram.Node(capacity=64 * MiB) as node:
        r, a = filled(node, data, write_budget=0)   # present: NORMAL in the books
        node.connection.uffd.unregister(r.address, r.nbytes)
        with pytest.raises(HandlerError, match="No such file"):
            r.demote()
        assert np.array_equal(a, data), "memory outside the uffd was taken"
        assert r.stats()["moved"] == 0
        node.connection.uffd.register(r.address, r.nbytes)   # so close() finds it
        r.close()


def test_clean_pages_go_again_by_either_way_and_read_back_exact(way):
    """Read back (read-only, the node keeps their entries), then demoted again: only
    dropped, moved away and thrown away (DISCARD) or dropped by MADV_DONTNEED."""
    data = mixed(256, 5)
    with ufcram.Node(capacity=64 * MiB) as node:
        r, a = filled(node, data, write_budget=0)
        r.demote()
        for round_ in range(3):
            assert np.array_equal(a[::2], data[::2])   # every other page read back
            before = r.stats()["clean_redemotions"]
            r.demote()
            assert r.stats()["clean_redemotions"] - before == len(data[::2])
        assert np.array_equal(a, data)
        r.close()


def test_clean_pages_shared_with_a_live_child_are_dropped_and_both_read_exact(way):
    data = mixed(128, 6)
    with ufcram.Node(capacity=64 * MiB) as node:
        r, a = filled(node, data, write_budget=0)
        r.demote()
        assert np.array_equal(a, data)   # all read back: read-only, shared after the fork
        child = Child(a, data)
        before = r.stats()["clean_redemotions"]
        r.demote()
        assert r.stats()["clean_redemotions"] - before == len(data)
        child.check()
        assert np.array_equal(a, data)
        r.close()
