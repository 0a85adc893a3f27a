/* Four threads, each with a large buffer of its own and a quarter of a shared one, fill
 * and verify them over eight rounds while the resident limit demotes under them (the
 * first round may run before the library has found the buffers).
 * usage: threads */
#include "common.c"

#include <pthread.h>

#define THREADS 4
#define OWN (2 * MiB)
#define SHARED (4 * MiB)
#define QUARTER (SHARED / THREADS)
#define ROUNDS 8

static char *shared;
static pthread_barrier_t barrier;

static uint64_t seed_of(int round, int who)
{
	return 1 + 16 * (uint64_t)round + (uint64_t)who;
}

static void *work(void *arg)
{
	int me = (int)(intptr_t)arg;
	char what[96];
	/* allocated while the other threads allocate theirs: the library registers mappings
	 * while threads make and fill them */
	char *own = xmalloc(OWN);
	for (int round = 0; round < ROUNDS; round++) {
		fill(own, OWN, seed_of(round, me));
		fill(shared + me * QUARTER, QUARTER, seed_of(round, THREADS + me));
		pthread_barrier_wait(&barrier);
		snprintf(what, sizeof(what), "thread %d's own buffer, round %d", me, round);
		expect_pattern(what, own, OWN, seed_of(round, me));
		for (int q = 0; q < THREADS; q++) {
			snprintf(what, sizeof(what), "quarter %d of the shared buffer read by thread "
				 "%d, round %d", q, me, round);
			expect_pattern(what, shared + q * QUARTER, QUARTER, seed_of(round, THREADS + q));
		}
		pthread_barrier_wait(&barrier); /* nobody rewrites what another still reads */
	}
	free(own);
	return NULL;
}

int main(int argc, char **argv)
{
	setup(argc, argv);
	shared = xmalloc(SHARED);
	pthread_barrier_init(&barrier, NULL, THREADS);
	pthread_t t[THREADS];
	for (int i = 0; i < THREADS; i++)
		if (pthread_create(&t[i], NULL, work, (void *)(intptr_t)i))
			die(2, "pthread_create failed");
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	for (int q = 0; q < THREADS; q++)
		expect_pattern("the shared buffer after the threads joined", shared + q * QUARTER,
			       QUARTER, seed_of(ROUNDS - 1, THREADS + q));
	free(shared);
	puts("ok");
	return 0;
}
