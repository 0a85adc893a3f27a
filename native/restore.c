/* Read restores without Python: the one transition a random-read workload repeats, a
 * read fault on a demoted page, done here from the page tables Python keeps.
 *
 * Python decides: its tables say which pages are demoted and where their entries are,
 * and their resident limits bound how many pages come in. This loop only reads
 * faults and, while each is a read of a DEMOTED page with a valid entry away from the
 * readahead window, decompresses the entry, maps it read-only and records the move in
 * the same tables. At the first message that is anything else it stops, and Python
 * serves that message and the rest in order, as it always did. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "ufcram_native.h"

static int64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static struct ufc_region_view *region_of(struct ufc_region_view *regions, int n, uint64_t addr)
{
	int lo = 0, hi = n;   /* regions are sorted by base and do not overlap */
	while (lo < hi) {
		int mid = (lo + hi) / 2;
		if (addr < regions[mid].base)
			hi = mid;
		else if (addr >= regions[mid].base + regions[mid].npages * UFC_PAGE_SIZE)
			lo = mid + 1;
		else
			return &regions[mid];
	}
	return NULL;
}

/* The page of entry h into page; 0, or -1 when the entry is not one to trust here
 * (Python then serves the fault and reports what is wrong). */
static int load_entry(const struct ufc_pool_view *pool, int64_t h, uint8_t *page)
{
	if (h < 0 || h >= pool->nhandles || pool->size[h] < 0)
		return -1;
	int64_t size = pool->size[h], loc = pool->location[h];
	if (size == 0) {   /* same-filled: the location is the 8-byte value */
		for (int i = 0; i < UFC_PAGE_SIZE; i += 8)
			memcpy(page + i, &loc, 8);
		return 0;
	}
	int64_t arena = loc >> 32, offset = loc & 0xFFFFFFFF;
	if (arena >= pool->narenas || !pool->arena[arena] || size > UFC_PAGE_SIZE)
		return -1;
	const char *src = (const char *)(uintptr_t)(pool->arena[arena] + (uint64_t)offset);
	if (size == UFC_PAGE_SIZE) {   /* stored raw */
		memcpy(page, src, UFC_PAGE_SIZE);
		return 0;
	}
	return pool->decompress(src, (char *)page, (int)size, UFC_PAGE_SIZE) == UFC_PAGE_SIZE ? 0 : -1;
}

/* Pages of r resident and not in flight: what its resident limit counts. */
static int64_t resident(const struct ufc_region_view *r)
{
	return r->tally[UFC_STATE_NORMAL] + r->tally[UFC_STATE_READONLY] +
	       r->tally[UFC_STATE_WRITABLE];
}

/* 1 if the fault was restored, 0 if it is Python's to serve. */
static int restore_read(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *regions,
			int nregions, const struct uffd_msg *m, int64_t *room, uint8_t *bounce,
			int *touched, int *ntouched)
{
	uint64_t flags = m->arg.pagefault.flags;
	if (m->event != UFFD_EVENT_PAGEFAULT ||
	    flags & (UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR))
		return 0;
	uint64_t addr = m->arg.pagefault.address & ~(uint64_t)(UFC_PAGE_SIZE - 1);
	struct ufc_region_view *r = region_of(regions, nregions, addr);
	/* at a limit: Python serves the fault, goes over it and demotes down to its low
	 * watermark, as on its own path */
	if (!r || *room <= 0 || (r->limit >= 0 && resident(r) >= r->limit))
		return 0;
	int64_t page = (int64_t)((addr - r->base) / UFC_PAGE_SIZE);
	int64_t next = r->readahead[1];
	if (r->state[page] != UFC_STATE_DEMOTED ||
	    (next >= 0 && next <= page && page <= next + r->readahead_max))   /* sequential */
		return 0;
	if (load_entry(pool, r->entry[page], bounce) < 0)
		return 0;
	struct uffdio_copy copy = { .dst = addr, .src = (uint64_t)(uintptr_t)bounce,
				    .len = UFC_PAGE_SIZE, .mode = UFFDIO_COPY_MODE_WP };
	if (ioctl(uffd, UFFDIO_COPY, &copy) < 0)   /* EAGAIN, EEXIST, ...: as Python would */
		return 0;
	r->state[page] = UFC_STATE_READONLY;
	r->tally[UFC_STATE_DEMOTED]--;
	r->tally[UFC_STATE_READONLY]++;
	r->referenced[page] = 1;
	r->readahead[0] = 1;   /* a random fault: the window closes, as in Readahead.pages */
	r->readahead[1] = page + 1;
	(*room)--;
	if (r->restored++ == 0)
		touched[(*ntouched)++] = (int)(r - regions);
	return 1;
}

int ufc_restore_reads(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *regions,
		      int nregions, int64_t client_limit, void *msgs, int max_msgs,
		      int max_restores, int64_t spin_ns, void *bounce, int *touched, int *ntouched,
		      int *nmsgs)
{
	struct uffd_msg *m = msgs;
	int64_t room = INT64_MAX;   /* restores the client's own resident limit allows */
	if (client_limit >= 0) {
		room = client_limit;
		for (int i = 0; i < nregions; i++)
			room -= resident(&regions[i]);
	}
	int restored = 0;
	int64_t idle_since = now_ns();
	*ntouched = 0;
	*nmsgs = 0;
	while (restored < max_restores) {
		ssize_t got = read(uffd, m, (size_t)max_msgs * sizeof(*m));
		if (got < 0 && errno != EAGAIN)
			return -errno;
		int n = got < 0 ? 0 : (int)(got / (ssize_t)sizeof(*m));
		if (n == 0) {
			if (now_ns() - idle_since >= spin_ns)
				return 0;
			continue;
		}
		for (int i = 0; i < n; i++) {
			if (restored >= max_restores ||
			    !restore_read(uffd, pool, regions, nregions, &m[i], &room, bounce, touched,
					  ntouched)) {
				*nmsgs = n;
				return i;   /* messages i..n-1 are Python's, in order */
			}
			restored++;
		}
		idle_since = now_ns();
	}
	return 0;
}
