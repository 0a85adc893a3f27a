"""The ufcram demo: a library-managed region demoted into a compressed node and read
back, with the process's RSS (psutil) at each step and the node's compression."""
import argparse
import time

import numpy as np
import psutil

import ufcram

MiB = 1 << 20


def rss():
    return psutil.Process().memory_info().rss / MiB


def fill(a):
    """A data set that looks like real memory: a smooth signal, counters, a sparse
    table of zeros, and a tail of noise."""
    n = len(a)
    q = n // 4
    a[:q] = np.sin(np.arange(q) / 500.0).round(3)
    a[q:2 * q] = np.arange(q) // 7
    a[2 * q:3 * q] = 0.0
    a[3 * q::97] = 1.0
    a[-n // 32:] = np.random.default_rng(0).random(n // 32)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64, help="region size in MiB (default 64)")
    args = parser.parse_args()
    size = args.mib * MiB
    rows = []

    def step(what, t0=None):
        took = "" if t0 is None else f"{time.perf_counter() - t0:6.2f} s"
        rows.append((what, rss(), took))
        print(f"  {what:<44} RSS {rows[-1][1]:8.1f} MiB  {took}", flush=True)

    print(f"ufcram demo: a {args.mib} MiB region on its own compressed node")
    with ufcram.Node() as node, ufcram.Region(size, node=node) as region:
        print(f"  handler pid {node.pid}; region at {region.address:#x}")
        step("start")
        a = region.array(np.float64)
        t0 = time.perf_counter()
        fill(a)
        checksum = float(a.sum())
        step("filled (first touch: pages zero-filled)", t0)
        t0 = time.perf_counter()
        pages = region.demote()
        step(f"demoted {pages} pages into the node", t0)
        s = node.stats()
        ratio = s["orig_data_size"] / max(s["mem_used_total"], 1)
        print(f"  node holds {s['orig_data_size'] / MiB:.1f} MiB in "
              f"{s['mem_used_total'] / MiB:.1f} MiB (x{ratio:.2f}), "
              f"{s['same_pages']} same-filled pages")
        t0 = time.perf_counter()
        again = float(a.sum())
        step("read back (mapped read-only, entries kept)", t0)
        st = region.stats()
        ok = again == checksum
        print(f"  restores {st['restores']}, read-only pages {st['readonly']}, checksum "
              f"{'equal' if ok else 'DIFFERENT'} ({checksum:.6g})")
        t0 = time.perf_counter()
        region.demote()
        step("demoted again: clean pages only dropped", t0)
        print(f"  clean re-demotions {region.stats()['clean_redemotions']} "
              "(no copy, no compression: the node still holds them)")
        ok = ok and float(a.sum()) == checksum
        freed = rows[1][1] - rows[2][1]
        print(f"  demotion released {freed:.1f} MiB of {args.mib} MiB from this process")
        del a
    if not ok:
        raise SystemExit("data mismatch after restore")


if __name__ == "__main__":
    main()
