/* The allocation calls a program makes, on memory the node manages, each checked on its
 * own results.
 * usage: allocs realloc|aligned|calloc|mmap|munmap-partial|mremap-grow|split-mapping|
 *               usable-size [--demoted] */
#include "common.c"

#include <malloc.h>

#define SIZE (8 * MiB)

/* A libc block that grows past the threshold, a managed one that grows (and moves), and
 * one that shrinks: each keeps its bytes. */
static void check_realloc(void)
{
	char *p = xmalloc(64 * 1024);
	fill(p, 64 * 1024, 1);
	p = realloc(p, SIZE);
	if (!p)
		fail("realloc to %zu failed", SIZE);
	expect_pattern("a small block grown past the threshold", p, 64 * 1024, 1);
	fill(p, SIZE, 2);
	require_demoted("the grown block", p, SIZE);
	p = realloc(p, 2 * SIZE);
	if (!p)
		fail("realloc to %zu failed", 2 * SIZE);
	expect_pattern("a large block grown further", p, SIZE, 2);
	fill(p, 2 * SIZE, 3);
	require_demoted("the block grown further", p, 2 * SIZE);
	p = realloc(p, 512 * 1024);
	if (!p)
		fail("realloc to 512 KiB failed");
	expect_pattern("a large block shrunk below the threshold", p, 512 * 1024, 3);
	free(p);
}

static void check_aligned_block(const char *how, char *p, size_t align, uint64_t seed)
{
	if (!p)
		fail("%s returned NULL", how);
	if ((uintptr_t)p % align)
		fail("%s returned %p, not aligned to %zu", how, (void *)p, align);
	fill(p, SIZE, seed);
	require_demoted(how, p, SIZE);
	expect_pattern(how, p, SIZE, seed);
	free(p);
}

static void check_aligned(void)
{
	const size_t align = 64 * 1024;
	void *p = NULL;
	int rc = posix_memalign(&p, align, SIZE);
	if (rc)
		fail("posix_memalign: %s", strerror(rc));
	check_aligned_block("posix_memalign(64 KiB)", p, align, 4);
	check_aligned_block("aligned_alloc(64 KiB)", aligned_alloc(align, SIZE), align, 5);
	check_aligned_block("memalign(64 KiB)", memalign(align, SIZE), align, 6);
	check_aligned_block("valloc", valloc(SIZE), PAGE, 7);
}

/* calloc's memory is zero, also where a freed block of the same size was written. */
static void check_calloc(void)
{
	for (int i = 0; i < 2; i++) {
		char *p = calloc(SIZE / 8, 8);
		if (!p)
			fail("calloc failed");
		expect_zeros(i ? "calloc after a written block was freed" : "calloc", p, SIZE);
		fill(p, SIZE, 8);
		require_demoted("the calloc'd block, written", p, SIZE);
		expect_pattern("the calloc'd block, written", p, SIZE, 8);
		free(p);
	}
}

static char *map(size_t len)
{
	char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		fail("mmap(%zu): %s", len, strerror(errno));
	return m;
}

/* A private anonymous mapping: its bytes survive demotion, and once unmapped, a new one
 * reads as zeros. */
static void check_mmap(void)
{
	for (int i = 0; i < 2; i++) {
		char *m = map(SIZE);
		expect_zeros(i ? "a new mapping after one was written and unmapped" : "a new mapping",
			     m, SIZE);
		fill(m, SIZE, 9);
		require_demoted("the mapping", m, SIZE);
		expect_pattern("the mapping", m, SIZE, 9);
		if (munmap(m, SIZE))
			fail("munmap: %s", strerror(errno));
	}
}

/* Unmapping the middle of a demoted mapping: both ends keep their bytes, and stay usable. */
static void check_munmap_partial(void)
{
	char *m = map(SIZE);
	fill(m, SIZE, 10);
	require_demoted("the mapping", m, SIZE);
	if (munmap(m + 2 * MiB, 2 * MiB))
		fail("munmap of the middle: %s", strerror(errno));
	expect_range("the head left by a partial munmap", m, 0, 2 * MiB, 10);
	expect_range("the tail left by a partial munmap", m, 4 * MiB, SIZE, 10);
	fill(m, 2 * MiB, 11);
	expect_pattern("the head, rewritten", m, 2 * MiB, 11);
	if (munmap(m, 2 * MiB) || munmap(m + 4 * MiB, SIZE - 4 * MiB))
		fail("munmap of the rest: %s", strerror(errno));
}

/* Growing a demoted mapping (moving it if need be) keeps its bytes, the new part is
 * zero, and all of it takes writes: also the pages read back (read-only) before. */
static void check_mremap_grow(void)
{
	char *m = map(SIZE);
	fill(m, SIZE, 12);
	require_demoted("the mapping", m, SIZE);
	expect_pattern("the mapping's first MiB, read back before mremap", m, MiB, 12);
	char *n = mremap(m, SIZE, 2 * SIZE, MREMAP_MAYMOVE);
	if (n == MAP_FAILED)
		fail("mremap: %s", strerror(errno));
	expect_pattern("a mapping grown by mremap", n, SIZE, 12);
	expect_zeros("the part mremap added", n + SIZE, SIZE);
	fill(n, 2 * SIZE, 13);
	expect_pattern("the grown mapping, rewritten", n, 2 * SIZE, 13);
	if (munmap(n, 2 * SIZE))
		fail("munmap: %s", strerror(errno));
}

/* A managed block whose mapping the program splits in two by advising part of it, as
 * numpy does for every array of 4 MiB or more (MADV_HUGEPAGE from its first page boundary
 * on): rewritten and demoted again and again, it keeps its bytes. */
static void check_split_mapping(void)
{
	char *p = xmalloc(SIZE);
	size_t skip = PAGE - (uintptr_t)p % PAGE;
	if (madvise(p + skip, SIZE - skip, MADV_HUGEPAGE) &&
	    madvise(p + skip, SIZE - skip, MADV_RANDOM)) /* a kernel without THP */
		die(2, "madvise: %s", strerror(errno));
	for (uint64_t seed = 14; seed < 17; seed++) {
		fill(p, SIZE, seed);
		require_demoted("the split block", p, SIZE);
		expect_pattern("a block split in two mappings, after demotion", p, SIZE, seed);
	}
	free(p);
}

/* malloc_usable_size covers what was asked for: libc's blocks before and after the first
 * large allocation, a large block and an aligned one. */
static void check_usable_size(void)
{
	char *small = xmalloc(100);
	if (malloc_usable_size(small) < 100)
		fail("malloc_usable_size of a 100-byte block before any large allocation: %zu",
		     malloc_usable_size(small));
	char *large = xmalloc(SIZE);
	if (malloc_usable_size(large) < SIZE)
		fail("malloc_usable_size of a large block: %zu", malloc_usable_size(large));
	if (malloc_usable_size(small) < 100)
		fail("malloc_usable_size of a 100-byte block after a large allocation: %zu",
		     malloc_usable_size(small));
	void *aligned = NULL;
	if (posix_memalign(&aligned, 64 * 1024, SIZE))
		fail("posix_memalign failed");
	if (malloc_usable_size(aligned) < SIZE)
		fail("malloc_usable_size of a 64 KiB-aligned block: %zu", malloc_usable_size(aligned));
	free(aligned);
	free(large);
	free(small);
}

static const struct check checks[] = {
	{ "realloc", check_realloc },
	{ "aligned", check_aligned },
	{ "calloc", check_calloc },
	{ "mmap", check_mmap },
	{ "munmap-partial", check_munmap_partial },
	{ "mremap-grow", check_mremap_grow },
	{ "split-mapping", check_split_mapping },
	{ "usable-size", check_usable_size },
};

int main(int argc, char **argv)
{
	return run_named(argc, argv, checks, sizeof(checks) / sizeof(checks[0]));
}
