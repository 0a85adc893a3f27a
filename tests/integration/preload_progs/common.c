/* Helpers shared by the preload test programs. Each program #includes this file, so the
 * test compiles one source file per program.
 *
 * Convention: exit 0 when every check passed, 1 when a check failed, 2 when a
 * precondition failed (memory the test meant to be demoted was resident), each with a
 * line on stderr saying what. With --demoted the test tells a program that it runs under
 * a resident limit well below its working set (a quarter of each buffer or less): it
 * then insists that the buffers an operation uses are mostly demoted beforehand, so that
 * a check cannot pass on resident memory alone. */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define HELPER static __attribute__((unused))
#define MiB ((size_t)1 << 20)
#define PAGE 4096UL
#define WATCHDOG_SECONDS 30

static int expect_demotion;

HELPER void die(int status, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(status);
}

#define fail(...) die(1, __VA_ARGS__)

/* Every 8-byte word differs by seed and position, so a page restored to the wrong place,
 * from the wrong process or from an older write shows up as a mismatch; and the high
 * bytes repeat, so the pool compresses it as it would real memory. */
HELPER uint64_t pattern(uint64_t seed, size_t word)
{
	return (seed * 0x9E3779B97F4A7C15ull) << 40 ^ word;
}

HELPER void fill(void *buf, size_t len, uint64_t seed)
{
	uint64_t *w = buf;
	for (size_t i = 0; i < len / 8; i++)
		w[i] = pattern(seed, i);
}

/* The words of buf in [from, to) (byte offsets, multiples of 8) hold pattern seed. */
HELPER void expect_range(const char *what, const void *buf, size_t from, size_t to,
			 uint64_t seed)
{
	const uint64_t *w = buf;
	for (size_t i = from / 8; i < to / 8; i++)
		if (w[i] != pattern(seed, i))
			fail("%s: byte %zu is wrong (word %#" PRIx64 ", want %#" PRIx64 ")", what,
			     i * 8, w[i], pattern(seed, i));
}

HELPER void expect_pattern(const char *what, const void *buf, size_t len, uint64_t seed)
{
	expect_range(what, buf, 0, len, seed);
}

HELPER void expect_zeros(const char *what, const void *buf, size_t len)
{
	const unsigned char *b = buf;
	for (size_t i = 0; i < len; i++)
		if (b[i])
			fail("%s: byte %zu of %zu is %#x, not zero", what, i, len, b[i]);
}

HELPER double resident_fraction(const void *buf, size_t len)
{
	uintptr_t start = (uintptr_t)buf & ~(PAGE - 1);
	size_t pages = ((uintptr_t)buf + len - start + PAGE - 1) / PAGE;
	unsigned char *vec = calloc(pages, 1);
	if (!vec || mincore((void *)start, pages * PAGE, vec))
		die(2, "mincore: %s", strerror(errno));
	size_t resident = 0;
	for (size_t i = 0; i < pages; i++)
		resident += vec[i] & 1;
	free(vec);
	return (double)resident / (double)pages;
}

/* With --demoted: at least half of buf must be demoted now. (Filling a buffer several
 * times the limit leaves only about the limit of it resident: the handler demotes the
 * largest regions' coldest pages first.) The handler enforces the limit right after
 * the faults that broke it, so allow it a moment. */
HELPER void require_demoted(const char *what, const void *buf, size_t len)
{
	if (!expect_demotion)
		return;
	double resident = 1.0;
	for (int i = 0; i < 500; i++) {
		resident = resident_fraction(buf, len);
		if (resident <= 0.5)
			return;
		struct timespec ms10 = { 0, 10 * 1000 * 1000 };
		nanosleep(&ms10, NULL);
	}
	die(2, "precondition: %s is still %.0f%% resident; the resident limit did not "
	       "demote it", what, 100 * resident);
}

/* Read --demoted, and arm a watchdog: a program stuck on a fault the handler never
 * resolves dies of SIGALRM within seconds rather than at the test's timeout. */
HELPER void setup(int argc, char **argv)
{
	for (int i = 1; i < argc; i++)
		if (!strcmp(argv[i], "--demoted"))
			expect_demotion = 1;
	alarm(WATCHDOG_SECONDS);
}

/* A program of several checks runs the one its first argument names. */
struct check {
	const char *name;
	void (*run)(void);
};

/* setup(), then the check argv[1] names: prints "ok" and returns 0 once it has passed
 * (a failed check exits on its own); an unknown name gets the usage line, status 2. */
HELPER int run_named(int argc, char **argv, const struct check *checks, size_t n)
{
	setup(argc, argv);
	for (size_t i = 0; i < n; i++)
		if (argc > 1 && !strcmp(argv[1], checks[i].name)) {
			checks[i].run();
			puts("ok");
			return 0;
		}
	const char *slash = strrchr(argv[0], '/');
	fprintf(stderr, "usage: %s", slash ? slash + 1 : argv[0]);
	for (size_t i = 0; i < n; i++)
		fprintf(stderr, "%c%s", i ? '|' : ' ', checks[i].name);
	fputs(" [--demoted]\n", stderr);
	return 2;
}

HELPER void *xmalloc(size_t len)
{
	void *p = malloc(len);
	if (!p)
		fail("malloc(%zu) failed", len);
	return p;
}
