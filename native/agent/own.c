/* Threads of the library's own (agent, watcher, coverage scanner): every signal blocked,
 * and, under the preload library, on stacks of its own memory, which the node never
 * manages (agent_internal.h says why). */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>

#include "agent_internal.h"

#define OWN_STACK (256 << 10)

int own_stacks;

int own_thread(pthread_t *t, void *(*main)(void *), void *arg, int detached)
{
	/* Never freed: a thread cannot unmap the stack it runs on. The preload library
	 * starts a few threads for the life of the process; a Python program that makes
	 * and closes connections keeps glibc's stacks, which glibc recycles. */
	void *stack = own_stacks ? mem_resize(NULL, 0, OWN_STACK) : NULL;
	if (own_stacks && !stack)
		return ENOMEM;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	if (stack)
		pthread_attr_setstack(&attr, stack, OWN_STACK);
	if (detached)
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int rc = pthread_create(t, &attr, main, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (rc && stack)
		mem_free(stack, OWN_STACK);
	return rc;
}
