/* The fault engine's serving: it reads a client's uffd, applies each fault's plan
 * (plan.c) with the ioctls, and moves the page tables once the kernel has done its part.
 * A written page's entry is stale: it goes back to Python to release. What is not served
 * now is left to Python, in order, with its reason. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"

/* the source of every page of zeros we install with UFFDIO_COPY */
static const uint8_t zero_page[UFC_PAGE_SIZE] __attribute__((aligned(UFC_PAGE_SIZE)));
/* install()'s answer to a run that crosses into another mapping: not an errno */
#define SPLIT 4096

static int64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* How an install or protection ioctl that did nothing ends for its fault. */
static int failed(int err)
{
	if (err == EAGAIN)
		return UFC_LEFT_RETRY;   /* the mappings are changing: once the events are read */
	if (err == ENOENT || err == ESRCH)
		return UFC_LEFT_GONE;    /* the range or the process is gone: nobody waits */
	return -err;
}

/* UFFDIO_COPY or UFFDIO_ZEROPAGE (src NULL) of count pages at addr: the pages the kernel
 * put in (it stops at a page already there, and has woken those it put in), or a
 * UFC_LEFT_* or -errno when not even the first. A page already there (EEXIST: another
 * fault won the race) has its waiters woken: 0. */
static int64_t install(int uffd, uint64_t addr, const uint8_t *src, int64_t count, int wp)
{
	uint64_t len = (uint64_t)count * UFC_PAGE_SIZE;
	int64_t done;
	int rc = src ? ufc_uffd_copy(uffd, addr, (uint64_t)(uintptr_t)src, len,
				     wp ? UFFDIO_COPY_MODE_WP : 0, &done)
		     : ufc_uffd_zeropage(uffd, addr, len, 0, &done);
	if (rc == 0)
		return count;
	if (done > 0)
		return done / UFC_PAGE_SIZE;
	if (rc == -EEXIST) {
		ufc_uffd_wake(uffd, addr, UFC_PAGE_SIZE);
		return 0;
	}
	return rc == -ENOENT && count > 1 ? -SPLIT : rc;
}

static int unprotect(int uffd, uint64_t addr)
{
	int rc = ufc_uffd_writeprotect(uffd, addr, UFC_PAGE_SIZE, 0);
	return rc == 0 ? 0 : failed(-rc);
}

/* A page written: its stale entry goes to Python to release, and it takes its state. */
static void written(struct ufc_region_view *r, int64_t page, uint8_t state,
		    struct ufc_fault_call *call)
{
	if (r->entry[page] >= 0) {
		call->released[call->nreleased++] = r->entry[page];
		r->entry[page] = -1;
	}
	if (state == UFC_STATE_WRITABLE && r->budget < 0)
		call->auto_grants--;
	r->promoted += state == UFC_STATE_NORMAL;
	r->tally[r->state[page]]--;
	r->tally[state]++;
	r->state[page] = state;
}

static void book(struct ufc_region_view *r, int64_t page, int64_t count, uint8_t state)
{
	for (int64_t p = page; p < page + count; p++) {
		r->tally[r->state[p]]--;
		r->state[p] = state;
	}
	r->tally[state] += count;
}

/* Pages of a restore's run installed (their entries loaded into the bounce buffer
 * first), or a UFC_LEFT_* or -errno. A run that crosses into another mapping of the
 * region (mlock, mprotect or a madvise split it) is refused whole (ENOENT), as if its
 * range were gone: its page alone then. */
static int64_t restore(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *r,
		       const struct ufc_plan *p, uint64_t addr, struct ufc_fault_call *call)
{
	int64_t count = p->count, loaded = 0;
	while (loaded < count && ufc_load_entry(pool, r->entry[p->page + loaded],
					    call->bounce + loaded * UFC_PAGE_SIZE) == 0)
		loaded++;
	if (loaded == 0)
		return -EBADMSG;   /* the books name an entry the pool does not hold */
	int64_t done = install(uffd, addr, call->bounce, loaded, p->wp);
	if (done == -SPLIT)
		done = install(uffd, addr, call->bounce, 1, p->wp);
	return done;
}

/* Apply a plan: UFC_FAULT_DONE once the fault is served, else why not (UFC_LEFT_*) or a
 * failed ioctl's -errno. */
static int apply(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *const *regions,
		 uint64_t address, const struct ufc_plan *p, struct ufc_fault_call *call)
{
	uint64_t addr = address & ~(uint64_t)(UFC_PAGE_SIZE - 1);
	struct ufc_region_view *r = p->region >= 0 ? regions[p->region] : NULL;
	int64_t done = 0;   /* pages brought in */
	switch (p->action) {
	case UFC_FAULT_UNPROTECT: {
		int rc = unprotect(uffd, addr);
		if (rc)
			return rc;
		break;
	}
	case UFC_FAULT_ZEROS:
		done = install(uffd, addr, p->write ? zero_page : NULL, 1, 0);
		break;
	case UFC_FAULT_AGENT_ZEROS:
		done = install(uffd, addr, zero_page, 1, 1);
		break;
	case UFC_FAULT_RESTORE:
		done = restore(uffd, pool, r, p, addr, call);
		if (done > 0 && p->wp)
			book(r, p->page, done, p->state);
		else if (done >= 0 && !p->wp)
			/* written, even where the page was there already (EEXIST): a forked
			 * child's copy of a page protected in flight faults for the write with
			 * its books saying DEMOTED, and must not fault so for ever. The page
			 * there keeps its bytes; its entry is stale either way. */
			written(r, p->page, p->state, call);
		r->restored += done > 0 ? done : 0;
		break;
	case UFC_FAULT_UPGRADE: {
		int rc = unprotect(uffd, addr);   /* first: a refusal leaves the page whole */
		if (rc)
			return rc;
		written(r, p->page, p->state, call);
		break;
	}
	case UFC_FAULT_ZERO_FILL:
		/* a private zeroed page spares a write its copy-on-write */
		done = install(uffd, addr, p->write ? zero_page : NULL, 1, 0);
		if (done > 0 && p->count > 1) {   /* the rest only up to a page already there */
			int64_t more = install(uffd, addr + UFC_PAGE_SIZE, NULL, p->count - 1, 0);
			done += more > 0 ? more : 0;
		}
		if (done > 0) {
			book(r, p->page, done, UFC_STATE_NORMAL);
			r->zero_filled += done;
		}
		break;
	default:
		return p->action;   /* left to Python */
	}
	if (done < 0)
		return failed((int)-done);
	if (r) {
		if (p->window >= 0) {
			r->readahead[0] = p->window;
			r->readahead[1] = p->page + p->count;
		}
		if (p->action != UFC_FAULT_AGENT_ZEROS)
			r->referenced[p->page] = 1;
		if (p->action == UFC_FAULT_RESTORE || p->action == UFC_FAULT_ZERO_FILL)
			call->room -= done;
		if (r->faults++ == 0)
			call->touched[call->ntouched++] = p->region;
		if (r->limit >= 0 && resident(r) > r->limit)
			call->over = 1;
	}
	if (call->room < 0)
		call->over = 1;
	return UFC_FAULT_DONE;
}

/* The first address from addr on that a free among msgs covers; UINT64_MAX if none. The
 * kernel lets the thread behind a REMOVE or UNMAP event go on, and zap the range, as
 * soon as the event is read, and hands out faults before events: a page installed there
 * for a fault of the same read, before Python's books are told of the free, would
 * outlive it. */
static uint64_t first_freed(const struct uffd_msg *m, int n, uint64_t addr)
{
	uint64_t first = UINT64_MAX;
	for (int i = 0; i < n; i++) {
		if ((m[i].event != UFFD_EVENT_REMOVE && m[i].event != UFFD_EVENT_UNMAP) ||
		    m[i].arg.remove.end <= addr)
			continue;
		uint64_t at = m[i].arg.remove.start > addr ? m[i].arg.remove.start : addr;
		first = at < first ? at : first;
	}
	return first;
}

/* Serve the messages of one read; those left (events, and faults not served) move to
 * the front of msgs, in order, with their reasons in call->why: their count. */
static int serve_read(int uffd, const struct ufc_pool_view *pool,
		      struct ufc_region_view *const *regions, int nregions, struct uffd_msg *m,
		      int n, int32_t *why, struct ufc_fault_call *call)
{
	/* a fork or an mremap changes what the books mean: every fault after it */
	int reshaped = 0;
	for (int i = 0; i < n; i++)
		reshaped |= m[i].event == UFFD_EVENT_FORK || m[i].event == UFFD_EVENT_REMAP;
	int left = 0;
	for (int i = 0; i < n; i++) {
		int verdict;
		if (m[i].event != UFFD_EVENT_PAGEFAULT) {
			verdict = UFC_LEFT_EVENT;
		} else if (reshaped) {
			verdict = UFC_LEFT_AFTER_EVENTS;
		} else {
			uint64_t addr = m[i].arg.pagefault.address & ~(uint64_t)(UFC_PAGE_SIZE - 1);
			struct ufc_plan p;
			ufc_plan_fault(regions, nregions, addr, m[i].arg.pagefault.flags,
				       m[i].arg.pagefault.feat.ptid, first_freed(m, n, addr), call, &p);
			verdict = apply(uffd, pool, regions, addr, &p, call);
		}
		if (verdict == UFC_FAULT_DONE)
			continue;
		why[left] = verdict;
		if (left != i)
			m[left] = m[i];
		left++;
	}
	return left;
}

static void start(struct ufc_region_view *const *regions, int nregions, struct ufc_fault_call *call)
{
	call->room = INT64_MAX;   /* pages the client's own resident limit lets in */
	if (call->client_limit >= 0) {
		call->room = call->client_limit;
		for (int i = 0; i < nregions; i++)
			call->room -= resident(regions[i]);
	}
	call->ntouched = call->nreleased = call->over = call->drained = 0;
}

int ufc_serve_msgs(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *const *regions,
		   int nregions, void *msgs, int n, struct ufc_fault_call *call)
{
	if (n > call->max_faults)   /* released[] holds one entry a fault */
		return -EINVAL;
	start(regions, nregions, call);
	return serve_read(uffd, pool, regions, nregions, msgs, n, call->why, call);
}

int ufc_serve_faults(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *const *regions,
		     int nregions, void *msgs, int max_msgs, int64_t spin_ns,
		     struct ufc_fault_call *call)
{
	struct uffd_msg *m = msgs;
	int left = 0, seen = 0;
	int64_t idle_since = now_ns();
	start(regions, nregions, call);
	/* one read at a time, until one leaves an event: Python's books must hear of it
	 * before any later fault is served from them */
	while (!call->over) {
		int room = max_msgs - left < call->max_faults - seen ? max_msgs - left
								       : call->max_faults - seen;
		if (room <= 0)
			break;
		ssize_t got = read(uffd, m + left, (size_t)room * sizeof(*m));
		if (got < 0 && errno != EAGAIN)
			return left ? left : -errno;
		int n = got < 0 ? 0 : (int)(got / (ssize_t)sizeof(*m));
		if (n == 0) {
			if (now_ns() - idle_since >= spin_ns) {
				call->drained = 1;
				break;
			}
			continue;
		}
		seen += n;
		int before = left;
		left += serve_read(uffd, pool, regions, nregions, m + left, n, call->why + left, call);
		for (int i = before; i < left; i++)
			if (call->why[i] == UFC_LEFT_EVENT)
				return left;
		idle_since = now_ns();
	}
	return left;
}
