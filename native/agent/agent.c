/* The agent's command thread: demotes, drops and pings on the handler's command, and
 * keeps the uffds of children forked while the handler lives, for the fallback. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "agent_internal.h"

/* --- the two threads' shared state ---------------------------------------------------- */
void agent_put(struct agent *a)
{
	pthread_mutex_lock(&a->lock);
	int last = --a->refs == 0;
	pthread_mutex_unlock(&a->lock);
	if (!last)
		return;
	if (a->uffd >= 0)
		close(a->uffd);
	close(a->sock);
	for (uint32_t i = 0; i < a->nadopted; i++)
		close(a->adopted[i]);
	if (a->handler_pidfd >= 0)
		close(a->handler_pidfd);
	move_close(a);
	spans_free(&a->dropped);
	pthread_mutex_destroy(&a->lock);
	mem_free(a, sizeof(*a));
}

/* One write, no stdio buffer: it may be the last thing the process does (SIGBUS), and
 * stdio may allocate (under the preload library, from managed memory). */
void vsay(const char *fmt, va_list ap)
{
	char line[256];
	int n = vsnprintf(line, sizeof(line), fmt, ap);
	if (n > 0)
		(void)!write(2, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsay(fmt, ap);
	va_end(ap);
}

/* --- commands ------------------------------------------------------------------------- */
int runs_fit(const struct ufc_run *runs, uint32_t nruns, uint64_t room, uint64_t *total)
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
int begin_drop(struct agent *a, const struct ufc_run *runs, uint32_t nruns)
{
	struct span add[UFC_AGENT_MAX_RUNS];
	for (uint32_t i = 0; i < nruns; i++)
		add[i] = (struct span){ runs[i].addr, runs[i].addr + runs[i].len };
	spans_sort(add, nruns);
	pthread_mutex_lock(&a->lock);
	int rc = a->dead ? -EPIPE : spans_add(&a->dropped, add, nruns);
	if (!rc) {
		memcpy(a->inflight, add, nruns * sizeof(*add));
		a->ninflight = nruns;
	}
	pthread_mutex_unlock(&a->lock);
	return rc;
}

void end_drop(struct agent *a)
{
	pthread_mutex_lock(&a->lock);
	a->ninflight = 0;
	pthread_mutex_unlock(&a->lock);
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
	if (a)
		end_drop(a);
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
		       struct ufc_agent_reply *reply, uint8_t *stayed)
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
	case UFC_AGENT_MOVE:
		if (cmd->staging_offset > a->staging_len)
			return -EINVAL;
		return move_out(a, cmd->runs, cmd->nruns, a->staging + cmd->staging_offset,
				a->staging_len - cmd->staging_offset, &reply->bytes, stayed);
	case UFC_AGENT_DISCARD:
		return move_discard(a, cmd->runs, cmd->nruns, &reply->bytes, stayed);
	case UFC_AGENT_PING:
		return 0;
	default:
		return -EOPNOTSUPP;
	}
}

/* --- the command channel ------------------------------------------------------------- */
void close_received(struct received *r)
{
	for (int i = 0; i < r->nfds; i++)
		close(r->fds[i]);
	r->nfds = 0;
}

static ssize_t receive(int sock, struct ufc_agent_cmd *cmd, size_t cap, struct received *r)
{
	union {
		char buf[CMSG_SPACE(sizeof(int) * UFC_MAX_FDS)];
		struct cmsghdr align;
	} control;
	struct iovec iov = { cmd, cap };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
			      .msg_controllen = sizeof(control.buf) };
	*r = (struct received){ 0 };
	r->n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	if (r->n < 0)
		return r->n;
	r->cut = (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < count; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(fd));
			if (r->nfds < UFC_MAX_FDS) {
				r->fds[r->nfds++] = fd;
			} else {
				close(fd);
				r->cut = 1;
			}
		}
	}
	return r->n;
}

static void *agent_main(void *arg)
{
	struct agent *a = arg;
	size_t cap = sizeof(struct ufc_agent_cmd) + UFC_AGENT_MAX_RUNS * sizeof(struct ufc_run);
	struct ufc_agent_cmd *cmd = mem_resize(NULL, 0, cap);
	int tid = ufc_gettid();
	while (cmd) {
		struct received r;
		ssize_t n = receive(a->sock, cmd, cap, &r);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < (ssize_t)sizeof(*cmd) || cmd->op == UFC_AGENT_STOP) {
			/* handler gone or socket closed: the watcher takes over */
			close_received(&r);
			break;
		}
		if (cmd->op == UFC_AGENT_ADOPT) {
			adopt_child(a, cmd, &r);
			continue;
		}
		if (cmd->op == UFC_AGENT_MOVED) {
			moved(a, cmd, &r);
			continue;
		}
		struct {
			struct ufc_agent_reply head;
			uint8_t stayed[UFC_AGENT_MOVE_MAX_PAGES / 8];   /* MOVE's bitmap */
		} reply = { { UFC_AGENT_MAGIC, cmd->seq, 0, tid, 0 }, { 0 } };
		reply.head.status = r.nfds || r.cut ? -EBADMSG
						    : agent_serve(a, cmd, n, &reply.head, reply.stayed);
		close_received(&r);
		size_t len = sizeof(reply.head) +
			     (cmd->op == UFC_AGENT_MOVE || cmd->op == UFC_AGENT_DISCARD
				      ? sizeof(reply.stayed) : 0);
		if (send(a->sock, &reply, len, MSG_NOSIGNAL) < 0)
			break;
	}
	mem_free(cmd, cap);
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
			     .staging_len = staging_len, .refs = 2,
			     .handler_pidfd = -1, .move_uffd = -1, .pagemap = -1 };
	pthread_mutex_init(&a->lock, NULL);
	move_open(a);
	pthread_t watcher, commands;
	int rc = own_thread(&watcher, watch_main, a, 0);
	if (!rc) {
		rc = own_thread(&commands, agent_main, a, 1);
		if (rc) {   /* the watcher is still in its first poll, a cancellation point */
			pthread_cancel(watcher);
			pthread_join(watcher, NULL);
		} else {
			pthread_detach(watcher);
		}
	}
	if (rc) {
		close(own);
		move_close(a);
		pthread_mutex_destroy(&a->lock);
		mem_free(a, sizeof(*a));
		return -rc;
	}
	return 0;
}
