/* What the agent's files share: the state one application's two agent threads hold
 * together, the set of dropped pages, and the agent's own memory. */
#ifndef UFCRAM_AGENT_INTERNAL_H
#define UFCRAM_AGENT_INTERNAL_H

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ufcram_native.h"

/* internal to the library that links these files: never interposes on, or is taken
 * for, a symbol of the application */
#define UFC_HIDDEN __attribute__((visibility("hidden")))

/* Forked children's uffds one agent keeps at most; past it a child goes unprotected,
 * and says so. */
#define AGENT_MAX_ADOPTED 512

/* --- the agent's own memory ---------------------------------------------------------
 * Straight from the kernel, and file memory, private: the preload library manages every
 * private anonymous mapping of the process, and a thread that serves faults must never
 * fault on memory it serves. A private mapping of a memfd is never managed, shows as
 * /memfd:ufcram in the maps, and forks like any private memory (a forked child's glibc
 * rewrites the descriptors of our threads, which live on stacks made here). */
static inline void *mem_resize(void *p, size_t old, size_t len)
{
	/* not mremap: the file keeps its size, and pages past it would raise SIGBUS */
	int fd = (int)syscall(SYS_memfd_create, "ufcram", MFD_CLOEXEC);
	if (fd < 0)
		return NULL;
	void *q = MAP_FAILED;
	if (!ftruncate(fd, (off_t)len))
		q = (void *)syscall(SYS_mmap, NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE,
				    fd, 0);
	close(fd);
	if (q == MAP_FAILED)
		return NULL;
	if (p) {
		memcpy(q, p, old < len ? old : len);
		syscall(SYS_munmap, p, old);
	}
	return q;
}

static inline void mem_free(void *p, size_t len)
{
	if (p)
		syscall(SYS_munmap, p, len);
}

/* A thread of ours (agent, watcher, coverage scanner) with every signal blocked (the
 * application's signal handlers are not ours to run), on a stack of our own memory when
 * own_stacks is set: the preload library sets it, since glibc's stacks are private
 * anonymous memory, which it hands to the node. */
UFC_HIDDEN extern int own_stacks;
UFC_HIDDEN int own_thread(pthread_t *t, void *(*main)(void *), void *arg, int detached);

/* --- a set of address ranges: sorted, disjoint, never touching (spans.c) ----------- */
struct span {
	uint64_t start, end;   /* [start, end) */
};
struct spans {
	struct span *v;
	size_t n, cap;
};

UFC_HIDDEN void spans_free(struct spans *s);
UFC_HIDDEN int spans_has(const struct spans *s, uint64_t addr);
UFC_HIDDEN int spans_add(struct spans *s, const struct span *add, size_t k);
UFC_HIDDEN int spans_push(struct spans *s, uint64_t start, uint64_t end);
UFC_HIDDEN void spans_remove(struct spans *s, uint64_t start, uint64_t end);
UFC_HIDDEN int spans_move(struct spans *s, uint64_t from, uint64_t to, uint64_t len);
UFC_HIDDEN int spans_copy(struct spans *dst, const struct spans *src);
UFC_HIDDEN void spans_sort(struct span *v, size_t n);

/* --- the two threads' shared state (agent.c, adopted.c, watcher.c) ----------------- */
struct agent {
	int uffd;       /* a descriptor of our own: the application may close its own */
	int app_uffd;   /* the application's, to see when it lets the uffd go */
	int sock;
	uint64_t staging;
	uint64_t staging_len;
	pthread_mutex_t lock;   /* guards what follows */
	int refs;               /* the threads still running; the last one out frees */
	int dead;               /* the handler hung up: nothing more is dropped */
	struct spans dropped;   /* every page ever dropped on command (see fallback) */
	uint32_t ninflight;     /* the runs being dropped right now */
	struct span inflight[UFC_AGENT_MAX_RUNS];
	/* Children forked while the handler lived: their uffds (ADOPT), to serve only once
	 * the handler process has exited, which its pidfd tells. Until then the handler
	 * serves them, even after it let this process go. */
	int handler_pidfd;
	/* UFFDIO_MOVE's destination (move.c): private anonymous memory the size of the
	 * staging buffer, registered on a uffd of our own that sends no events; -1 and 0
	 * where the kernel cannot move pages */
	int move_uffd;
	uint64_t move_area;
	int pagemap;            /* /proc/self/pagemap: which pages of move_area came */
	int adopt_refused;      /* said so once already */
	uint32_t nadopted;
	int adopted[AGENT_MAX_ADOPTED];
};

/* One command and the descriptors that came with it; what it does not keep, the
 * caller closes, so a malformed command leaks nothing into the application. */
struct received {
	ssize_t n;
	int cut;   /* the command or its descriptors did not fit */
	int nfds;
	int fds[UFC_MAX_FDS];
};

UFC_HIDDEN void agent_put(struct agent *a);
UFC_HIDDEN int runs_fit(const struct ufc_run *runs, uint32_t nruns, uint64_t room, uint64_t *total);
UFC_HIDDEN int begin_drop(struct agent *a, const struct ufc_run *runs, uint32_t nruns);
UFC_HIDDEN void end_drop(struct agent *a);
/* move.c: demotion by UFFDIO_MOVE */
UFC_HIDDEN void move_open(struct agent *a);
UFC_HIDDEN void move_close(struct agent *a);
UFC_HIDDEN int move_out(struct agent *a, const struct ufc_run *runs, uint32_t nruns,
			uint64_t staging, uint64_t staging_len, uint64_t *bytes, uint8_t *stayed);
UFC_HIDDEN int move_discard(struct agent *a, const struct ufc_run *runs, uint32_t nruns,
			    uint64_t *bytes, uint8_t *stayed);
UFC_HIDDEN int agent_area(uint64_t start, uint64_t end);
UFC_HIDDEN void close_received(struct received *r);
/* adopted.c: the commands kept for after a handler death */
UFC_HIDDEN void release_exited(struct agent *a);
UFC_HIDDEN void adopt_child(struct agent *a, const struct ufc_agent_cmd *cmd, struct received *r);
UFC_HIDDEN void moved(struct agent *a, const struct ufc_agent_cmd *cmd, struct received *r);
UFC_HIDDEN void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
UFC_HIDDEN void vsay(const char *fmt, va_list ap);
UFC_HIDDEN void *watch_main(void *arg);

static inline int handler_gone(struct agent *a)
{
	return __atomic_load_n(&a->dead, __ATOMIC_ACQUIRE);
}

/* A uffd whose process has exited (or exec'd) answers ESRCH. UFFDIO_CONTINUE probes it
 * without touching a live process: it fails on anonymous memory, the only kind we
 * register, and with ENOENT where nothing is registered with this uffd. */
static inline int uffd_exited(int fd)
{
	struct uffdio_continue c = { .range = { 1 << 16, UFC_PAGE_SIZE } };
	return ioctl(fd, UFFDIO_CONTINUE, &c) < 0 && errno == ESRCH;
}

#endif
