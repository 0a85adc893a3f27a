"""First touch under `ufcram run` against a plain run: what coverage by mapping costs a
program that fills fresh memory (every page of it is registered, so its first touch
faults to the handler unless the page was in use before the library found it).

    python benchmarks/bench_first_touch.py [--mib N] [--repeats R] [--limit SIZE]

A small C program maps N MiB (1024 by default) with malloc, touches every page once in
order, then maps as much again and touches every page in a random order; it prints the
seconds each took. Both run plainly and under `ufcram run` (no resident limit unless
--limit), R times each; the table gives the median seconds, µs per page and the ratio.
Asserts nothing: a benchmark, not a test.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

PROGRAM = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) {
	struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
	size_t pages = (size_t)atol(argv[1]) << 8;
	volatile char *a = malloc(pages << 12), *b = malloc(pages << 12);
	uint64_t x = 88172645463325252ull;
	double t0 = now();
	for (size_t i = 0; i < pages; i++) a[i << 12] = 1;
	double t1 = now();
	for (size_t i = 0; i < pages; i++) {   /* xorshift: a page at random, each once-ish */
		x ^= x << 13; x ^= x >> 7; x ^= x << 17;
		b[(x % pages) << 12] = 1;
	}
	double t2 = now();
	printf("%.6f %.6f\n", t1 - t0, t2 - t1);
	return 0;
}
"""


def build(tmp):
    gcc = shutil.which("gcc") or sys.exit("gcc is needed to build the first-touch program")
    src, exe = os.path.join(tmp, "touch.c"), os.path.join(tmp, "touch")
    with open(src, "w") as f:
        f.write(PROGRAM)
    subprocess.run([gcc, "-O2", "-o", exe, src], check=True)
    return exe


def timed(argv):
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return [float(x) for x in out.split()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", help="resident limit for the ufcram run (e.g. 256M)")
    args = parser.parse_args()
    ufcram = [sys.executable, "-m", "ufcram", "run", "--quiet",
              *(["--resident-limit", args.limit] if args.limit else []), "--"]
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        runs = {"plain": [], "ufcram": []}
        for _ in range(args.repeats):   # interleaved: drift hits both alike
            runs["plain"].append(timed([exe, str(args.mib)]))
            runs["ufcram"].append(timed([*ufcram, exe, str(args.mib)]))
    pages = args.mib << 8
    print(f"first touch of {args.mib} MiB, median of {args.repeats} "
          f"(ufcram run {'--resident-limit ' + args.limit if args.limit else 'with no limit'})")
    print(f"{'order':<12}{'plain s':>10}{'ufcram s':>10}{'plain µs/page':>15}"
          f"{'ufcram µs/page':>16}{'ratio':>8}")
    for i, order in enumerate(("sequential", "random")):
        plain = statistics.median(r[i] for r in runs["plain"])
        under = statistics.median(r[i] for r in runs["ufcram"])
        print(f"{order:<12}{plain:>10.3f}{under:>10.3f}{plain / pages * 1e6:>15.2f}"
              f"{under / pages * 1e6:>16.2f}{under / plain:>7.2f}x")


if __name__ == "__main__":
    main()
