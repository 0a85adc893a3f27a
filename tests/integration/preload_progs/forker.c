/* fork of a program whose large buffer is (mostly) demoted to the node.
 * usage: forker child-writes|child-reads|child-frees|parent-writes [--demoted] */
#include "common.c"

#include <sys/wait.h>

#define SIZE (4 * MiB)
#define FREEING_ROUNDS 16

static void wait_ok(pid_t pid, const char *who)
{
	int status;
	if (pid < 0)
		die(2, "fork: %s", strerror(errno));
	if (waitpid(pid, &status, 0) != pid)
		die(2, "waitpid: %s", strerror(errno));
	if (!WIFEXITED(status) || WEXITSTATUS(status))
		fail("the %s failed (wait status %#x; its reason is above)", who, status);
}

/* The parent's buffer, filled with seed: only about the limit of it stays resident. */
static void fill_and_demote(char *a, uint64_t seed)
{
	fill(a, SIZE, seed);
	require_demoted("the parent's buffer before fork", a, SIZE);
}

/* The child reads its parent's demoted pages, then writes its own copy of them. */
static void child_writes(char *a)
{
	fill_and_demote(a, 1);
	pid_t pid = fork();
	if (pid == 0) {
		expect_pattern("the child's view of the parent's buffer", a, SIZE, 1);
		fill(a, SIZE, 2);
		expect_pattern("the child's copy after it wrote it", a, SIZE, 2);
		exit(0);
	}
	wait_ok(pid, "child that read and wrote the buffer");
	expect_pattern("the parent's buffer after the child wrote its copy", a, SIZE, 1);
}

/* The child reads its parent's demoted pages back into itself: the node must demote
 * them there too (its own agent drops them: their copies are still on the node), or a
 * child that reads everything (redis's BGSAVE) would hold the whole buffer. */
static void child_reads(char *a)
{
	fill_and_demote(a, 1);
	pid_t pid = fork();
	if (pid == 0) {
		expect_pattern("the child's view of the parent's buffer", a, SIZE, 1);
		double resident = 1.0;
		for (int i = 0; i < 500 && (resident = resident_fraction(a, SIZE)) > 0.5; i++) {
			struct timespec ms10 = { 0, 10 * 1000 * 1000 };
			nanosleep(&ms10, NULL);
		}
		if (resident > 0.5)
			fail("the child's copy it read is still %.0f%% resident: not demoted",
			     100 * resident);
		expect_pattern("the child's view after its copy was demoted", a, SIZE, 1);
		exit(0);
	}
	wait_ok(pid, "child that read the buffer back");
	expect_pattern("the parent's buffer after the child read it", a, SIZE, 1);
}

/* A child that frees what it inherited and allocates anew (likely at the same address)
 * leaves the parent's buffer alone. Round after round, forking right after a fill: it
 * matters most when the fork lands while the node is still demoting the parent's pages,
 * which it may or may not. */
static void child_frees(char *a)
{
	for (uint64_t round = 0; round < FREEING_ROUNDS; round++) {
		fill(a, SIZE, 10 + round); /* fork at once, while the node may be demoting */
		pid_t pid = fork();
		if (pid == 0) {
			free(a);
			char *b = xmalloc(SIZE);
			fill(b, SIZE, 3);
			expect_pattern("a buffer the child allocated after freeing", b, SIZE, 3);
			free(b);
			exit(0);
		}
		wait_ok(pid, "child that freed the buffer");
		require_demoted("the parent's buffer after the child exited", a, SIZE);
		expect_pattern("the parent's buffer after the child freed its copy", a, SIZE,
			       10 + round);
	}
}

/* The parent writes the demoted pages while the child still holds them: the child must
 * keep seeing the bytes of the fork. */
static void parent_writes(char *a)
{
	int go[2];
	fill_and_demote(a, 1);
	if (pipe(go))
		die(2, "pipe: %s", strerror(errno));
	pid_t pid = fork();
	if (pid == 0) {
		char c;
		close(go[1]);
		if (read(go[0], &c, 1) != 1)
			die(2, "the child's pipe read failed");
		expect_pattern("the child's copy after the parent wrote its own", a, SIZE, 1);
		exit(0);
	}
	close(go[0]);
	fill(a, SIZE, 4);
	if (write(go[1], "x", 1) != 1)
		die(2, "the parent's pipe write failed");
	wait_ok(pid, "child that read after the parent wrote");
	expect_pattern("the parent's buffer after it wrote it", a, SIZE, 4);
}

int main(int argc, char **argv)
{
	setup(argc, argv);
	const char *scenario = argc > 1 ? argv[1] : "";
	char *a = xmalloc(SIZE);
	if (!strcmp(scenario, "child-writes"))
		child_writes(a);
	else if (!strcmp(scenario, "child-reads"))
		child_reads(a);
	else if (!strcmp(scenario, "child-frees"))
		child_frees(a);
	else if (!strcmp(scenario, "parent-writes"))
		parent_writes(a);
	else
		die(2, "usage: forker child-writes|child-reads|child-frees|parent-writes "
		       "[--demoted]");
	free(a);
	puts("ok");
	return 0;
}
