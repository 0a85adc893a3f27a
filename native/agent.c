/* The agent: two native threads in the application. One demotes or drops pages on the
 * handler's command; the other waits for the handler to hang up and then serves the
 * uffd itself (see fallback). Neither runs Python, so neither can hold the GIL while
 * faulting. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "ufcram_native.h"

/* --- the agent's own memory ---------------------------------------------------------
 * Straight from the kernel: under the preload library malloc may hand out managed
 * memory, and the thread that serves faults must never fault on memory it serves. */
static void *mem_resize(void *p, size_t old, size_t len)
{
	void *q = p ? (void *)syscall(SYS_mremap, p, old, len, MREMAP_MAYMOVE)
		    : (void *)syscall(SYS_mmap, NULL, len, PROT_READ | PROT_WRITE,
				      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return q == MAP_FAILED ? NULL : q;
}

static void mem_free(void *p, size_t len)
{
	if (p)
		syscall(SYS_munmap, p, len);
}

/* --- a set of address ranges: sorted, disjoint, never touching [start, end) ----------- */
struct span {
	uint64_t start, end;
};
struct spans {
	struct span *v;
	size_t n, cap;
};

static int spans_reserve(struct spans *s, size_t more)
{
	if (s->n + more <= s->cap)
		return 0;
	size_t cap = s->cap ? s->cap : UFC_PAGE_SIZE / sizeof(struct span);
	while (cap < s->n + more)
		cap *= 2;
	struct span *v = mem_resize(s->v, s->cap * sizeof(*v), cap * sizeof(*v));
	if (!v)
		return -ENOMEM;
	s->v = v;
	s->cap = cap;
	return 0;
}

static void spans_free(struct spans *s)
{
	mem_free(s->v, s->cap * sizeof(*s->v));
	*s = (struct spans){ 0 };
}

/* the first span that ends after addr */
static size_t spans_find(const struct spans *s, uint64_t addr)
{
	size_t lo = 0, hi = s->n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (s->v[mid].end <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static int spans_has(const struct spans *s, uint64_t addr)
{
	size_t i = spans_find(s, addr);
	return i < s->n && s->v[i].start <= addr;
}

/* Adds k spans sorted by start in O(n + k): a merge from the back (it never overwrites
 * a span not yet read), then one pass that joins what overlaps or touches. */
static int spans_add(struct spans *s, const struct span *add, size_t k)
{
	if (spans_reserve(s, k))
		return -ENOMEM;
	size_t i = s->n, j = k, out = s->n + k, n = s->n + k;
	while (j) {
		if (i && s->v[i - 1].start > add[j - 1].start)
			s->v[--out] = s->v[--i];
		else
			s->v[--out] = add[--j];
	}
	size_t w = i ? i - 1 : 0;   /* the spans before it were not moved */
	for (size_t r = w + 1; r < n; r++) {
		if (s->v[r].start > s->v[w].end)
			s->v[++w] = s->v[r];
		else if (s->v[r].end > s->v[w].end)
			s->v[w].end = s->v[r].end;
	}
	s->n = n ? w + 1 : 0;
	return 0;
}

/* Appends a span that starts at or after every other one. */
static int spans_push(struct spans *s, uint64_t start, uint64_t end)
{
	if (s->n && s->v[s->n - 1].end == start) {
		s->v[s->n - 1].end = end;
		return 0;
	}
	if (spans_reserve(s, 1))
		return -ENOMEM;
	s->v[s->n++] = (struct span){ start, end };
	return 0;
}

/* Only a split needs memory; without it the span stays whole, and a page wrongly kept
 * raises SIGBUS: loud, never zeros. */
static void spans_remove(struct spans *s, uint64_t start, uint64_t end)
{
	size_t i = spans_find(s, start);
	if (start >= end || i == s->n)
		return;
	if (s->v[i].start < start && s->v[i].end > end) {
		if (spans_reserve(s, 1))
			return;
		memmove(&s->v[i + 2], &s->v[i + 1], (s->n - i - 1) * sizeof(*s->v));
		s->v[i + 1] = (struct span){ end, s->v[i].end };
		s->v[i].end = start;
		s->n++;
		return;
	}
	if (s->v[i].start < start)
		s->v[i++].end = start;
	size_t j = i;
	while (j < s->n && s->v[j].end <= end)
		j++;
	if (j < s->n && s->v[j].start < end)
		s->v[j].start = end;
	memmove(&s->v[i], &s->v[j], (s->n - j) * sizeof(*s->v));
	s->n -= j - i;
}

/* mremap moved [from, from + len) to `to`, over whatever was there */
static int spans_move(struct spans *s, uint64_t from, uint64_t to, uint64_t len)
{
	struct spans moved = { 0 };
	int rc = 0;
	for (size_t i = spans_find(s, from); !rc && i < s->n && s->v[i].start < from + len; i++) {
		uint64_t a = s->v[i].start > from ? s->v[i].start : from;
		uint64_t b = s->v[i].end < from + len ? s->v[i].end : from + len;
		rc = spans_push(&moved, a - from + to, b - from + to);
	}
	if (!rc) {
		spans_remove(s, from, from + len);
		spans_remove(s, to, to + len);
		rc = spans_add(s, moved.v, moved.n);
	}
	spans_free(&moved);
	return rc;
}

static int spans_copy(struct spans *dst, const struct spans *src)
{
	*dst = (struct spans){ 0 };
	if (spans_reserve(dst, src->n))
		return -ENOMEM;
	if (src->n)
		memcpy(dst->v, src->v, src->n * sizeof(*src->v));
	dst->n = src->n;
	return 0;
}

static int span_order(const void *x, const void *y)
{
	const struct span *a = x, *b = y;
	return (a->start > b->start) - (a->start < b->start);
}

/* --- the two threads' shared state ---------------------------------------------------- */
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
};

static void agent_put(struct agent *a)
{
	pthread_mutex_lock(&a->lock);
	int last = --a->refs == 0;
	pthread_mutex_unlock(&a->lock);
	if (!last)
		return;
	if (a->uffd >= 0)
		close(a->uffd);
	close(a->sock);
	spans_free(&a->dropped);
	pthread_mutex_destroy(&a->lock);
	mem_free(a, sizeof(*a));
}

static int handler_gone(struct agent *a)
{
	return __atomic_load_n(&a->dead, __ATOMIC_ACQUIRE);
}

/* --- commands ------------------------------------------------------------------------- */
static int runs_fit(const struct ufc_run *runs, uint32_t nruns, uint64_t room, uint64_t *total)
{
	*total = 0;
	for (uint32_t i = 0; i < nruns; i++) {
		if (runs[i].addr % UFC_PAGE_SIZE || runs[i].len % UFC_PAGE_SIZE || !runs[i].len ||
		    runs[i].addr + runs[i].len < runs[i].addr)
			return -EINVAL;
		*total += runs[i].len;
	}
	return *total <= room ? 0 : -E2BIG;
}

/* EAGAIN: the mappings are changing and the handler has an event to read; it reads
 * events while it waits for us, so the protection goes through after a short wait. */
static int writeprotect_retry(int uffd, uint64_t addr, uint64_t len, uint64_t mode)
{
	int rc;
	for (int tries = 0; tries < 20000; tries++) {
		rc = ufc_uffd_writeprotect(uffd, addr, len, mode);
		if (rc != -EAGAIN)
			return rc;
		usleep(50);
	}
	return rc;
}

/* The runs go into the dropped set before they are dropped, so that the fallback never
 * takes a page for untouched memory; they stay in flight until the drops return, so
 * that their REMOVE events are not taken for the application freeing them. */
static int begin_drop(struct agent *a, const struct ufc_run *runs, uint32_t nruns)
{
	struct span add[UFC_AGENT_MAX_RUNS];
	for (uint32_t i = 0; i < nruns; i++)
		add[i] = (struct span){ runs[i].addr, runs[i].addr + runs[i].len };
	qsort(add, nruns, sizeof(*add), span_order);
	pthread_mutex_lock(&a->lock);
	int rc = a->dead ? -EPIPE : spans_add(&a->dropped, add, nruns);
	if (!rc) {
		memcpy(a->inflight, add, nruns * sizeof(*add));
		a->ninflight = nruns;
	}
	pthread_mutex_unlock(&a->lock);
	return rc;
}

/* a is NULL for ufc_agent_demote called on its own (tests): nothing to record */
static int drop_runs(struct agent *a, const struct ufc_run *runs, uint32_t nruns)
{
	if (nruns > UFC_AGENT_MAX_RUNS)
		return -E2BIG;
	int rc = a ? begin_drop(a, runs, nruns) : 0;
	for (uint32_t i = 0; !rc && i < nruns; i++) {
		/* with the handler gone, a page dropped now would be lost with it: keep it */
		rc = a && handler_gone(a) ? -EPIPE
					  : ufc_madvise(runs[i].addr, runs[i].len, MADV_DONTNEED);
	}
	if (a) {
		pthread_mutex_lock(&a->lock);
		a->ninflight = 0;
		pthread_mutex_unlock(&a->lock);
	}
	return rc;
}

/* Write-protect first so that no write can slip in between the copy and the drop:
 * a writer now faults to the handler, which resolves it from the stored copy. */
static int demote(struct agent *a, int uffd, const struct ufc_run *runs, uint32_t nruns,
		  uint64_t staging, uint64_t staging_len, uint64_t *bytes)
{
	uint64_t total, off = 0;
	*bytes = 0;
	int rc = runs_fit(runs, nruns, staging_len, &total);
	if (rc)
		return rc;
	for (uint32_t i = 0; i < nruns; i++) {
		rc = writeprotect_retry(uffd, runs[i].addr, runs[i].len,
					UFFDIO_WRITEPROTECT_MODE_WP);
		if (rc)
			goto unprotect;
	}
	/* Copy out through the kernel rather than memcpy: if the application unmapped a
	 * run meanwhile, this fails with EFAULT instead of killing it with SIGSEGV. */
	struct iovec local[UFC_AGENT_MAX_RUNS], remote[UFC_AGENT_MAX_RUNS];
	if (nruns > UFC_AGENT_MAX_RUNS) {
		rc = -E2BIG;
		goto unprotect;
	}
	for (uint32_t i = 0; i < nruns; i++) {
		local[i] = (struct iovec){ (void *)(uintptr_t)(staging + off), runs[i].len };
		remote[i] = (struct iovec){ (void *)(uintptr_t)runs[i].addr, runs[i].len };
		off += runs[i].len;
	}
	ssize_t got = process_vm_readv(getpid(), local, nruns, remote, nruns, 0);
	if (got != (ssize_t)total) {
		rc = got < 0 ? -errno : -EFAULT;
		goto unprotect;
	}
	/* from here on the staged copy is the truth: say so even if a drop fails, so the
	 * handler can put back exactly the pages that went missing */
	*bytes = total;
	return drop_runs(a, runs, nruns);
unprotect:
	for (uint32_t j = 0; j < nruns; j++)
		writeprotect_retry(uffd, runs[j].addr, runs[j].len, 0);
	return rc;
}

int ufc_agent_demote(int uffd, const struct ufc_run *runs, uint32_t nruns,
		     uint64_t staging, uint64_t staging_len, uint64_t *bytes)
{
	return demote(NULL, uffd, runs, nruns, staging, staging_len, bytes);
}

static int agent_drop(struct agent *a, const struct ufc_run *runs, uint32_t nruns,
		      uint64_t *bytes)
{
	uint64_t total;
	int rc = runs_fit(runs, nruns, UINT64_MAX, &total);
	if (!rc)
		rc = drop_runs(a, runs, nruns);
	*bytes = rc ? 0 : total;
	return rc;
}

static int agent_serve(struct agent *a, struct ufc_agent_cmd *cmd, ssize_t n,
		       struct ufc_agent_reply *reply)
{
	size_t want = sizeof(*cmd) + (size_t)cmd->nruns * sizeof(struct ufc_run);
	if (cmd->magic != UFC_AGENT_MAGIC || cmd->nruns > UFC_AGENT_MAX_RUNS || (size_t)n != want)
		return -EBADMSG;
	switch (cmd->op) {
	case UFC_AGENT_DEMOTE:
		if (cmd->staging_offset > a->staging_len)
			return -EINVAL;
		return demote(a, a->uffd, cmd->runs, cmd->nruns, a->staging + cmd->staging_offset,
			      a->staging_len - cmd->staging_offset, &reply->bytes);
	case UFC_AGENT_DROP:
		return agent_drop(a, cmd->runs, cmd->nruns, &reply->bytes);
	case UFC_AGENT_PING:
		return 0;
	default:
		return -EOPNOTSUPP;
	}
}

static void *agent_main(void *arg)
{
	struct agent *a = arg;
	size_t cap = sizeof(struct ufc_agent_cmd) + UFC_AGENT_MAX_RUNS * sizeof(struct ufc_run);
	struct ufc_agent_cmd *cmd = mem_resize(NULL, 0, cap);
	int tid = ufc_gettid();
	while (cmd) {
		ssize_t n = recv(a->sock, cmd, cap, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < (ssize_t)sizeof(*cmd))
			break; /* handler gone or socket closed: the watcher takes over */
		struct ufc_agent_reply reply = { UFC_AGENT_MAGIC, cmd->seq, 0, tid, 0 };
		if (cmd->op == UFC_AGENT_STOP)
			break;
		reply.status = agent_serve(a, cmd, n, &reply);
		if (send(a->sock, &reply, sizeof(reply), MSG_NOSIGNAL) < 0)
			break;
	}
	mem_free(cmd, cap);
	agent_put(a);
	return NULL;
}

/* --- the fallback: serving the uffd once the handler is gone --------------------------
 * This is the one piece of policy in C, because no Python may run on the application's
 * fault path. With the handler gone, its pool and every page it held are gone too; the
 * application keeps its uffd open (closing it would make those pages read as zeros), so
 * without a reader every access to them, and every munmap, MADV_DONTNEED, mremap and
 * fork of managed memory, would wait forever. The watcher serves instead: a missing page
 * that was dropped on command is poisoned (the access raises SIGBUS), any other missing
 * page is untouched memory (zeros), a write-protected one is made writable, and events
 * keep the dropped set in step with the address space. */
#define FALLBACK_MAX_UFFDS 64   /* the application's own, and forked children's */
#define FALLBACK_MAX_REPORTS 16
#define FALLBACK_TIDY_MS 1000

struct served {
	int fd;          /* -1: no longer served */
	int blind;       /* the set could not be kept (no memory): every missing page is lost */
	struct spans lost;
};

struct fallback {
	struct agent *a;
	size_t n;        /* served[0] is the application's own uffd */
	struct served served[FALLBACK_MAX_UFFDS];
	unsigned reports;
};

static void say(const char *fmt, ...)
{
	char line[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n > 0)
		(void)!write(2, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

/* Whether the application still has its uffd descriptor open. Closing it is how the
 * application lets the uffd go; the agent's own descriptor must not outlive that. */
static int app_holds_uffd(const struct agent *a)
{
	pid_t pid = getpid();
	long same = syscall(SYS_kcmp, pid, pid, KCMP_FILE, a->app_uffd, a->uffd);
	if (same >= 0 || errno == EBADF)
		return same == 0;
	struct stat x, y;   /* no kcmp in this kernel: the same inode is the next best thing */
	return fstat(a->app_uffd, &x) == 0 && fstat(a->uffd, &y) == 0 && x.st_ino == y.st_ino &&
	       x.st_dev == y.st_dev;
}

/* Keeps the pages still mapped and absent. A dropped page that is present again was
 * restored by the handler; it can only go missing again through an event we will read.
 * An unmapped one can no longer fault. This spares restored pages a false SIGBUS with
 * no word from the handler on its fault path. */
static int prune(struct spans *s)
{
	enum { CHUNK = 1024 };
	unsigned char vec[CHUNK];
	struct spans kept = { 0 };
	for (size_t i = 0; i < s->n; i++) {
		for (uint64_t at = s->v[i].start; at < s->v[i].end; at += CHUNK * UFC_PAGE_SIZE) {
			uint64_t len = s->v[i].end - at;
			if (len > CHUNK * UFC_PAGE_SIZE)
				len = CHUNK * UFC_PAGE_SIZE;
			size_t pages = len / UFC_PAGE_SIZE;
			if (mincore((void *)(uintptr_t)at, len, vec) < 0) {
				/* part of it is unmapped (ENOMEM): page by page */
				for (size_t p = 0; p < pages; p++)
					if (mincore((void *)(uintptr_t)(at + p * UFC_PAGE_SIZE),
						    UFC_PAGE_SIZE, &vec[p]) < 0)
						vec[p] = errno == ENOMEM;
			}
			for (size_t p = 0; p < pages; p++) {
				uint64_t page = at + p * UFC_PAGE_SIZE;
				if (!(vec[p] & 1) && spans_push(&kept, page, page + UFC_PAGE_SIZE)) {
					spans_free(&kept);
					return -ENOMEM;
				}
			}
		}
	}
	spans_free(s);
	*s = kept;
	return 0;
}

static void resolve(struct fallback *f, struct served *u, uint64_t addr, uint64_t flags,
		    uint32_t tid)
{
	int64_t done;
	int rc, lost = 0;
	if (flags & UFFD_PAGEFAULT_FLAG_WP)
		rc = ufc_uffd_writeprotect(u->fd, addr, UFC_PAGE_SIZE, 0);
	else if ((lost = u->blind || spans_has(&u->lost, addr)))
		rc = ufc_uffd_poison(u->fd, addr, UFC_PAGE_SIZE, UFFDIO_POISON_MODE_DONTWAKE, &done);
	else
		rc = ufc_uffd_zeropage(u->fd, addr, UFC_PAGE_SIZE, 0, &done);
	int retry = rc == -EAGAIN || rc == -EEXIST || rc == -ENOENT;
	/* said before the wake-up: SIGBUS may end the process at once */
	if (lost && !retry && f->reports++ < FALLBACK_MAX_REPORTS) {
		if (rc)   /* no UFFDIO_POISON (before Linux 6.6): left waiting, never zeros */
			say("ufcram: thread %u touched a page lost with its handler at %#llx and "
			    "cannot get SIGBUS (%s): it waits forever\n", tid,
			    (unsigned long long)addr, strerror(-rc));
		else
			say("ufcram: thread %u touched a page lost with its handler at %#llx: "
			    "SIGBUS (EFAULT in a system call)\n", tid, (unsigned long long)addr);
	}
	/* EAGAIN: an event is unread. Woken, the thread faults again, and its new message
	 * queues behind the event, which is therefore read first. EEXIST, ENOENT: another
	 * fault won the race, or the range went away; the thread finds out for itself. */
	if (retry || (lost && !rc))
		ufc_uffd_wake(u->fd, addr, UFC_PAGE_SIZE);
}

/* The child's memory is a copy of its parent's, lost pages included. Its uffd is kept
 * open while the child lives: closing it would turn them into zeros. */
static void adopt(struct fallback *f, size_t parent, int fd)
{
	if (f->n == FALLBACK_MAX_UFFDS) {
		say("ufcram: pid %d forked too many children after losing its handler: a new "
		    "one waits forever on managed memory it had not touched or had lost\n", getpid());
		return;   /* fd stays open for the same reason */
	}
	struct served *child = &f->served[f->n++];
	*child = (struct served){ fd, f->served[parent].blind, { 0 } };
	if (spans_copy(&child->lost, &f->served[parent].lost))
		child->blind = 1;
}

static int own_drop(const struct span *inflight, uint32_t n, uint64_t start, uint64_t end)
{
	for (uint32_t i = 0; i < n; i++)
		if (inflight[i].start <= start && end <= inflight[i].end)
			return 1;
	return 0;
}

static void drain(struct fallback *f, size_t i)
{
	struct uffd_msg msgs[64];
	/* Taken before the read: a drop of ours whose REMOVE event is in this batch was in
	 * flight then, since the drop waits until its event has been read. */
	struct span inflight[UFC_AGENT_MAX_RUNS];
	uint32_t ninflight = 0;
	if (i == 0) {
		pthread_mutex_lock(&f->a->lock);
		ninflight = f->a->ninflight;
		memcpy(inflight, f->a->inflight, ninflight * sizeof(*inflight));
		pthread_mutex_unlock(&f->a->lock);
	}
	int n = ufc_uffd_read_msgs(f->served[i].fd, msgs, 64);
	for (int k = 0; k < n; k++) {
		const struct uffd_msg *m = &msgs[k];
		struct served *u = &f->served[i];
		switch (m->event) {
		case UFFD_EVENT_PAGEFAULT:
			resolve(f, u, m->arg.pagefault.address & ~(uint64_t)(UFC_PAGE_SIZE - 1),
				m->arg.pagefault.flags, m->arg.pagefault.feat.ptid);
			break;
		case UFFD_EVENT_REMOVE:
			if (own_drop(inflight, ninflight, m->arg.remove.start, m->arg.remove.end))
				break;
			/* fall through: the application freed these pages, they read zeros now */
		case UFFD_EVENT_UNMAP:
			spans_remove(&u->lost, m->arg.remove.start, m->arg.remove.end);
			break;
		case UFFD_EVENT_REMAP:
			if (spans_move(&u->lost, m->arg.remap.from, m->arg.remap.to, m->arg.remap.len))
				u->blind = 1;
			break;
		case UFFD_EVENT_FORK:
			adopt(f, i, (int)m->arg.fork.ufd);
			break;
		}
	}
}

/* Once a second: stop serving what nobody needs served any more. */
static void tidy(struct fallback *f)
{
	struct agent *a = f->a;
	if (f->served[0].fd >= 0 && !app_holds_uffd(a)) {
		f->served[0].fd = -1;
		spans_free(&f->served[0].lost);
		pthread_mutex_lock(&a->lock);
		if (a->refs == 1) {   /* the command thread is gone: nothing else uses it */
			close(a->uffd);
			a->uffd = -1;
		}
		pthread_mutex_unlock(&a->lock);
	}
	for (size_t i = f->n - 1; i >= 1; i--) {
		/* a harmless ioctl on a child that has exited (or exec'd) fails with ESRCH;
		 * unprotecting a page means nothing once the handler is gone */
		if (ufc_uffd_writeprotect(f->served[i].fd, 1 << 16, UFC_PAGE_SIZE, 0) != -ESRCH)
			continue;
		close(f->served[i].fd);
		spans_free(&f->served[i].lost);
		f->served[i] = f->served[--f->n];
	}
}

static uint64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

static void fallback(struct agent *a)
{
	struct fallback f = { .a = a, .n = 1 };
	struct served *own = &f.served[0];
	pthread_mutex_lock(&a->lock);
	__atomic_store_n(&a->dead, 1, __ATOMIC_RELEASE);
	own->lost = a->dropped;   /* the command thread drops nothing from here on */
	a->dropped = (struct spans){ 0 };
	pthread_mutex_unlock(&a->lock);
	own->fd = a->uffd;
	say("ufcram: the fault handler is gone; pages it held for this process are lost and "
	    "will raise SIGBUS on access (pid %d)\n", getpid());
	prune(&own->lost);   /* without memory for it the set stays larger: still safe */
	/* a drop under way may have dropped pages after prune looked at them */
	pthread_mutex_lock(&a->lock);
	if (spans_add(&own->lost, a->inflight, a->ninflight))
		own->blind = 1;
	pthread_mutex_unlock(&a->lock);
	/* threads whose fault the handler read but never answered wait for a wake-up that is
	 * not coming: wake them all (x86-64 user space, above mmap_min_addr); each faults
	 * again, and this time we answer */
	ufc_uffd_wake(own->fd, 1 << 16, (1ULL << 47) - UFC_PAGE_SIZE - (1 << 16));
	uint64_t next_tidy = now_ms() + FALLBACK_TIDY_MS;
	while (f.served[0].fd >= 0 || f.n > 1) {
		struct pollfd p[FALLBACK_MAX_UFFDS];
		size_t n = f.n;
		for (size_t i = 0; i < n; i++)
			p[i] = (struct pollfd){ .fd = f.served[i].fd, .events = POLLIN };
		if (poll(p, n, FALLBACK_TIDY_MS) > 0)
			for (size_t i = 0; i < n; i++)
				if (p[i].revents & POLLIN)
					drain(&f, i);
		if (now_ms() >= next_tidy) {
			tidy(&f);
			next_tidy = now_ms() + FALLBACK_TIDY_MS;
		}
	}
}

/* Waits for the handler to hang up (poll on the agent socket, which the command thread
 * reads: the watcher must not take its commands). The command thread cannot notice in
 * every case: it may itself wait, in a drop, for the handler to read the event. */
static void *watch_main(void *arg)
{
	struct agent *a = arg;
	struct pollfd p = { .fd = a->sock, .events = POLLRDHUP };
	while (!(p.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)))
		if (poll(&p, 1, -1) < 0 && errno != EINTR)
			usleep(100000);
	if (!(p.revents & POLLNVAL) && app_holds_uffd(a))
		fallback(a);
	agent_put(a);
	return NULL;
}

int ufc_agent_start(int uffd, int sock, uint64_t staging, uint64_t staging_len)
{
	struct agent *a = mem_resize(NULL, 0, sizeof(*a));
	if (!a)
		return -ENOMEM;
	int own = fcntl(uffd, F_DUPFD_CLOEXEC, 0);
	if (own < 0) {
		int err = errno;
		mem_free(a, sizeof(*a));
		return -err;
	}
	*a = (struct agent){ .uffd = own, .app_uffd = uffd, .sock = sock, .staging = staging,
			     .staging_len = staging_len, .refs = 2 };
	pthread_mutex_init(&a->lock, NULL);
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	/* the agent must never run the application's signal handlers */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_t watcher, commands;
	int rc = pthread_create(&watcher, NULL, watch_main, a);
	if (!rc) {
		rc = pthread_create(&commands, &attr, agent_main, a);
		if (rc) {   /* the watcher is still in its first poll, a cancellation point */
			pthread_cancel(watcher);
			pthread_join(watcher, NULL);
		} else {
			pthread_detach(watcher);
		}
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (rc) {
		close(own);
		pthread_mutex_destroy(&a->lock);
		mem_free(a, sizeof(*a));
		return -rc;
	}
	return 0;
}
