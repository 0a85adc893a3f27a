/* The fault engine's decisions: for one fault on the page tables Python keeps, which
 * transition, over how many pages, into which state (ufc_plan_fault). Pure: it only reads
 * the tables and the call, so tests hold it to a model (tests/unit/fault_model.py).
 *
 * The plans:
 *  - a read of a demoted page: its entry, and the demoted pages after it that the
 *    readahead window and the resident limits let in (fault-around), mapped read-only;
 *  - a write to a demoted page: its entry mapped writable;
 *  - a write to a read-only page: unprotected in place (the upgrade);
 *  - a first touch: zeros, and the untouched pages after it in the readahead window
 *    (fault-around) the shared zero page;
 *  - a write-protect fault on a page that is not read-only (stale protection), or any
 *    fault outside every region: unprotected, or zeros, with nothing to book.
 * A written page becomes WRITABLE within its write budget, else NORMAL (promoted). What
 * cannot be served now is left to Python with its reason (UFC_LEFT_*, ufcram_native.h). */
#include <stdint.h>
#include <string.h>

#include "engine.h"

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

static int present(uint8_t state)
{
	return state != UFC_STATE_UNTOUCHED && state != UFC_STATE_DEMOTED;
}

/* Fault-around, as the kernel's swap readahead: a fault right after the previous run
 * doubles the window, any other shrinks it to one page. A fault past the run by a
 * stretch of pages still in memory (at most a window's worth) is right after it too:
 * a scan over memory partly resident from its last pass is still sequential. The pages
 * from page on in `state` to bring in, at most `most`; *window is the new window. */
static int64_t run_length(const struct ufc_region_view *r, int64_t page, uint8_t state,
			  int64_t most, int64_t *window)
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
	while (count < want && r->state[page + count] == state)
		count++;
	return count;
}

/* Pages a fault in r may bring in (its own always: at a limit the call then ends, and
 * Python demotes), at most `most` and none where an event of the read frees. */
static int64_t headroom(const struct ufc_region_view *r, const struct ufc_fault_call *call,
			int64_t most, int64_t before_free)
{
	int64_t n = r->limit >= 0 ? r->limit - resident(r) : most;
	n = n < call->room ? n : call->room;
	n = n < most ? n : most;
	n = n < before_free ? n : before_free;
	return n > 1 ? n : 1;
}

/* A written page's state: writable on the node within the write budget, else normal
 * memory (promoted); never while the node is closed or for a forked child (may_grant). */
static uint8_t written_state(const struct ufc_region_view *r, const struct ufc_fault_call *call)
{
	int grant = call->may_grant &&
		    (r->budget < 0 ? call->auto_grants > 0 : r->tally[UFC_STATE_WRITABLE] < r->budget);
	return grant ? UFC_STATE_WRITABLE : UFC_STATE_NORMAL;
}

int ufc_plan_fault(struct ufc_region_view *const *regions, int nregions, uint64_t address,
		   uint64_t flags, uint32_t tid, uint64_t freed, const struct ufc_fault_call *call,
		   struct ufc_plan *p)
{
	uint64_t addr = address & ~(uint64_t)(UFC_PAGE_SIZE - 1);
	int wp = (flags & UFFD_PAGEFAULT_FLAG_WP) != 0;
	int write = wp || (flags & UFFD_PAGEFAULT_FLAG_WRITE);
	int agent = call->agent_tid != 0 && tid == call->agent_tid;
	memset(p, 0, sizeof(*p));
	p->region = -1;
	p->count = 1;
	p->window = -1;   /* the readahead window stays as it is */
	p->write = write;
	if (freed == addr)   /* its page is being freed: after the free */
		return p->action = UFC_LEFT_AFTER_EVENTS;
	int at = region_of(regions, nregions, addr);
	if (at < 0) {
		/* registered but in no region (grown in place by mremap, or released while
		 * still registered): untouched memory, or a page left protected */
		if (call->cover)
			return p->action = UFC_LEFT_OUTSIDE;
		return p->action = wp ? UFC_FAULT_UNPROTECT : UFC_FAULT_ZEROS;
	}
	const struct ufc_region_view *r = regions[at];
	int64_t page = (int64_t)((addr - r->base) / UFC_PAGE_SIZE);
	int64_t before_free = freed == UINT64_MAX ? INT64_MAX :
			      (int64_t)((freed - addr) / UFC_PAGE_SIZE);
	uint8_t state = r->state[page];
	p->region = at;
	p->page = page;
	if (state == UFC_STATE_DEMOTING)
		/* the agent copying a page the application freed gets zeros, protected: a
		 * write landing before the agent's drop faults and waits for the batch
		 * instead of being dropped with the page. Anyone else waits for the batch. */
		return p->action = agent ? UFC_FAULT_AGENT_ZEROS : UFC_LEFT_WAIT;
	if (r->entry[page] >= 0 && !(wp && state == UFC_STATE_READONLY)) {
		p->action = UFC_FAULT_RESTORE;
		if (write) {
			p->state = written_state(r, call);
		} else {
			int64_t most = headroom(r, call, call->bounce_pages, before_free);
			p->count = run_length(r, page, UFC_STATE_DEMOTED, most, &p->window);
			p->state = UFC_STATE_READONLY;
			p->wp = 1;
		}
	} else if (wp) {
		if (state == UFC_STATE_READONLY) {
			p->action = UFC_FAULT_UPGRADE;
			p->state = written_state(r, call);
		} else {
			p->action = UFC_FAULT_UNPROTECT;   /* stale: the page is writable already */
		}
	} else if (call->throttle && !agent) {
		/* its process tree is over its resident limit and being demoted: a first
		 * touch waits until that is done, as a cgroup reclaims before it charges. (A
		 * restore is served, its page alone: the demotion in flight makes its room.) */
		p->action = UFC_LEFT_WAIT;
	} else {
		/* the pages after it get the shared zero page, which costs no memory until
		 * written: a resident limit does not cut the window (a process tree held over
		 * its limit by memory it cannot demote would first-touch a page a demotion) */
		int64_t most = call->bounce_pages < before_free ? call->bounce_pages : before_free;
		p->action = UFC_FAULT_ZERO_FILL;
		p->count = run_length(r, page, UFC_STATE_UNTOUCHED, most, &p->window);
		p->state = UFC_STATE_NORMAL;
	}
	return p->action;
}

