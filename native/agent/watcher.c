/* The agent's watcher: waits for the handler to hang up, then serves the application's
 * uffd, and its forked children's, so that no page the handler held reads as zeros. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/kcmp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "agent_internal.h"

/* This is the one piece of policy in C, because no Python may run on the application's
 * fault path. With the handler gone, its pool and every page it held are gone too; the
 * application keeps its uffd open (closing it would make those pages read as zeros), so
 * without a reader every access to them, and every munmap, MADV_DONTNEED, mremap and
 * fork of managed memory, would wait forever. The watcher serves instead: a missing page
 * that was dropped on command is poisoned (the access raises SIGBUS), any other missing
 * page is untouched memory (zeros), a write-protected one is made writable, and events
 * keep the dropped set in step with the address space. */
#define FALLBACK_MAX_UFFDS 1024   /* the application's own, and forked children's */
#define FALLBACK_MAX_REPORTS 16
#define FALLBACK_TIDY_MS 1000
#define FALLBACK_SETTLE_MS 10     /* while only the command thread may still hand us one */

struct served {
	int fd;          /* -1: no longer served */
	int blind;       /* the set could not be kept (no memory): every missing page is lost */
	struct spans lost;
};

struct fallback {
	struct agent *a;
	size_t n;           /* served[0] is the application's own uffd */
	unsigned reports;
	int handler_exited; /* its pidfd said so: the children it served are ours now */
	int said_gone;
	/* the dropped set as the handler left it, not pruned: what each child the handler
	 * handed over starts from (see take_adopted) */
	struct spans base;
	struct served served[FALLBACK_MAX_UFFDS];
	struct pollfd polls[FALLBACK_MAX_UFFDS + 1];
};

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

/* Threads whose fault the handler read but never answered wait for a wake-up that is
 * not coming: wake them all (x86-64 user space, above mmap_min_addr); each faults
 * again, and this time we answer. */
static void wake_all(int fd)
{
	ufc_uffd_wake(fd, 1 << 16, (1ULL << 47) - UFC_PAGE_SIZE - (1 << 16));
}

/* Serves one more child uffd, its memory lost where `lost` says. A child that does not
 * fit keeps its uffd open, unserved: it waits on its lost pages, never reads zeros. */
static void serve_child(struct fallback *f, int fd, const struct spans *lost, int blind)
{
	if (f->n == FALLBACK_MAX_UFFDS) {
		say("ufcram: pid %d has too many forked children to serve without its handler: "
		    "one waits forever on managed memory it had not touched or had lost\n",
		    getpid());
		return;
	}
	struct served *child = &f->served[f->n++];
	*child = (struct served){ fd, blind, { 0 } };
	if (spans_copy(&child->lost, lost))
		child->blind = 1;
}

/* A child forked after the handler hung up: its memory is a copy of its parent's, lost
 * pages included. */
static void adopt(struct fallback *f, size_t parent, int fd)
{
	serve_child(f, fd, &f->served[parent].lost, f->served[parent].blind);
}

/* The children the handler served until it exited, now ours. Each starts from the
 * whole dropped set, unpruned (our pages present say nothing of the child's): its
 * memory is a copy of ours as it was at its fork (a grandchild's, of its parent's), so
 * every page the handler held for it is a page we dropped before that fork, at the
 * same address unless moved by mremap (the handler read that event, not us). The set
 * is larger than needed: pages we dropped after the fork, or that the child freed
 * while the handler lived, raise SIGBUS where zeros were right: loud, never silent. */
static void take_adopted(struct fallback *f)
{
	struct agent *a = f->a;
	int fds[AGENT_MAX_ADOPTED];
	pthread_mutex_lock(&a->lock);
	release_exited(a);   /* nothing to say about those */
	uint32_t n = a->nadopted;
	memcpy(fds, a->adopted, n * sizeof(*fds));
	a->nadopted = 0;
	pthread_mutex_unlock(&a->lock);
	if (n && !f->said_gone++)
		say("ufcram: the fault handler is gone; pages it held for children of pid %d are "
		    "lost and will raise SIGBUS on access\n", getpid());
	for (uint32_t i = 0; i < n; i++) {
		serve_child(f, fds[i], &f->base, 0);
		wake_all(fds[i]);
	}
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
			/* the application freed these pages: they read zeros now */
			__attribute__((fallthrough));
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

/* Once a second: stop serving, and holding, what nobody needs any more. */
static void tidy(struct fallback *f)
{
	struct agent *a = f->a;
	if (f->served[0].fd >= 0 && !app_holds_uffd(a)) {
		f->served[0].fd = -1;
		spans_free(&f->served[0].lost);
	}
	pthread_mutex_lock(&a->lock);
	if (f->served[0].fd < 0 && a->uffd >= 0 && a->refs == 1) {
		close(a->uffd);   /* the command thread is gone: nothing else uses it */
		a->uffd = -1;
	}
	release_exited(a);    /* children the handler still serves */
	pthread_mutex_unlock(&a->lock);
	for (size_t i = f->n - 1; i >= 1; i--) {
		if (!uffd_exited(f->served[i].fd))
			continue;
		close(f->served[i].fd);
		spans_free(&f->served[i].lost);
		f->served[i] = f->served[--f->n];
	}
}

/* Whether children the handler serves may still become ours: some are held, or the
 * command thread runs (an ADOPT may be queued). *pidfd: the handler's, -1 if none came. */
static int awaiting_children(struct agent *a, int *pidfd)
{
	pthread_mutex_lock(&a->lock);
	int more = a->refs > 1 || a->nadopted > 0;
	*pidfd = a->handler_pidfd;
	pthread_mutex_unlock(&a->lock);
	return more;
}

static uint64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

/* serve_own: the application still holds its uffd, which the handler no longer reads.
 * The handler may live on (it let this process go): then the children it serves stay
 * its own until its pidfd says it has exited. */
static void fallback(struct agent *a, int serve_own)
{
	struct fallback *f = mem_resize(NULL, 0, sizeof(*f));
	if (!f) {   /* the descriptors stay open: what nobody serves waits, never reads zeros */
		say("ufcram: pid %d lost its fault handler and has no memory to serve its uffd: "
		    "managed memory it touches waits forever\n", getpid());
		for (;;)
			pause();
	}
	f->a = a;
	f->n = 1;
	struct served *own = &f->served[0];
	own->fd = -1;
	pthread_mutex_lock(&a->lock);
	__atomic_store_n(&a->dead, 1, __ATOMIC_RELEASE);
	f->base = a->dropped;   /* the command thread drops nothing from here on */
	a->dropped = (struct spans){ 0 };
	pthread_mutex_unlock(&a->lock);
	if (serve_own) {
		own->fd = a->uffd;
		f->said_gone = 1;
		say("ufcram: the fault handler is gone; pages it held for this process are lost "
		    "and will raise SIGBUS on access (pid %d)\n", getpid());
		if (spans_copy(&own->lost, &f->base))
			own->blind = 1;
		prune(&own->lost);   /* without memory for it the set stays larger: still safe */
		/* a drop under way may have dropped pages after prune looked at them */
		pthread_mutex_lock(&a->lock);
		if (spans_add(&own->lost, a->inflight, a->ninflight))
			own->blind = 1;
		pthread_mutex_unlock(&a->lock);
		wake_all(own->fd);
	}
	uint64_t settled = now_ms() + FALLBACK_TIDY_MS, next_tidy = settled;
	for (;;) {
		int pidfd;
		int more = awaiting_children(a, &pidfd);
		if (!more)
			spans_free(&f->base);
		if (own->fd < 0 && f->n == 1 && !more)
			break;
		if (more && !f->handler_exited && pidfd >= 0) {
			struct pollfd p = { .fd = pidfd, .events = POLLIN };
			f->handler_exited = poll(&p, 1, 0) > 0 && (p.revents & POLLIN);
		}
		if (f->handler_exited)
			take_adopted(f);
		size_t n = f->n, npoll = n;
		for (size_t i = 0; i < n; i++)
			f->polls[i] = (struct pollfd){ .fd = f->served[i].fd, .events = POLLIN };
		if (more && !f->handler_exited && pidfd >= 0)
			f->polls[npoll++] = (struct pollfd){ .fd = pidfd, .events = POLLIN };
		/* nothing to wait on but the command thread, which normally ends at once */
		int settling = own->fd < 0 && n == 1 && npoll == n && now_ms() < settled;
		if (poll(f->polls, npoll, settling ? FALLBACK_SETTLE_MS : FALLBACK_TIDY_MS) > 0)
			for (size_t i = 0; i < n; i++)
				if (f->polls[i].revents & POLLIN)
					drain(f, i);
		if (settling || now_ms() >= next_tidy) {
			tidy(f);
			next_tidy = now_ms() + FALLBACK_TIDY_MS;
		}
	}
	spans_free(&f->base);
	mem_free(f, sizeof(*f));
}

/* Waits for the handler to hang up (poll on the agent socket, which the command thread
 * reads: the watcher must not take its commands). The command thread cannot notice in
 * every case: it may itself wait, in a drop, for the handler to read the event. */
void *watch_main(void *arg)
{
	struct agent *a = arg;
	struct pollfd p = { .fd = a->sock, .events = POLLRDHUP };
	while (!(p.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)))
		if (poll(&p, 1, -1) < 0 && errno != EINTR)
			usleep(100000);
	if (!(p.revents & POLLNVAL))
		fallback(a, app_holds_uffd(a));
	agent_put(a);
	return NULL;
}
