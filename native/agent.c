/* The agent: a native thread in the application that demotes or drops pages on the
 * handler's command. It runs no Python, so it can never hold the GIL while faulting. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ufcram_native.h"

struct agent {
	int uffd;
	int sock;
	uint64_t staging;
	uint64_t staging_len;
};

static int runs_fit(const struct ufc_run *runs, uint32_t nruns, uint64_t room, uint64_t *total)
{
	*total = 0;
	for (uint32_t i = 0; i < nruns; i++) {
		if (runs[i].addr % UFC_PAGE_SIZE || runs[i].len % UFC_PAGE_SIZE || !runs[i].len)
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

/* Write-protect first so that no write can slip in between the copy and the drop:
 * a writer now faults to the handler, which resolves it from the stored copy. */
int ufc_agent_demote(int uffd, const struct ufc_run *runs, uint32_t nruns,
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
	for (uint32_t i = 0; i < nruns; i++) {
		rc = ufc_madvise(runs[i].addr, runs[i].len, MADV_DONTNEED);
		if (rc)
			return rc;
	}
	return 0;
unprotect:
	for (uint32_t j = 0; j < nruns; j++)
		writeprotect_retry(uffd, runs[j].addr, runs[j].len, 0);
	return rc;
}

static int agent_drop(const struct ufc_run *runs, uint32_t nruns, uint64_t *bytes)
{
	uint64_t total;
	int rc = runs_fit(runs, nruns, UINT64_MAX, &total);
	for (uint32_t i = 0; !rc && i < nruns; i++)
		rc = ufc_madvise(runs[i].addr, runs[i].len, MADV_DONTNEED);
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
		return ufc_agent_demote(a->uffd, cmd->runs, cmd->nruns,
					a->staging + cmd->staging_offset,
					a->staging_len - cmd->staging_offset, &reply->bytes);
	case UFC_AGENT_DROP:
		return agent_drop(cmd->runs, cmd->nruns, &reply->bytes);
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
	struct ufc_agent_cmd *cmd = malloc(cap);
	int tid = ufc_gettid();
	while (cmd) {
		ssize_t n = recv(a->sock, cmd, cap, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < (ssize_t)sizeof(*cmd))
			break; /* handler gone or socket closed */
		struct ufc_agent_reply reply = { UFC_AGENT_MAGIC, cmd->seq, 0, tid, 0 };
		if (cmd->op == UFC_AGENT_STOP)
			break;
		reply.status = agent_serve(a, cmd, n, &reply);
		if (send(a->sock, &reply, sizeof(reply), MSG_NOSIGNAL) < 0)
			break;
	}
	free(cmd);
	close(a->sock);
	free(a);
	return NULL;
}

int ufc_agent_start(int uffd, int sock, uint64_t staging, uint64_t staging_len)
{
	struct agent *a = malloc(sizeof(*a));
	if (!a)
		return -ENOMEM;
	*a = (struct agent){ uffd, sock, staging, staging_len };
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	/* the agent must never run the application's signal handlers */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_t t;
	int rc = pthread_create(&t, &attr, agent_main, a);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (rc) {
		free(a);
		return -rc;
	}
	return 0;
}
