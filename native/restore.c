/* Read restores without Python: the one transition a random-read workload repeats, a
 * read fault on a demoted page, done here from the page tables Python keeps.
 *
 * Python decides: its tables say which pages are demoted and where their entries are,
 * and their resident limits bound how many pages come in. This loop only reads
 * faults and, while each is a read of a DEMOTED page with a valid entry, decompresses
 * it (and the demoted pages after it, when the readahead window says the access is
 * sequential), maps them read-only and records the move in the same tables. At the first message that is anything else it stops, and Python
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

static int present(uint8_t state)
{
	return state != UFC_STATE_UNTOUCHED && state != UFC_STATE_DEMOTED;
}

/* Readahead.pages then .ran (policy.py) for a fault at page, without committing: the
 * pages to restore from page on (at most `most`, and only demoted ones), and the new
 * window. A scan that read through pages still in memory is sequential too. */
static int64_t run_length(const struct ufc_region_view *r, int64_t page, int64_t most,
			  int64_t *window)
{
	int64_t next = r->readahead[1];
	int sequential = page == next;
	if (!sequential && next >= 0 && next < page && page <= next + r->readahead_max) {
		sequential = 1;
		for (int64_t p = next; sequential && p < page; p++)
			sequential = present(r->state[p]);
	}
	int64_t w = sequential ? r->readahead[0] * 2 : 1;
	*window = w < r->readahead_max ? w : r->readahead_max;
	int64_t want = *window < most ? *window : most;
	if (want > (int64_t)r->npages - page)
		want = (int64_t)r->npages - page;
	int64_t count = 1;
	while (count < want && r->state[page + count] == UFC_STATE_DEMOTED)
		count++;
	return count;
}

/* Install count pages from bounce at addr, read-only; the pages the kernel put in
 * (it stops at one already there), 0 when not even the first. */
static int64_t install(int uffd, uint64_t addr, uint8_t *bounce, int64_t count)
{
	struct uffdio_copy copy = { .dst = addr, .src = (uint64_t)(uintptr_t)bounce,
				    .len = (uint64_t)count * UFC_PAGE_SIZE, .mode = UFFDIO_COPY_MODE_WP };
	if (ioctl(uffd, UFFDIO_COPY, &copy) == 0)
		return count;
	if (copy.copy <= 0)   /* EAGAIN, EEXIST, ... at the first page: Python's, as always */
		return 0;
	if (errno == EEXIST) {   /* as Uffd.copy: wake whoever waits on the rest */
		struct uffdio_range range = { addr, (uint64_t)count * UFC_PAGE_SIZE };
		ioctl(uffd, UFFDIO_WAKE, &range);
	}
	return copy.copy / UFC_PAGE_SIZE;
}

/* 1 if the fault was served, 0 if it is Python's to serve. */
static int restore_read(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *regions,
			int nregions, const struct uffd_msg *m, int64_t *room, uint8_t *bounce,
			int64_t bounce_pages, int *touched, int *ntouched)
{
	uint64_t flags = m->arg.pagefault.flags;
	if (m->event != UFFD_EVENT_PAGEFAULT ||
	    flags & (UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR))
		return 0;
	uint64_t addr = m->arg.pagefault.address & ~(uint64_t)(UFC_PAGE_SIZE - 1);
	struct ufc_region_view *r = region_of(regions, nregions, addr);
	if (!r)
		return 0;
	/* at a limit: Python serves the fault, goes over it and demotes down to its low
	 * watermark, as on its own path */
	int64_t most = r->limit >= 0 ? r->limit - resident(r) : bounce_pages;
	most = most < *room ? most : *room;
	most = most < bounce_pages ? most : bounce_pages;
	int64_t page = (int64_t)((addr - r->base) / UFC_PAGE_SIZE);
	if (most <= 0 || r->state[page] != UFC_STATE_DEMOTED)
		return 0;
	int64_t window, count = run_length(r, page, most, &window), loaded = 0;
	while (loaded < count &&
	       load_entry(pool, r->entry[page + loaded], bounce + loaded * UFC_PAGE_SIZE) == 0)
		loaded++;
	int64_t done = loaded ? install(uffd, addr, bounce, loaded) : 0;
	if (done == 0)
		return 0;
	for (int64_t p = page; p < page + done; p++)
		r->state[p] = UFC_STATE_READONLY;
	r->tally[UFC_STATE_DEMOTED] -= done;
	r->tally[UFC_STATE_READONLY] += done;
	r->referenced[page] = 1;
	r->readahead[0] = window;
	r->readahead[1] = page + count;
	*room -= done;
	if (r->faults++ == 0)
		touched[(*ntouched)++] = (int)(r - regions);
	r->restored += done;
	return 1;
}

int ufc_restore_reads(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *regions,
		      int nregions, int64_t client_limit, void *msgs, int max_msgs,
		      int max_faults, int64_t spin_ns, void *bounce, int64_t bounce_pages,
		      int *touched, int *ntouched, int *nmsgs)
{
	struct uffd_msg *m = msgs;
	int64_t room = INT64_MAX;   /* restores the client's own resident limit allows */
	if (client_limit >= 0) {
		room = client_limit;
		for (int i = 0; i < nregions; i++)
			room -= resident(&regions[i]);
	}
	int served = 0;
	int64_t idle_since = now_ns();
	*ntouched = 0;
	*nmsgs = 0;
	while (served < max_faults) {
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
			if (served >= max_faults ||
			    !restore_read(uffd, pool, regions, nregions, &m[i], &room, bounce,
					  bounce_pages, touched, ntouched)) {
				*nmsgs = n;
				return i;   /* messages i..n-1 are Python's, in order */
			}
			served++;
		}
		idle_since = now_ns();
	}
	return 0;
}
