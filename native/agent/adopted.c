/* What the agent keeps for after a handler death, on the handler's word: the uffds of
 * children forked while it lives (ADOPT) and where mremap moved dropped pages (MOVED).
 * Neither command gets a reply: the handler sends them from its event handling, perhaps
 * while it awaits our reply to a demotion, which a reply of ours would take the place of. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "agent_internal.h"

/* Called with a->lock held: the descriptors held stay bounded by the children alive. */
void release_exited(struct agent *a)
{
	for (uint32_t i = a->nadopted; i-- > 0;) {
		if (!uffd_exited(a->adopted[i]))
			continue;
		close(a->adopted[i]);
		a->adopted[i] = a->adopted[--a->nadopted];
	}
}

/* --- children forked while the handler lives -----------------------------------------
 * Their uffds are the handler's alone: were it to die, they would close, and the
 * kernel would unregister the children's memory, whose pages the handler held would
 * then read as zeros. The handler hands each one to us with a pidfd of itself; the
 * watcher serves them once that pidfd says the handler has exited, never before. */
static int fd_is_uffd(int fd)
{
	char path[64], link[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	if (n < 0)
		return 0;
	link[n] = 0;
	return strcmp(link, "anon_inode:[userfaultfd]") == 0;
}

/* Signal 0 only checks: EBADF or EINVAL for anything that is not a pidfd. */
static int fd_is_pidfd(int fd)
{
	return syscall(SYS_pidfd_send_signal, fd, 0, NULL, 0) == 0 || errno == ESRCH ||
	       errno == EPERM;
}

/* ADOPT, valid or not, gets no reply (see the top): a refusal is said here instead. */
void adopt_child(struct agent *a, const struct ufc_agent_cmd *cmd, struct received *r)
{
	const char *why = NULL;
	if (cmd->magic != UFC_AGENT_MAGIC || cmd->nruns || cmd->staging_offset ||
	    r->n != (ssize_t)sizeof(*cmd) || r->cut)
		why = "a malformed command";
	else if (r->nfds != 2 || !fd_is_uffd(r->fds[0]) || !fd_is_pidfd(r->fds[1]))
		why = "not a userfaultfd and a pidfd";
	pthread_mutex_lock(&a->lock);
	if (!why) {
		release_exited(a);
		if (a->nadopted == AGENT_MAX_ADOPTED)
			why = "too many children alive";
	}
	if (!why) {
		a->adopted[a->nadopted++] = r->fds[0];
		if (a->handler_pidfd < 0)
			a->handler_pidfd = r->fds[1];
		else
			close(r->fds[1]);   /* the same handler: one is enough */
		r->nfds = 0;
	}
	int first = why && !a->adopt_refused;
	a->adopt_refused |= why != NULL;
	pthread_mutex_unlock(&a->lock);
	close_received(r);
	if (first)
		say("ufcram: pid %d refused a forked child's uffd (%s): should the handler die, "
		    "that child's pages it held would read as zeros\n", getpid(), why);
}

/* The application moved memory with mremap: pages dropped there are lost at their new
 * address should the handler die. */
void moved(struct agent *a, const struct ufc_agent_cmd *cmd, struct received *r)
{
	const struct ufc_run *from = &cmd->runs[0], *to = &cmd->runs[1];
	int valid = cmd->magic == UFC_AGENT_MAGIC && cmd->nruns == 2 && !r->nfds && !r->cut &&
		    r->n == (ssize_t)(sizeof(*cmd) + 2 * sizeof(struct ufc_run)) &&
		    from->len == to->len;
	close_received(r);
	pthread_mutex_lock(&a->lock);
	int rc = valid ? spans_move(&a->dropped, from->addr, to->addr, from->len) : -EBADMSG;
	pthread_mutex_unlock(&a->lock);
	if (rc)
		say("ufcram: pid %d could not follow an mremap (%s)\n", getpid(), strerror(-rc));
}
