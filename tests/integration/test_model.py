"""A randomized model test of the whole state machine against a reference copy:
several threads read, write and free their own pages while the main thread demotes
arbitrary ranges and moves the node's capacity, under a resident limit and a small
write budget. Seeded, with a fixed budget of operations; every byte is compared."""
import mmap
import threading

import numpy as np
import pytest

import ufcram
from ufcram import PAGE_SIZE, Region

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
PAGES = 192
THREADS = 3


def page_content(rng):
    """Compressible, incompressible or same-filled, as memory is."""
    kind = rng.integers(3)
    if kind == 0:
        return np.full(PAGE_SIZE, rng.integers(256), np.uint8)
    if kind == 1:
        return rng.integers(0, 256, PAGE_SIZE, np.uint8)
    return np.repeat(rng.integers(0, 256, 64, np.uint8), 64)


def worker(seed, a, ref, mm, mine, ops, errors):
    rng = np.random.default_rng(seed)
    for _ in range(ops):
        page = int(rng.choice(mine))
        op = rng.integers(10)
        if op < 4:                                    # read a page, compare
            if not np.array_equal(a[page], ref[page]):
                errors.append(("read", page))
        elif op < 8:                                  # write part of a page
            lo = int(rng.integers(0, PAGE_SIZE - 64))
            chunk = page_content(rng)[:int(rng.integers(1, 64))]
            a[page, lo:lo + len(chunk)] = chunk
            ref[page, lo:lo + len(chunk)] = chunk
        elif op < 9:                                  # rewrite a whole page
            ref[page] = page_content(rng)
            a[page] = ref[page]
        else:                                         # free it: zeros from now on
            mm.madvise(mmap.MADV_DONTNEED, page * PAGE_SIZE, PAGE_SIZE)
            ref[page] = 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_across_threads_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    with ufcram.Node(capacity=4 * MiB) as node, \
            Region(PAGES * PAGE_SIZE, node=node, resident_limit=96 * PAGE_SIZE,
                   write_budget=8) as r:
        a = r.array(np.uint8, (PAGES, PAGE_SIZE))
        ref = np.zeros((PAGES, PAGE_SIZE), np.uint8)
        errors = []
        threads = [threading.Thread(target=worker, args=(
            seed * 100 + t, a, ref, r._mm, np.arange(t, PAGES, THREADS), 600, errors))
            for t in range(THREADS)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            first = int(rng.integers(PAGES))
            count = int(rng.integers(1, PAGES - first + 1))
            r.demote(first * PAGE_SIZE, count * PAGE_SIZE)
            if rng.integers(8) == 0:                  # the balloon moves
                node.set_capacity(int(rng.choice([MiB // 2, MiB, 4 * MiB])))
        for t in threads:
            t.join(60)
        assert errors == []
        assert np.array_equal(a, ref), "wrong bytes after the run"
        s = r.stats()
        assert sum(s[k] for k in ("untouched", "normal", "demoting", "demoted",
                                  "readonly", "writable")) == PAGES
        assert s["demoting"] == 0 and s["writable"] <= 8
        assert s["demotions"] > 0 and s["restores"] > 0
        del a
