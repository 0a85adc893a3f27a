/* Memory semantics programs rely on, each on memory the node demoted, each checked byte
 * by byte: madvise (MADV_FREE, MADV_DONTNEED, MADV_DONTFORK, MADV_WIPEONFORK), mprotect
 * of part of a mapping, the heap shrunk and grown with sbrk, MAP_POPULATE, a signal
 * handler on an alternate stack, threads started before main, vfork and posix_spawn, a
 * mapping moved by mremap with a new one made where it was.
 * usage: semantics madv-free|madv-dontneed|dontneed-ahead|dontfork|wipeonfork|mprotect-split|
 *                  brk-shrink|map-populate|sigaltstack|early-threads|vfork|posix-spawn|
 *                  mremap-reuse|munmap-in-flight|mremap-part-back|
 *                  mremap-part-in-flight [--demoted]
 * (mremap-part-in-flight is not in the suite yet: the node does not settle every page an
 * mremap moves while in flight; see issue 15's notes.) */
#include "common.c"

#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#define SIZE (8 * MiB)
/* a mapping in three parts, the middle one treated apart; each part is large enough
 * that a resident limit of 2 MiB leaves at most half of it resident */
#define THIRD (4 * MiB)
#define THIRDS (3 * THIRD)

extern char **environ;

static char *map(size_t len, int flags)
{
	char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | flags,
		       -1, 0);
	if (m == MAP_FAILED)
		die(2, "mmap(%zu): %s", len, strerror(errno));
	return m;
}

static void advise(void *addr, size_t len, int advice, const char *name)
{
	if (madvise(addr, len, advice))
		die(2, "madvise(%s): %s", name, strerror(errno));
}

/* The words of buf in [from, to) (byte offsets, multiples of 8) get pattern seed, each
 * word numbered from buf as fill() numbers them, so expect_range() reads them back. */
static void fill_range(void *buf, size_t from, size_t to, uint64_t seed)
{
	uint64_t *w = buf;
	for (size_t i = from / 8; i < to / 8; i++)
		w[i] = pattern(seed, i);
}

static int range_is(const void *buf, size_t from, size_t to, uint64_t seed)
{
	const uint64_t *w = buf;
	for (size_t i = from / 8; i < to / 8; i++)
		if (w[i] != pattern(seed, i))
			return 0;
	return 1;
}

static int range_is_zero(const void *buf, size_t from, size_t to)
{
	const uint64_t *w = buf;
	for (size_t i = from / 8; i < to / 8; i++)
		if (w[i])
			return 0;
	return 1;
}

static int wait_status(pid_t pid, const char *who)
{
	int status;
	if (pid < 0)
		die(2, "%s: cannot start it: %s", who, strerror(errno));
	if (waitpid(pid, &status, 0) != pid)
		die(2, "waitpid for %s: %s", who, strerror(errno));
	return status;
}

/* A forked child of ours ended with status 0 (else it said why on stderr). */
static void wait_ok(pid_t pid, const char *who)
{
	int status = wait_status(pid, who);
	if (!WIFEXITED(status) || WEXITSTATUS(status))
		fail("the %s failed (wait status %#x; its reason is above)", who, status);
}

/* --- madvise ----------------------------------------------------------------------------- */

/* MADV_FREE lets the kernel drop each page until it is written again: a page then reads
 * either as zeros (dropped) or as it was (kept), never anything else, and a written page
 * holds what was written. The buffer is written twice before, so the node held an older
 * copy of each page at some point: an older copy coming back would show. MADV_PAGEOUT
 * then makes the kernel actually drop the lazily freed pages that are resident. */
static void check_madv_free(void)
{
	char *m = map(SIZE, 0);
	fill(m, SIZE, 1);
	require_demoted("the buffer", m, SIZE);
	fill(m, SIZE, 2);
	require_demoted("the buffer, rewritten", m, SIZE);
	advise(m, SIZE, MADV_FREE, "MADV_FREE");
	if (madvise(m, SIZE, MADV_PAGEOUT) && errno != EINVAL) /* EINVAL: an older kernel */
		die(2, "madvise(MADV_PAGEOUT): %s", strerror(errno));
	const size_t pages = SIZE / PAGE;
	for (size_t p = 0; p < pages; p += 4) /* every fourth page is written */
		fill_range(m, p * PAGE, (p + 1) * PAGE, 3);
	size_t zero = 0, kept = 0;
	for (size_t p = 0; p < pages; p++) {
		size_t from = p * PAGE, to = from + PAGE;
		if (p % 4 == 0)
			expect_range("a page written after MADV_FREE", m, from, to, 3);
		else if (range_is_zero(m, from, to))
			zero++;
		else if (range_is(m, from, to, 2))
			kept++;
		else {
			const uint64_t *w = (const uint64_t *)(m + from);
			fail("page %zu, not written after MADV_FREE, is neither all zeros nor as it "
			     "was (first words %#" PRIx64 " %#" PRIx64 "; %s)", p, w[0], w[1],
			     range_is(m, from, to, 1) ? "an older copy of the page" : "unknown bytes");
		}
	}
	fprintf(stderr, "madv-free: of the %zu pages not written, %zu read as zeros, %zu as "
		"they were\n", pages - pages / 4, zero, kept);
	/* written all over, the buffer is plain memory again, demoted and restored as ever */
	fill(m, SIZE, 4);
	require_demoted("the buffer, written after MADV_FREE", m, SIZE);
	expect_pattern("the buffer, written after MADV_FREE and demoted", m, SIZE, 4);
	munmap(m, SIZE);
}

/* MADV_DONTNEED of part of a demoted buffer (pages read back from the node and pages
 * still on it, and a single page apart): that part reads as zeros, also after the
 * buffer went through the node again, and the rest keeps its bytes. */
static void check_madv_dontneed(void)
{
	const size_t from = SIZE / 8, to = 5 * SIZE / 8, lone = SIZE - 3 * PAGE;
	char *m = map(SIZE, 0);
	fill(m, SIZE, 1);
	require_demoted("the buffer", m, SIZE);
	expect_range("the buffer's first quarter, read back", m, 0, SIZE / 4, 1);
	advise(m + from, to - from, MADV_DONTNEED, "MADV_DONTNEED");
	advise(m + lone, PAGE, MADV_DONTNEED, "MADV_DONTNEED");
	for (int round = 0; round < 3; round++) { /* each read-through demotes the most of it */
		expect_range("the head, before the range advised MADV_DONTNEED", m, 0, from, 1);
		expect_zeros("the range advised MADV_DONTNEED", m + from, to - from);
		expect_range("the tail, after the range advised MADV_DONTNEED", m, to, lone, 1);
		expect_zeros("the single page advised MADV_DONTNEED", m + lone, PAGE);
		expect_range("the last two pages", m, lone + PAGE, SIZE, 1);
		require_demoted("the buffer, after MADV_DONTNEED", m, SIZE);
	}
	fill_range(m, from, to, 2);
	require_demoted("the buffer, the advised range rewritten", m, SIZE);
	expect_range("the head", m, 0, from, 1);
	expect_range("the range advised MADV_DONTNEED, rewritten", m, from, to, 2);
	expect_range("the tail", m, to, lone, 1);
	munmap(m, SIZE);
}

/* MADV_DONTNEED of single pages by one thread just ahead of another that reads the
 * demoted mapping in order: the reader's faults bring runs of pages in (fault-around)
 * that reach the pages being freed, and the kernel lets the freeing thread go on as soon
 * as the node has read its REMOVE event. A freed page reads zeros from then on, never
 * the copy the node had of it; every other page keeps its bytes. 16 rounds. */
#define AHEAD_EVERY 4 /* pages p with p % AHEAD_EVERY == AHEAD_EVERY - 1 are freed */
#define AHEAD_LEAD 3  /* ... when the reader is this many pages before them */

struct ahead {
	char *buf;
	volatile size_t at; /* the page the reader is on */
	volatile int done;
};

static void *free_ahead_main(void *arg)
{
	struct ahead *h = arg;
	for (size_t p = AHEAD_EVERY - 1; p < SIZE / PAGE; p += AHEAD_EVERY) {
		while (h->at + AHEAD_LEAD < p && !h->done)
			;
		advise(h->buf + p * PAGE, PAGE, MADV_DONTNEED, "MADV_DONTNEED");
	}
	return NULL;
}

static void check_dontneed_ahead(void)
{
	char *m = map(SIZE, 0);
	for (uint64_t round = 1; round <= 16; round++) {
		fill(m, SIZE, round);
		require_demoted("the buffer", m, SIZE);
		struct ahead h = { m, 0, 0 };
		pthread_t t;
		if (pthread_create(&t, NULL, free_ahead_main, &h))
			die(2, "pthread_create failed");
		uint64_t sum = 0;
		for (size_t p = 0; p < SIZE / PAGE; p++) {
			h.at = p;
			sum += *(volatile uint64_t *)(m + p * PAGE + 8 * (round % 512));
		}
		h.done = 1;
		pthread_join(t, NULL);
		__asm__ volatile("" : : "r"(sum));
		for (size_t p = 0; p < SIZE / PAGE; p++) {
			size_t from = p * PAGE, to = from + PAGE;
			if (p % AHEAD_EVERY != AHEAD_EVERY - 1)
				expect_range("a page kept", m, from, to, round);
			else if (!range_is_zero(m, from, to))
				fail("round %" PRIu64 ": page %zu, freed with MADV_DONTNEED while the "
				     "reader's faults came near, is not zeros (%s)", round, p,
				     range_is(m, from, to, round) ? "the node's copy of it came back"
								  : "unknown bytes");
		}
	}
	munmap(m, SIZE);
}

/* The child of a fork has no mapping where the parent advised MADV_DONTFORK (mincore
 * says ENOMEM), and reads the rest as the parent wrote it; the parent keeps every byte.
 * Advised MADV_DOFORK again, the range is the child's too. */
static void check_dontfork(void)
{
	static unsigned char vec[THIRD / PAGE];
	char *m = map(THIRDS, 0);
	fill(m, THIRDS, 1);
	require_demoted("the buffer", m, THIRDS);
	advise(m + THIRD, THIRD, MADV_DONTFORK, "MADV_DONTFORK");
	pid_t pid = fork();
	if (pid == 0) {
		int rc = mincore(m + THIRD, THIRD, vec);
		if (!rc || errno != ENOMEM)
			fail("in the child, mincore of the range advised MADV_DONTFORK: %s, not "
			     "ENOMEM", rc ? strerror(errno) : "success");
		if (!mincore(m + THIRD + THIRD / 2, PAGE, vec) || errno != ENOMEM)
			fail("in the child, a page in the middle of the range advised MADV_DONTFORK "
			     "is mapped");
		expect_range("the child's view of the head", m, 0, THIRD, 1);
		expect_range("the child's view of the tail", m, 2 * THIRD, THIRDS, 1);
		fill_range(m, 0, THIRD, 2);
		expect_range("the child's head, written", m, 0, THIRD, 2);
		exit(0);
	}
	wait_ok(pid, "child of a fork with a range advised MADV_DONTFORK");
	expect_pattern("the parent's buffer after the child exited", m, THIRDS, 1);
	require_demoted("the parent's buffer, read back", m, THIRDS);
	advise(m + THIRD, THIRD, MADV_DOFORK, "MADV_DOFORK");
	pid = fork();
	if (pid == 0) {
		expect_pattern("the child's view after MADV_DOFORK", m, THIRDS, 1);
		exit(0);
	}
	wait_ok(pid, "child of a fork after MADV_DOFORK");
	expect_pattern("the parent's buffer at the end", m, THIRDS, 1);
	munmap(m, THIRDS);
}

/* The child of a fork reads zeros where the parent advised MADV_WIPEONFORK (the rest as
 * the parent wrote it) and may write there; the parent keeps every byte. Twice: the
 * second time the parent wrote the range anew and it went to the node again. */
static void check_wipeonfork(void)
{
	char *m = map(THIRDS, 0);
	fill(m, THIRDS, 1);
	require_demoted("the buffer", m, THIRDS);
	advise(m + THIRD, THIRD, MADV_WIPEONFORK, "MADV_WIPEONFORK");
	for (uint64_t seed = 1; seed < 3; seed++) {
		pid_t pid = fork();
		if (pid == 0) {
			expect_range("the child's view of the head", m, 0, THIRD, 1);
			expect_zeros("the child's view of the range advised MADV_WIPEONFORK",
				     m + THIRD, THIRD);
			expect_range("the child's view of the tail", m, 2 * THIRD, THIRDS, 1);
			fill_range(m, THIRD, 2 * THIRD, 7);
			expect_range("the child's wiped range, written", m, THIRD, 2 * THIRD, 7);
			expect_range("the child's head, after it wrote the wiped range", m, 0,
				     THIRD, 1);
			exit(0);
		}
		wait_ok(pid, "child of a fork with a range advised MADV_WIPEONFORK");
		expect_range("the parent's head after the child exited", m, 0, THIRD, 1);
		expect_range("the parent's range advised MADV_WIPEONFORK after the child exited",
			     m, THIRD, 2 * THIRD, seed);
		expect_range("the parent's tail after the child exited", m, 2 * THIRD, THIRDS, 1);
		fill_range(m, THIRD, 2 * THIRD, seed + 1);
		require_demoted("the parent's buffer, its middle rewritten", m, THIRDS);
	}
	expect_range("the parent's middle at the end", m, THIRD, 2 * THIRD, 3);
	munmap(m, THIRDS);
}

/* --- mprotect, brk, MAP_POPULATE --------------------------------------------------------- */

/* The middle third of a demoted mapping made read-only (the mapping splits in three):
 * every byte reads back, also after the read-only part went to the node again while
 * the parts around it were written; made writable again, all of it takes writes. */
static void check_mprotect_split(void)
{
	char *m = map(THIRDS, 0);
	fill(m, THIRDS, 1);
	require_demoted("the buffer", m, THIRDS);
	if (mprotect(m + THIRD, THIRD, PROT_READ))
		die(2, "mprotect(PROT_READ): %s", strerror(errno));
	expect_pattern("the buffer with its middle read-only", m, THIRDS, 1);
	fill_range(m, 0, THIRD, 2);
	fill_range(m, 2 * THIRD, THIRDS, 2);
	require_demoted("the read-only middle", m + THIRD, THIRD);
	expect_range("the head, written around the read-only middle", m, 0, THIRD, 2);
	expect_range("the read-only middle, read back again", m, THIRD, 2 * THIRD, 1);
	expect_range("the tail, written around the read-only middle", m, 2 * THIRD, THIRDS, 2);
	if (mprotect(m + THIRD, THIRD, PROT_READ | PROT_WRITE))
		die(2, "mprotect(PROT_READ | PROT_WRITE): %s", strerror(errno));
	expect_range("the middle, writable again", m, THIRD, 2 * THIRD, 1);
	fill(m, THIRDS, 3);
	require_demoted("the buffer, rewritten", m, THIRDS);
	expect_pattern("the buffer, rewritten after mprotect", m, THIRDS, 3);
	munmap(m, THIRDS);
}

/* The heap grown by sbrk, filled and demoted, shrunk by half and grown again: the kept
 * half keeps its bytes, the part grown again reads as zeros (the kernel's memory is new
 * there), also after the library had a full second to find it. Nothing here may call
 * malloc between the sbrk calls: glibc would move the break under us. */
static void check_brk_shrink(void)
{
	const size_t half = SIZE / 2;
	free(malloc(100 * 1024)); /* malloc's heap top now holds what require_demoted asks */
	char *base = sbrk(0);
	size_t pad = (PAGE - (uintptr_t)base % PAGE) % PAGE;
	if (sbrk((intptr_t)pad) == (void *)-1 || sbrk((intptr_t)SIZE) == (void *)-1)
		die(2, "sbrk(%zu): %s", SIZE, strerror(errno));
	base += pad;
	fill(base, SIZE, 1);
	require_demoted("the heap grown by sbrk", base, SIZE);
	if (sbrk(-(intptr_t)half) == (void *)-1)
		fail("sbrk(-%zu): %s", half, strerror(errno));
	if ((char *)sbrk(0) != base + half)
		die(2, "precondition: the break moved under the test (malloc used sbrk)");
	expect_range("the kept half of the heap, after sbrk shrank it", base, 0, half, 1);
	if (sbrk((intptr_t)half) == (void *)-1)
		die(2, "sbrk(%zu): %s", half, strerror(errno));
	struct timespec moment = { 1, 200 * 1000 * 1000 }; /* the library rescans each second */
	nanosleep(&moment, NULL);
	expect_zeros("the heap grown again by sbrk", base + half, half);
	expect_range("the kept half of the heap, after sbrk grew it again", base, 0, half, 1);
	fill_range(base, half, SIZE, 2);
	require_demoted("the heap grown again and filled", base, SIZE);
	expect_range("the kept half, at the end", base, 0, half, 1);
	expect_range("the half grown again, filled", base, half, SIZE, 2);
	if ((char *)sbrk(0) != base + SIZE || sbrk(-(intptr_t)SIZE) == (void *)-1)
		die(2, "precondition: the break moved under the test (malloc used sbrk)");
}

/* The top half of a mapping written and unmapped at once, round after round, while
 * another thread keeps rewriting the bottom half: the node demotes all the while, so
 * batches of the top half are in flight as it goes (copied out, then not droppable
 * where the mapping is gone). The bottom half keeps its bytes, and nothing waits
 * forever on a page left in flight (the watchdog). */
struct churn {
	char *buf;
	size_t len;
	volatile int stop;
};

static void *churn_main(void *arg)
{
	struct churn *c = arg;
	while (!c->stop)
		fill(c->buf, c->len, 7);
	return NULL;
}

/* A churn thread over the bottom half of m, once m (SIZE bytes, pattern 7) is demoted. */
static pthread_t start_churn(struct churn *c, char *m)
{
	pthread_t t;
	fill(m, SIZE, 7);
	require_demoted("the mapping", m, SIZE);
	*c = (struct churn){ m, SIZE / 2, 0 };
	if (pthread_create(&t, NULL, churn_main, c))
		die(2, "pthread_create failed");
	return t;
}

/* Stop it; the bottom half must hold what it wrote all along. */
static void stop_churn(struct churn *c, pthread_t t)
{
	c->stop = 1;
	pthread_join(t, NULL);
	expect_range("the bottom half, rewritten all along", c->buf, 0, SIZE / 2, 7);
}

static void check_munmap_in_flight(void)
{
	char *m = map(SIZE, 0);
	struct churn c;
	pthread_t t = start_churn(&c, m);
	for (uint64_t round = 1; round <= 64; round++) {
		if (munmap(m + SIZE / 2, SIZE / 2))
			die(2, "munmap: %s", strerror(errno));
		char *top = mmap(m + SIZE / 2, SIZE / 2, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
		if (top != m + SIZE / 2)
			die(2, "precondition: the top half could not be mapped again");
		expect_zeros("the top half mapped again", top, SIZE / 2);
		fill_range(m, SIZE / 2, SIZE, round);
		expect_range("the top half, written", m, SIZE / 2, SIZE, round);
	}
	stop_churn(&c, t);
	munmap(m, SIZE);
}

/* A mapping the kernel populated at mmap (MAP_POPULATE) reads as zeros, then keeps what
 * is written, through the node, twice. */
static void check_map_populate(void)
{
	char *m = map(SIZE, MAP_POPULATE);
	expect_zeros("a new MAP_POPULATE mapping", m, SIZE);
	for (uint64_t seed = 1; seed < 3; seed++) {
		fill(m, SIZE, seed);
		require_demoted("the MAP_POPULATE mapping", m, SIZE);
		expect_pattern("the MAP_POPULATE mapping, demoted", m, SIZE, seed);
	}
	munmap(m, SIZE);
}

/* --- a signal handler on an alternate stack ---------------------------------------------- */
#define ALT_STACK MiB
#define HANDLER_STACK (64 * 1024)

static char *region; /* the alternate stack, then the data */
static volatile sig_atomic_t handled, on_alt_stack;
static volatile size_t bad_word; /* 1 + the first word the handler found wrong */
static volatile uint64_t handler_seed;

static void on_signal(int sig)
{
	(void)sig;
	char local[HANDLER_STACK]; /* the handler's own frames reach over demoted stack pages */
	uintptr_t here = (uintptr_t)local;
	on_alt_stack = here >= (uintptr_t)region && here < (uintptr_t)region + ALT_STACK;
	uint64_t seed = handler_seed;
	const uint64_t *w = (const uint64_t *)region;
	for (size_t i = ALT_STACK / 8; i < SIZE / 8 && !bad_word; i++)
		if (w[i] != pattern(seed, i))
			bad_word = i + 1;
	fill_range(local, 0, HANDLER_STACK, seed);
	__asm__ volatile("" : : "r"(local) : "memory"); /* the bytes are read back from memory */
	if (!range_is(local, 0, HANDLER_STACK, seed) && !bad_word)
		bad_word = 1; /* word 0 of the region is the stack's: it stands for the stack */
	fill_range(region, ALT_STACK, SIZE, seed + 1);
	handled++;
}

/* The handler of a signal runs on an alternate stack carved from the first MiB of a
 * large malloc'd block, demoted with the rest of it: the kernel writes the signal frame
 * to demoted pages, the handler's frames use more of them, and it reads the rest of the
 * block (demoted) and writes it. Twice, the block demoted again in between. */
static void check_sigaltstack(void)
{
	region = xmalloc(SIZE);
	fill(region, SIZE, 1);
	stack_t ss = { .ss_sp = region, .ss_size = ALT_STACK, .ss_flags = 0 };
	if (sigaltstack(&ss, NULL))
		die(2, "sigaltstack: %s", strerror(errno));
	struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_ONSTACK };
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL))
		die(2, "sigaction: %s", strerror(errno));
	for (uint64_t seed = 1; seed < 3; seed++) {
		require_demoted("the alternate stack", region, ALT_STACK);
		require_demoted("the data after it", region + ALT_STACK, SIZE - ALT_STACK);
		handler_seed = seed;
		handled = 0;
		if (raise(SIGUSR1))
			die(2, "raise: %s", strerror(errno));
		if (handled != 1)
			fail("the SIGUSR1 handler did not run");
		if (!on_alt_stack)
			fail("the SIGUSR1 handler did not run on the alternate stack");
		if (bad_word == 1)
			fail("the handler's frame on the alternate stack did not keep its bytes");
		if (bad_word)
			fail("the handler read byte %zu of the block wrong", (bad_word - 1) * 8);
		expect_range("the block, written by the handler", region, ALT_STACK, SIZE,
			     seed + 1);
		/* the bottom of the alternate stack, far below what the handler used */
		expect_range("the bottom of the alternate stack", region, 0, ALT_STACK / 4, 1);
	}
	ss.ss_flags = SS_DISABLE;
	sigaltstack(&ss, NULL);
	free(region);
}

/* --- threads started before main ----------------------------------------------------------- */
#define EARLY_THREADS 4
#define EARLY_SIZE (2 * MiB)
#define EARLY_ROUNDS 4

static pthread_t early[EARLY_THREADS];
static char *early_buf[EARLY_THREADS];
static int early_started;

static uint64_t early_seed(int who, int round)
{
	return 100 + 16 * (uint64_t)round + (uint64_t)who;
}

static void *early_work(void *arg)
{
	int me = (int)(intptr_t)arg;
	char *b = xmalloc(EARLY_SIZE);
	for (int round = 0; round < EARLY_ROUNDS; round++) {
		fill(b, EARLY_SIZE, early_seed(me, round));
		expect_pattern("an early thread's buffer", b, EARLY_SIZE, early_seed(me, round));
	}
	early_buf[me] = b;
	return NULL;
}

/* In the executable's .preinit_array: the loader runs it before the initializers of
 * every library, the preload library's included, as it would a library's constructor
 * that it happens to run first. So the threads allocate and fill while the library
 * joins the node and registers what is mapped. */
static void start_early_threads(int argc, char **argv, char **envp)
{
	(void)envp;
	if (argc < 2 || strcmp(argv[1], "early-threads"))
		return;
	for (int i = 0; i < EARLY_THREADS; i++)
		if (pthread_create(&early[i], NULL, early_work, (void *)(intptr_t)i))
			die(2, "pthread_create before main failed");
	early_started = 1;
}

__attribute__((section(".preinit_array"), used)) static void (*const preinit)(
	int, char **, char **) = start_early_threads;

static void check_early_threads(void)
{
	if (!early_started)
		die(2, "precondition: the threads were not started before main");
	for (int i = 0; i < EARLY_THREADS; i++)
		if (pthread_join(early[i], NULL))
			die(2, "pthread_join failed");
	for (int i = 0; i < EARLY_THREADS; i++)
		require_demoted("an early thread's buffer", early_buf[i], EARLY_SIZE);
	for (int i = 0; i < EARLY_THREADS; i++)
		expect_pattern("an early thread's buffer, read by main", early_buf[i], EARLY_SIZE,
			       early_seed(i, EARLY_ROUNDS - 1));
	for (int i = 0; i < EARLY_THREADS; i++) {
		fill(early_buf[i], EARLY_SIZE, early_seed(i, EARLY_ROUNDS));
		require_demoted("an early thread's buffer, rewritten by main", early_buf[i],
				EARLY_SIZE);
	}
	for (int i = 0; i < EARLY_THREADS; i++) {
		expect_pattern("an early thread's buffer, rewritten by main", early_buf[i],
			       EARLY_SIZE, early_seed(i, EARLY_ROUNDS));
		free(early_buf[i]);
	}
}

/* --- vfork and posix_spawn ----------------------------------------------------------------- */
/* The children exec these; their exit statuses must come back as they are. */
static const struct {
	const char *argv[4];
	int status;
} children[] = {
	{ { "/bin/true", NULL }, 0 },
	{ { "/bin/false", NULL }, 1 },
	{ { "/bin/sh", "-c", "exit 3", NULL }, 3 },
};
#define CHILDREN (sizeof(children) / sizeof(children[0]))
#define ARGS_AT (SIZE / 2) /* where in the buffer the children's argv strings live */

/* The buffer, filled, with copies of each child's argv in its middle (so the kernel reads
 * them from demoted pages at exec), demoted. args[c] points into the buffer. */
static char *spawn_buffer(char *args[CHILDREN][4])
{
	char *b = xmalloc(SIZE);
	fill(b, SIZE, 1);
	char *at = b + ARGS_AT;
	for (size_t c = 0; c < CHILDREN; c++) {
		for (int a = 0; a < 4; a++) {
			args[c][a] = NULL;
			if (children[c].argv[a]) {
				args[c][a] = strcpy(at, children[c].argv[a]);
				at += strlen(at) + 1;
			}
		}
	}
	if (access("/bin/true", X_OK) || access("/bin/false", X_OK) || access("/bin/sh", X_OK))
		die(2, "precondition: /bin/true, /bin/false and /bin/sh are needed");
	return b;
}

static void expect_spawn_buffer(const char *what, const char *b, char *args[CHILDREN][4])
{
	expect_range(what, b, 0, ARGS_AT, 1);
	expect_range(what, b, ARGS_AT + PAGE, SIZE, 1);
	for (size_t c = 0; c < CHILDREN; c++)
		for (int a = 0; children[c].argv[a]; a++)
			if (strcmp(args[c][a], children[c].argv[a]))
				fail("%s: the argv string %s reads %s", what, children[c].argv[a],
				     args[c][a]);
}

static void expect_exit(int status, size_t c, const char *how)
{
	if (!WIFEXITED(status) || WEXITSTATUS(status) != children[c].status)
		fail("%s of %s: wait status %#x, want exit status %d", how, children[c].argv[0],
		     status, children[c].status);
}

/* vfork then exec in the child, which shares the parent's (demoted) memory until then. */
static void check_vfork(void)
{
	char *args[CHILDREN][4];
	char *b = spawn_buffer(args);
	for (int round = 0; round < 2; round++)
		for (size_t c = 0; c < CHILDREN; c++) {
			require_demoted("the buffer before vfork", b, SIZE);
			pid_t pid = vfork();
			if (pid == 0) {
				execve(args[c][0], args[c], environ);
				_exit(127);
			}
			expect_exit(wait_status(pid, "vfork"), c, "vfork+exec");
			expect_spawn_buffer("the buffer after vfork+exec", b, args);
		}
	free(b);
}

static void check_posix_spawn(void)
{
	char *args[CHILDREN][4];
	char *b = spawn_buffer(args);
	for (int round = 0; round < 2; round++)
		for (size_t c = 0; c < CHILDREN; c++) {
			require_demoted("the buffer before posix_spawn", b, SIZE);
			pid_t pid;
			int rc = posix_spawn(&pid, args[c][0], NULL, NULL, args[c], environ);
			if (rc)
				fail("posix_spawn of %s: %s", children[c].argv[0], strerror(rc));
			expect_exit(wait_status(pid, "posix_spawn"), c, "posix_spawn");
			expect_spawn_buffer("the buffer after posix_spawn", b, args);
		}
	free(b);
}

/* A mapping moved by mremap while its pages are on the node, and a new mapping made
 * where it was: the new one reads zeros and keeps what it is given, the moved one keeps
 * its own bytes. (The node's books move with the pages; nothing of them may stay behind
 * at the old address to serve the new mapping.) */
static void check_mremap_reuse(void)
{
	/* where it goes, mapped first so that it lies above (mmap places top down): the
	 * books of both are then searched with the moved one last */
	char *target = map(SIZE, 0);
	char *old = map(SIZE, 0);
	if (old > target)
		die(2, "the mappings were not placed top down");
	fill(old, SIZE, 1);
	require_demoted("the buffer", old, SIZE);
	char *moved = mremap(old, SIZE, SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, target);
	if (moved != target)
		die(2, "mremap: %s", strerror(errno));
	char *reused = mmap(old, SIZE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (reused != old)
		die(2, "mmap where the moved mapping was: %s",
		    reused == MAP_FAILED ? strerror(errno) : "placed elsewhere");
	expect_zeros("the new mapping's first half, read", reused, SIZE / 2);
	fill_range(reused, SIZE / 2, SIZE, 2);   /* its second half: written first */
	fill_range(reused, 0, SIZE / 2, 2);
	expect_pattern("the moved mapping", moved, SIZE, 1);
	expect_pattern("the new mapping", reused, SIZE, 2);
	require_demoted("the moved mapping, after a read-through", moved, SIZE);
	expect_pattern("the moved mapping, read again", moved, SIZE, 1);
	expect_pattern("the new mapping, read again", reused, SIZE, 2);
	munmap(moved, SIZE);
	munmap(reused, SIZE);
}

/* A demoted part of a mapping moved by mremap and read there, then moved back and read
 * again, 8 times: it keeps its bytes at each address, and the rest keeps its own. (The
 * part leaves untouched pages in its mapping's books; coming back, it must land in
 * them, not beside them.) */
static void check_mremap_part_back(void)
{
	const size_t part = SIZE / 4;
	char *m = map(SIZE, 0);
	fill(m, SIZE, 7);
	for (uint64_t round = 1; round <= 8; round++) {
		char *top = m + SIZE - part, *away = map(part, 0);
		fill_range(m, SIZE - part, SIZE, round);
		require_demoted("the mapping", m, SIZE);
		if (mremap(top, part, part, MREMAP_MAYMOVE | MREMAP_FIXED, away) != away)
			die(2, "mremap away: %s", strerror(errno));
		for (size_t i = 0; i < part / 8; i++)
			if (((uint64_t *)away)[i] != pattern(round, (SIZE - part) / 8 + i))
				fail("round %" PRIu64 ": the moved part, byte %zu, is wrong", round, i * 8);
		if (mremap(away, part, part, MREMAP_MAYMOVE | MREMAP_FIXED, top) != top)
			die(2, "mremap back: %s", strerror(errno));
		expect_range("the part moved back", m, SIZE - part, SIZE, round);
		expect_range("the rest", m, 0, SIZE - part, 7);
	}
	munmap(m, SIZE);
}

/* A part of a mapping moved by mremap, and moved back, while the node demotes the mapping
 * (a thread keeps rewriting the rest of it), 64 times: the part keeps its bytes at each
 * address, and so does the rest. (The node's books must follow the moved pages even
 * when some of them were in flight.) */
static void check_mremap_part_in_flight(void)
{
	const size_t part = SIZE / 4;
	char *m = map(SIZE, 0);
	char *away = map(part, 0); /* a place to move the part to */
	struct churn c;
	pthread_t t = start_churn(&c, m);
	for (uint64_t round = 1; round <= 64; round++) {
		char *top = m + SIZE - part;
		fill_range(m, SIZE - part, SIZE, round);
		if (mremap(top, part, part, MREMAP_MAYMOVE | MREMAP_FIXED, away) != away)
			die(2, "mremap away: %s", strerror(errno));
		for (size_t i = 0; i < part / 8; i++) /* read where it went */
			if (((uint64_t *)away)[i] != pattern(round, (SIZE - part) / 8 + i))
				fail("round %" PRIu64 ": the moved part, byte %zu, is wrong", round, i * 8);
		if (mremap(away, part, part, MREMAP_MAYMOVE | MREMAP_FIXED, top) != top)
			die(2, "mremap back: %s", strerror(errno));
		expect_range("the part moved back", m, SIZE - part, SIZE, round);
		away = map(part, 0); /* mremap unmapped the place it left */
	}
	stop_churn(&c, t);
	munmap(m, SIZE);
	munmap(away, part);
}

static const struct check checks[] = {
	{ "madv-free", check_madv_free },
	{ "madv-dontneed", check_madv_dontneed },
	{ "dontneed-ahead", check_dontneed_ahead },
	{ "dontfork", check_dontfork },
	{ "wipeonfork", check_wipeonfork },
	{ "mprotect-split", check_mprotect_split },
	{ "brk-shrink", check_brk_shrink },
	{ "map-populate", check_map_populate },
	{ "sigaltstack", check_sigaltstack },
	{ "early-threads", check_early_threads },
	{ "vfork", check_vfork },
	{ "posix-spawn", check_posix_spawn },
	{ "mremap-reuse", check_mremap_reuse },
	{ "munmap-in-flight", check_munmap_in_flight },
	{ "mremap-part-back", check_mremap_part_back },
	{ "mremap-part-in-flight", check_mremap_part_in_flight },
};

int main(int argc, char **argv)
{
	return run_named(argc, argv, checks, sizeof(checks) / sizeof(checks[0]));
}
