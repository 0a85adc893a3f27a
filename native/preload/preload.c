/* The LD_PRELOAD library behind `ufcram run`: at start the program joins the node, and a
 * scanner thread of ours keeps every private anonymous mapping of it on the node. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "agent_internal.h"
#include "coverage.h"
#include "nodelink.h"
#include "ufcram_native.h"

#define EXPORT __attribute__((visibility("default")))
/* The scanner looks at the process's anonymous resident size this often, and rescans
 * its mappings when that grew by GROWTH (memory not on the node yet fills in between:
 * these bound how much), when the program maps memory, and every FULL_SCAN_MS. */
#define POLL_MS 5
#define GROWTH (256 << 10)
#define FULL_SCAN_MS 1000

static struct {
	int ready;          /* joined: the scanner runs */
	int tree;           /* the program joined at start: its forked children join too */
	pid_t joining;      /* a forked child whose scanner is joining right now */
	pid_t pid;          /* of the process that joined: a forked child re-joins */
	int kick;           /* eventfd: the program mapped memory, scan now */
	uint64_t threshold;
	uint64_t resident_limit;
	uint64_t group;     /* the process tree the resident limit holds for */
	int64_t write_budget;
	uint64_t staging_pages;
	int user_mode_only;
	char path[108];     /* the node's socket (sun_path's size) */
	struct ufc_link link;
	struct coverage coverage;
} pl = { .kick = -1, .threshold = 1 << 20, .resident_limit = UFC_PROTO_NO_LIMIT };

static int debug_on(void)
{
	const char *on = getenv("UFCRAM_DEBUG");
	return on && *on && strcmp(on, "0");
}

static void debug(const char *fmt, ...)
{
	static int said;
	if (!debug_on() || __atomic_exchange_n(&said, 1, __ATOMIC_RELAXED))
		return;
	va_list ap;
	va_start(ap, fmt);
	vsay(fmt, ap);
	va_end(ap);
}

/* A setting, or fallback when unset. A value that does not read as a number is said
 * once (ufcram run checks its own settings before the program starts; this is for
 * LD_PRELOAD set by hand). */
static uint64_t env_u64(const char *name, uint64_t fallback)
{
	const char *v = getenv(name);
	if (!v || !*v)
		return fallback;
	char *end;
	errno = 0;
	unsigned long long x = strtoull(v, &end, 10);
	if (errno || *end || *v == '-') {
		say("ufcram: %s=%s is not a number of bytes (ufcram run takes 64M, 1.5G); "
		    "ignored\n", name, v);
		return fallback;
	}
	return x;
}

static uint64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

/* Anonymous resident bytes of this process (statm: resident less file-backed), cheap
 * enough to poll. */
static uint64_t anon_resident(void)
{
	char buf[128];
	int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	unsigned long long size, resident, shared;
	if (sscanf(buf, "%llu %llu %llu", &size, &resident, &shared) != 3 || shared > resident)
		return 0;
	return (resident - shared) * UFC_PAGE_SIZE;
}

static int scan(void)
{
	int rc = coverage_scan(&pl.coverage);
	if (rc < 0 && rc != -ENOMEM) {
		/* the node is gone: what is registered stays so (its faults are loud), the
		 * rest of the program's memory is plain from now on */
		debug("ufcram: the node stopped answering (%s); new memory stays plain\n",
		      strerrorname_np(-rc));
		return rc;
	}
	return 0;
}

static void set_limits(void)
{
	char why[256];
	struct ufc_req_limits limits = { pl.resident_limit, pl.group };
	if (ufc_link_request(&pl.link, UFC_PROTO_LIMITS, &limits, sizeof(limits), NULL, why,
			     sizeof(why)))
		debug("ufcram: resident limit not set: %s\n", why);
}

/* Join the node and manage what is mapped already: 0, or -1 to stay plain. */
static int join(void)
{
	char why[256];
	own_stacks = 1;
	if (ufc_link_open(&pl.link, pl.path, pl.staging_pages, pl.user_mode_only, why,
			  sizeof(why))) {
		debug("ufcram: cannot join the node (%s); this program runs on plain memory\n",
		      why);
		return -1;
	}
	if (pl.resident_limit != UFC_PROTO_NO_LIMIT)
		set_limits();
	coverage_init(&pl.coverage, &pl.link, pl.threshold, pl.write_budget, debug_on());
	pl.kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (pl.kick < 0 || scan())
		return -1;
	pl.pid = getpid();
	__atomic_store_n(&pl.ready, 1, __ATOMIC_RELEASE);
	return 0;
}

/* With arg set, in a forked child: join first (an exec ends it, harmlessly: most
 * forks of a shell or a spawner exec at once, and the exec'd program joins itself). */
static void *scanner_main(void *arg)
{
	if (arg) {
		int failed = join();
		__atomic_store_n(&pl.joining, 0, __ATOMIC_RELEASE);
		if (failed)
			return NULL;
	}
	uint64_t last_rss = anon_resident(), last_scan = now_ms();
	for (;;) {
		struct pollfd kicked = { pl.kick, POLLIN, 0 };
		int n = poll(&kicked, 1, POLL_MS);
		uint64_t rss = anon_resident(), now = now_ms();
		if (n > 0) {
			uint64_t count;
			(void)!read(pl.kick, &count, sizeof(count));
		}
		if (n <= 0 && rss < last_rss + GROWTH && now - last_scan < FULL_SCAN_MS)
			continue;
		if (scan())
			return NULL;
		last_rss = rss;
		last_scan = now;
	}
}

/* A forked child: its memory so far is registered with the uffd the kernel made for it
 * at the fork, which the node serves (it reads the fork event). What it maps from now
 * on is its own: it joins as a client of its own, in the same tree (the group), with
 * its own uffd, agent and scanner. The parent's link, scanner and kick are not its. */
static void after_fork_in_child(void)
{
	if (!pl.tree)
		return;
	if (__atomic_exchange_n(&pl.ready, 0, __ATOMIC_ACQ_REL)) {
		close(pl.link.sock);
		close(pl.kick);
	}   /* else forked while its own parent's join was under way: joins all the same */
	pl.kick = -1;
	pl.joining = getpid();
	pthread_t scanner;
	if (own_thread(&scanner, scanner_main, (void *)1, 1)) {
		pl.joining = 0;
		debug("ufcram: a forked child could not join; what it maps stays plain\n");
	}
}

/* Settings from the environment, once, before main: a forked child re-joins with them
 * (the program may change its environment meanwhile). 0 if there is a node to join. */
static int read_settings(void)
{
	pl.threshold = env_u64("UFCRAM_THRESHOLD", 1 << 20);
	const char *path = getenv("UFCRAM_NODE");
	if (!path || !*path) {
		debug("ufcram: UFCRAM_NODE is not set; this program runs on plain memory\n");
		return -1;
	}
	if (strlen(path) >= sizeof(pl.path)) {
		debug("ufcram: UFCRAM_NODE is too long a path; this program runs on plain memory\n");
		return -1;
	}
	strcpy(pl.path, path);
	pl.resident_limit = env_u64("UFCRAM_RESIDENT_LIMIT", UFC_PROTO_NO_LIMIT);
	pl.group = env_u64("UFCRAM_GROUP", (uint64_t)getpid());
	const char *budget = getenv("UFCRAM_WRITE_BUDGET");
	pl.write_budget = !budget || !*budget || !strcmp(budget, "auto")
				  ? UFC_PROTO_AUTO_BUDGET
				  : (int64_t)env_u64("UFCRAM_WRITE_BUDGET", 0);
	pl.staging_pages = env_u64("UFCRAM_STAGING_PAGES", 256);
	pl.user_mode_only = (int)env_u64("UFCRAM_USER_MODE_ONLY", 0);
	return 0;
}

/* Before main, so that the heap and the arenas of any allocator are there to register
 * as they grow. (Constructors of libraries loaded later may allocate first: that memory
 * is found by the first scan like the rest.) */
__attribute__((constructor)) static void start(void)
{
	if (read_settings() || join())
		return;
	pthread_t scanner;
	if (own_thread(&scanner, scanner_main, NULL, 1)) {
		debug("ufcram: no scanner thread; only the memory mapped at start is managed\n");
		return;
	}
	/* On by default: a forked child is a process of the tree like any other. Off, what
	 * a child inherits is served all the same, and what it maps afterwards stays plain
	 * memory. */
	if (env_u64("UFCRAM_FORK_JOIN", 1)) {
		pl.tree = 1;
		pthread_atfork(NULL, NULL, after_fork_in_child);
	}
}

/* --- triggers ------------------------------------------------------------------------
 * Not needed for coverage (the scanner polls), only to find large mappings before the
 * program fills them: a program writes faster (GB/s) than a poll can notice. glibc's
 * malloc maps through internal calls that never come here; most other allocators and
 * programs call mmap. */
static int ours(size_t len, int prot)
{
	if (len < pl.threshold || !(prot & PROT_WRITE))
		return 0;
	/* a forked child that maps memory at once (a worker) waits for its join, briefly */
	for (int i = 0; i < 200 && __atomic_load_n(&pl.joining, __ATOMIC_ACQUIRE) == getpid();
	     i++) {
		struct timespec ms = { 0, 1000000L };
		nanosleep(&ms, NULL);
	}
	return __atomic_load_n(&pl.ready, __ATOMIC_ACQUIRE) && getpid() == pl.pid;
}

static void kick(size_t len, int prot)
{
	if (ours(len, prot)) {
		uint64_t one = 1;
		(void)!write(pl.kick, &one, sizeof(one));
	}
}

/* Private anonymous memory is registered before mmap returns, so not one of its pages
 * comes in unmanaged. */
EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	void *p = (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
	int plain = (flags & (MAP_SHARED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB |
			      MAP_GROWSDOWN)) == (MAP_PRIVATE | MAP_ANONYMOUS);
	if (p != MAP_FAILED && plain && ours(len, prot) &&
	    coverage_manage(&pl.coverage, (uint64_t)(uintptr_t)p,
			    (uint64_t)(uintptr_t)p + ((len + UFC_PAGE_SIZE - 1) &
						      ~(size_t)(UFC_PAGE_SIZE - 1))) < 0)
		debug("ufcram: the node stopped answering; new memory stays plain\n");
	return p;
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
	__attribute__((alias("mmap")));

EXPORT int mprotect(void *addr, size_t len, int prot)
{
	int rc = (int)syscall(SYS_mprotect, addr, len, prot);
	if (!rc)
		kick(len, prot);
	return rc;
}

/* --- locking ---------------------------------------------------------------------------
 * The kernel never swaps locked memory, and the node never demotes it (the handler
 * leaves alone what it finds locked). Under a resident limit, locking past the limit is
 * refused with ENOMEM, as a cgroup's memory.max refuses it: a program that adapts
 * (memtester shrinks its buffer) locks what fits, and the tree stays within its limit.
 * The count is this process's, of the calls that come here (mlockall is not counted). */
static uint64_t locked;

static int lock(const void *addr, size_t len, long nr, unsigned flags)
{
	if (pl.resident_limit != UFC_PROTO_NO_LIMIT && __atomic_load_n(&pl.ready, __ATOMIC_ACQUIRE) &&
	    __atomic_load_n(&locked, __ATOMIC_RELAXED) + len > pl.resident_limit) {
		errno = ENOMEM;
		return -1;
	}
	int rc = (int)(nr == SYS_mlock ? syscall(nr, addr, len) : syscall(nr, addr, len, flags));
	if (!rc)
		__atomic_add_fetch(&locked, len, __ATOMIC_RELAXED);
	return rc;
}

EXPORT int mlock(const void *addr, size_t len)
{
	return lock(addr, len, SYS_mlock, 0);
}

EXPORT int mlock2(const void *addr, size_t len, unsigned int flags)
{
	return lock(addr, len, SYS_mlock2, flags);
}

EXPORT int munlock(const void *addr, size_t len)
{
	int rc = (int)syscall(SYS_munlock, addr, len);
	if (!rc) {   /* never below zero: unlocking what was never locked is allowed */
		uint64_t was = __atomic_load_n(&locked, __ATOMIC_RELAXED);
		__atomic_store_n(&locked, was > len ? was - len : 0, __ATOMIC_RELAXED);
	}
	return rc;
}
