/* Locks the middle of a managed buffer after some of it was demoted, then keeps writing
 * and reading the whole buffer under the resident limit: the locked range must come back,
 * stay resident (the kernel refuses to drop locked pages) and every byte must hold.
 * usage: mlock [--demoted] */
#include "common.c"

#include <sys/resource.h>

#define SIZE (32 * MiB)
#define LOCK_AT (12 * MiB)
#define LOCK_LEN (8 * MiB)
#define PASSES 3

int main(int argc, char **argv)
{
	setup(argc, argv);
	/* a user's RLIMIT_MEMLOCK is often 8 MiB: raise it if allowed, else say so below */
	struct rlimit unlimited = { RLIM_INFINITY, RLIM_INFINITY };
	(void)setrlimit(RLIMIT_MEMLOCK, &unlimited);
	char *buf = xmalloc(SIZE);
	fill(buf, SIZE, 1);
	require_demoted("the buffer, filled", buf, SIZE);
	expect_pattern("the buffer, read back", buf, SIZE, 1);
	require_demoted("the buffer, read back", buf, SIZE);
	if (mlock(buf + LOCK_AT, LOCK_LEN))
		die(2, "precondition: mlock of %zu bytes: %s", LOCK_LEN, strerror(errno));
	if (resident_fraction(buf + LOCK_AT, LOCK_LEN) < 1.0)
		fail("the locked range is not all resident right after mlock");
	expect_pattern("the buffer, just locked", buf, SIZE, 1);
	/* writes make every page dirty, so the node's demotions copy and drop them (and
	 * would try the locked ones, were they chosen) */
	for (int pass = 0; pass < PASSES; pass++) {
		fill(buf, SIZE, 2 + pass);
		expect_pattern("the buffer, rewritten", buf, SIZE, 2 + pass);
		if (resident_fraction(buf + LOCK_AT, LOCK_LEN) < 1.0)
			fail("the locked range lost pages in pass %d", pass);
	}
	require_demoted("the unlocked start of the buffer", buf, LOCK_AT);
	expect_pattern("the buffer at the end", buf, SIZE, 1 + PASSES);
	free(buf);
	puts("ok");
	return 0;
}
