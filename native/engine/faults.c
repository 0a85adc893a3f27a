/* The fault fast path: the transitions that random access repeats, served here from the
 * page tables Python keeps, without a trip through Python per fault.
 *
 * Python decides: its tables say which pages are demoted or read-only and where their
 * entries are, the resident limits bound what comes in, and it hands over the write
 * grants its budgets allow. This loop reads faults and serves, while it can:
 *  - a read of a DEMOTED page: its entry (and the demoted pages after it, when the
 *    readahead window says the access is sequential) mapped read-only;
 *  - a write to a DEMOTED page: its entry mapped writable;
 *  - a write to a READONLY page: unprotected in place (the upgrade).
 * A written page's entry is stale: it is handed back to Python to release, and the page
 * becomes WRITABLE within its budget, else NORMAL (promoted). At the first message that
 * is anything else the loop stops, and Python serves that message and the rest, the
 * events of the read first; nothing is installed here where an event of the read frees
 * (struct read). */
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

/* The index of the region holding addr, or -1. */
static int region_of(struct ufc_region_view *const *regions, int n, uint64_t addr)
{
	int lo = 0, hi = n;   /* regions are sorted by base and do not overlap */
	while (lo < hi) {
		int mid = (lo + hi) / 2;
		if (addr < regions[mid]->base)
			hi = mid;
		else if (addr >= regions[mid]->base + regions[mid]->npages * UFC_PAGE_SIZE)
			lo = mid + 1;
		else
			return mid;
	}
	return -1;
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

/* Install count pages from bounce at addr (mode: UFFDIO_COPY_MODE_WP for read-only);
 * the pages the kernel put in (it stops at one already there), 0 when not even the
 * first. */
static int64_t install(int uffd, uint64_t addr, uint8_t *bounce, int64_t count, uint64_t mode)
{
	struct uffdio_copy copy = { .dst = addr, .src = (uint64_t)(uintptr_t)bounce,
				    .len = (uint64_t)count * UFC_PAGE_SIZE, .mode = mode };
	if (ioctl(uffd, UFFDIO_COPY, &copy) == 0)
		return count;
	/* EAGAIN, EEXIST, ... at the first page: Python's, as always. Past it the kernel
	 * answers EAGAIN with the bytes it put in, and has woken their waiters. */
	return copy.copy > 0 ? copy.copy / UFC_PAGE_SIZE : 0;
}

/* Pages the resident limits still let in for a fault in r, at most `most`. A fault at a
 * limit still brings its own page in, as on Python's path: the call then ends, and
 * Python demotes down to the low watermark (or, while a demotion is in flight, after
 * it). */
static int64_t headroom(const struct ufc_region_view *r, const struct ufc_fault_call *call,
			int64_t most)
{
	int64_t n = r->limit >= 0 ? r->limit - resident(r) : most;
	n = n < call->room ? n : call->room;
	return n < most ? n : most;
}

/* A page written: its entry is stale (Python releases it), and the page becomes writable
 * on the node within the write budget, else normal memory (promoted). */
static void written(struct ufc_region_view *r, int64_t page, struct ufc_fault_call *call)
{
	if (r->entry[page] >= 0) {
		call->released[call->nreleased++] = r->entry[page];
		r->entry[page] = -1;
	}
	int grant = call->may_grant &&
		    (r->budget < 0 ? call->auto_grants > 0 : r->tally[UFC_STATE_WRITABLE] < r->budget);
	uint8_t state = grant ? UFC_STATE_WRITABLE : UFC_STATE_NORMAL;
	if (grant && r->budget < 0)
		call->auto_grants--;
	r->promoted += !grant;
	r->tally[r->state[page]]--;
	r->tally[state]++;
	r->state[page] = state;
}

/* before_free: pages from page on that no free of this read covers (at least 1) */
static int64_t restore_read(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *r,
			    int64_t page, int64_t before_free, struct ufc_fault_call *call)
{
	int64_t most = headroom(r, call, call->bounce_pages);
	if (most <= 0)   /* at a limit already (a demotion is in flight): the page alone */
		most = 1;
	if (most > before_free)
		most = before_free;
	int64_t window, count = run_length(r, page, most, &window), loaded = 0;
	while (loaded < count && ufc_load_entry(pool, r->entry[page + loaded],
					    call->bounce + loaded * UFC_PAGE_SIZE) == 0)
		loaded++;
	uint64_t addr = r->base + (uint64_t)page * UFC_PAGE_SIZE;
	int64_t done = loaded ? install(uffd, addr, call->bounce, loaded, UFFDIO_COPY_MODE_WP) : 0;
	if (done == 0)
		return 0;
	for (int64_t p = page; p < page + done; p++)
		r->state[p] = UFC_STATE_READONLY;
	r->tally[UFC_STATE_DEMOTED] -= done;
	r->tally[UFC_STATE_READONLY] += done;
	r->readahead[0] = window;
	r->readahead[1] = page + count;
	return done;
}

static int64_t restore_write(int uffd, const struct ufc_pool_view *pool,
			     struct ufc_region_view *r, int64_t page, struct ufc_fault_call *call)
{
	if (ufc_load_entry(pool, r->entry[page], call->bounce) < 0 ||
	    !install(uffd, r->base + (uint64_t)page * UFC_PAGE_SIZE, call->bounce, 1, 0))
		return 0;
	written(r, page, call);
	return 1;
}

/* 1 if the upgrade was done; unprotected first, so a refusal leaves the page whole */
static int upgrade(int uffd, struct ufc_region_view *r, int64_t page, struct ufc_fault_call *call)
{
	struct uffdio_writeprotect wp = {
		.range = { r->base + (uint64_t)page * UFC_PAGE_SIZE, UFC_PAGE_SIZE }, .mode = 0 };
	if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
		return 0;
	written(r, page, call);
	return 1;
}

/* The messages of one read. The kernel lets the thread behind a REMOVE or UNMAP event go
 * on, and zap the range, as soon as the event is read, while we serve the faults read
 * with it (the kernel hands faults out first): a page installed in that range before
 * Python has its books told of the free would outlive it. */
struct read {
	const struct uffd_msg *m;
	int n;
};

/* The first address from addr on that a free of this read covers; UINT64_MAX if none. */
static uint64_t first_freed(const struct read *rd, uint64_t addr)
{
	uint64_t first = UINT64_MAX;
	for (int i = 0; i < rd->n; i++) {
		const struct uffd_msg *e = &rd->m[i];
		if ((e->event != UFFD_EVENT_REMOVE && e->event != UFFD_EVENT_UNMAP) ||
		    e->arg.remove.end <= addr)
			continue;
		uint64_t at = e->arg.remove.start > addr ? e->arg.remove.start : addr;
		first = at < first ? at : first;
	}
	return first;
}

/* 0 if the fault is Python's to serve; 1 if it was served, 2 if that left its region
 * or the client over a resident limit (Python is to demote now). */
static int serve(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *const *regions,
		 int nregions, const struct uffd_msg *m, const struct read *rd,
		 struct ufc_fault_call *call)
{
	uint64_t flags = m->arg.pagefault.flags;
	if (m->event != UFFD_EVENT_PAGEFAULT || flags & UFFD_PAGEFAULT_FLAG_MINOR)
		return 0;
	uint64_t addr = m->arg.pagefault.address & ~(uint64_t)(UFC_PAGE_SIZE - 1);
	int at = region_of(regions, nregions, addr);
	if (at < 0)
		return 0;
	uint64_t freed = first_freed(rd, addr);
	if (freed == addr)   /* its page is being freed: Python's, after the free */
		return 0;
	struct ufc_region_view *r = regions[at];
	int64_t page = (int64_t)((addr - r->base) / UFC_PAGE_SIZE), restored = 0;
	int64_t before_free = (int64_t)((freed - addr) / UFC_PAGE_SIZE);
	uint8_t state = r->state[page];
	if (flags & UFFD_PAGEFAULT_FLAG_WP) {
		if (state != UFC_STATE_READONLY || !upgrade(uffd, r, page, call))
			return 0;
	} else if (state != UFC_STATE_DEMOTED) {
		return 0;
	} else {
		restored = flags & UFFD_PAGEFAULT_FLAG_WRITE ? restore_write(uffd, pool, r, page, call)
							     : restore_read(uffd, pool, r, page,
									    before_free, call);
		if (!restored)
			return 0;
	}
	r->referenced[page] = 1;
	call->room -= restored;
	if (r->faults++ == 0)
		call->touched[call->ntouched++] = at;
	r->restored += restored;
	return (r->limit >= 0 && resident(r) > r->limit) || call->room < 0 ? 2 : 1;
}

int ufc_serve_faults(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *const *regions,
		     int nregions, void *msgs, int max_msgs, int64_t spin_ns,
		     struct ufc_fault_call *call)
{
	struct uffd_msg *m = msgs;
	call->room = INT64_MAX;   /* pages the client's own resident limit lets in */
	if (call->client_limit >= 0) {
		call->room = call->client_limit;
		for (int i = 0; i < nregions; i++)
			call->room -= resident(regions[i]);
	}
	int served = 0;
	int64_t idle_since = now_ns();
	call->ntouched = call->nreleased = call->nmsgs = 0;
	/* at most one entry released per fault: released[] holds max_faults */
	while (served < call->max_faults) {
		ssize_t got = read(uffd, m, (size_t)max_msgs * sizeof(*m));
		if (got < 0 && errno != EAGAIN)
			return -errno;
		int n = got < 0 ? 0 : (int)(got / (ssize_t)sizeof(*m));
		if (n == 0) {
			if (now_ns() - idle_since >= spin_ns)
				return 0;
			continue;
		}
		/* Faults are served here around what the read's frees cover (struct read); a
		 * fork or an mremap among them and the whole read is Python's, which serves
		 * every read's events before its faults. */
		struct read rd = { m, n };
		for (int i = 0; i < n; i++)
			if (m[i].event == UFFD_EVENT_FORK || m[i].event == UFFD_EVENT_REMAP) {
				call->nmsgs = n;
				return 0;
			}
		for (int i = 0; i < n; i++) {
			int rc = served < call->max_faults ?
				 serve(uffd, pool, regions, nregions, &m[i], &rd, call) : 0;
			served += rc > 0;
			if (rc != 1) {   /* messages i..n-1 (or i+1..n-1) are Python's, in order */
				call->nmsgs = n;
				return rc ? i + 1 : i;
			}
		}
		idle_since = now_ns();
	}
	return 0;
}
