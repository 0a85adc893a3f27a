/* Demotion by UFFDIO_MOVE: the agent moves runs of the application's pages into an area
 * of its own, then copies them into the staging buffer. Nothing is write-protected and
 * no REMOVE event is sent (the area's uffd asks for none), so every REMOVE the handler
 * reads is the application's own free, and nothing waits on a round trip per run. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "agent_internal.h"

#define PM_PRESENT (1ull << 63)
#define PM_SWAPPED (1ull << 62)
#define PAGEMAP_CHUNK 512   /* pages of pagemap read at once */
#define AREAS 16            /* agents of one process whose areas coverage leaves alone */

/* The areas of this process's agents: private anonymous memory the preload library's
 * coverage must not register (it is registered on the agent's own uffd). */
static struct { uint64_t start, end; } areas[AREAS];

int agent_area(uint64_t start, uint64_t end)
{
	for (int i = 0; i < AREAS; i++) {
		uint64_t s = __atomic_load_n(&areas[i].start, __ATOMIC_ACQUIRE);
		if (s && s < end && start < __atomic_load_n(&areas[i].end, __ATOMIC_ACQUIRE))
			return 1;
	}
	return 0;
}

static void area_listed(uint64_t start, uint64_t end, int listed)
{
	for (int i = 0; i < AREAS; i++) {
		uint64_t want = listed ? 0 : start;
		if (__atomic_load_n(&areas[i].start, __ATOMIC_ACQUIRE) != want)
			continue;
		if (listed) {
			__atomic_store_n(&areas[i].end, end, __ATOMIC_RELEASE);
			if (__atomic_compare_exchange_n(&areas[i].start, &want, start, 0,
							__ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
				return;
		} else {
			__atomic_store_n(&areas[i].start, 0, __ATOMIC_RELEASE);
			return;
		}
	}
}

/* Where the kernel cannot move pages (before Linux 6.8, or no uffd for us), the agent
 * has no area and MOVE commands are refused: the handler demotes by copy. */
void move_open(struct agent *a)
{
	int fd = ufc_uffd_open_syscall(0);
	if (fd < 0)
		fd = ufc_uffd_open_dev(0);
	uint64_t features = 0, ioctls = 0;
	if (fd < 0 || ufc_uffd_api(fd, UFFD_FEATURE_MOVE, &features, &ioctls) < 0 ||
	    !(features & UFFD_FEATURE_MOVE))
		goto fail;
	/* straight from the kernel, as all our memory; private anonymous, as MOVE needs */
	void *area = (void *)syscall(SYS_mmap, NULL, a->staging_len, PROT_READ | PROT_WRITE,
				     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (area == MAP_FAILED)
		goto fail;
	a->move_area = (uint64_t)(uintptr_t)area;
	area_listed(a->move_area, a->move_area + a->staging_len, 1);
	a->pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (a->pagemap < 0 ||
	    ufc_uffd_register(fd, a->move_area, a->staging_len, UFFDIO_REGISTER_MODE_MISSING,
			      &ioctls) < 0)
		goto fail;
	a->move_uffd = fd;
	return;
fail:
	if (fd >= 0)
		close(fd);
	move_close(a);
}

void move_close(struct agent *a)
{
	if (a->move_uffd >= 0)
		close(a->move_uffd);
	if (a->pagemap >= 0)
		close(a->pagemap);
	if (a->move_area) {
		area_listed(a->move_area, 0, 0);
		syscall(SYS_munmap, a->move_area, a->staging_len);
	}
	a->move_uffd = a->pagemap = -1;
	a->move_area = 0;
}

static void stays(uint8_t *stayed, uint64_t page)
{
	stayed[page / 8] |= (uint8_t)(1u << (page % 8));
}

/* Whether [addr, addr + len) is one registered mapping. MOVE needs no registration of
 * its source: without this, a range the handler's books hold by mistake would be taken
 * from under the memory that owns it. The probe is UFFDIO_CONTINUE, which resolves
 * nothing on anonymous memory: EINVAL where the range is registered, ENOENT where it is
 * not. (A MOVE the other way would also say whose uffd it is, but it meets EAGAIN far
 * more often while the application frees memory: seconds per batch, measured.) */
static int registered(struct agent *a, uint64_t addr, uint64_t len)
{
	int rc;
	for (int tries = 0; tries < 20000; tries++) {
		struct uffdio_continue c = { .range = { addr, len } };
		rc = ioctl(a->uffd, UFFDIO_CONTINUE, &c) < 0 ? -errno : 0;
		if (rc != -EAGAIN)   /* EAGAIN: an event is unread; the handler reads it */
			break;
		usleep(50);
	}
	return rc == -EINVAL;
}

/* Move one run into the area at dst; a page that cannot move stays where it is and is
 * marked in stayed (from page index first on): shared after fork, merged by KSM or
 * pinned (EBUSY), locked or in a mapping that changed (EINVAL, ENOENT). Holes (pages
 * freed meanwhile) are skipped: the handler has their REMOVE events. */
static void move_run(struct agent *a, uint64_t src, uint64_t len, uint64_t dst,
		     uint64_t first, uint8_t *stayed)
{
	uint64_t done_len = 0;
	int retries = 0;
	while (done_len < len) {
		int64_t moved = 0;
		int rc = handler_gone(a) ? -EPIPE
					 : ufc_uffd_move(a->move_uffd, dst + done_len, src + done_len,
							 len - done_len,
							 UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES, &moved);
		if (rc == 0)
			return;
		if (moved > 0) {
			done_len += (uint64_t)moved;
			continue;
		}
		if (rc == -EAGAIN && retries++ < 1000) {   /* a page being split or locked */
			sched_yield();
			continue;
		}
		stays(stayed, first + done_len / UFC_PAGE_SIZE);
		done_len += UFC_PAGE_SIZE;
		retries = 0;
	}
}

/* Copy the moved pages from the area into staging: present or swapped pages are there
 * (a read brings a swapped one in); neither is a hole, staged as zeros (the page was
 * freed: its copy is dropped). Never read a hole: the area's uffd would hold the read
 * for ever. */
static int stage(struct agent *a, uint64_t npages, uint64_t staging, const uint8_t *stayed)
{
	uint64_t pm[PAGEMAP_CHUNK];
	for (uint64_t at = 0; at < npages; at += PAGEMAP_CHUNK) {
		uint64_t n = npages - at < PAGEMAP_CHUNK ? npages - at : PAGEMAP_CHUNK;
		off_t where = (off_t)((a->move_area / UFC_PAGE_SIZE + at) * sizeof(uint64_t));
		if (pread(a->pagemap, pm, n * sizeof(uint64_t), where) != (ssize_t)(n * sizeof(uint64_t)))
			return -EIO;
		for (uint64_t i = 0; i < n; i++) {
			uint64_t p = at + i;
			void *to = (void *)(uintptr_t)(staging + p * UFC_PAGE_SIZE);
			if (stayed[p / 8] >> (p % 8) & 1)
				continue;
			if (pm[i] & (PM_PRESENT | PM_SWAPPED))
				memcpy(to, (void *)(uintptr_t)(a->move_area + p * UFC_PAGE_SIZE),
				       UFC_PAGE_SIZE);
			else
				memset(to, 0, UFC_PAGE_SIZE);
		}
	}
	return 0;
}

/* The pages could not be staged: they go back where they were (holes stay holes), and
 * all stayed. Through our own descriptor of the application's uffd, which their
 * mapping is registered with, as MOVE's destination must be. */
static void move_back(struct agent *a, const struct ufc_run *runs, uint32_t nruns,
		      uint8_t *stayed)
{
	uint64_t off = 0;
	for (uint32_t i = 0; i < nruns; i++) {
		int64_t moved;
		ufc_uffd_move(a->uffd, runs[i].addr, a->move_area + off, runs[i].len,
			      UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES, &moved);
		off += runs[i].len;
	}
	memset(stayed, 0xff, UFC_AGENT_MOVE_MAX_PAGES / 8);
}

/* The pages that stayed leave the dropped set: they were never taken. */
static void end_move(struct agent *a, const struct ufc_run *runs, uint32_t nruns,
		     const uint8_t *stayed)
{
	pthread_mutex_lock(&a->lock);
	uint64_t page = 0;
	for (uint32_t i = 0; i < nruns; i++)
		for (uint64_t at = runs[i].addr; at < runs[i].addr + runs[i].len;
		     at += UFC_PAGE_SIZE, page++)
			if (stayed[page / 8] >> (page % 8) & 1)
				spans_remove(&a->dropped, at, at + UFC_PAGE_SIZE);
	pthread_mutex_unlock(&a->lock);
	end_drop(a);
}

int move_out(struct agent *a, const struct ufc_run *runs, uint32_t nruns, uint64_t staging,
	     uint64_t staging_len, uint64_t *bytes, uint8_t *stayed)
{
	uint64_t total;
	*bytes = 0;
	if (a->move_uffd < 0)
		return -EOPNOTSUPP;
	int rc = runs_fit(runs, nruns, staging_len < a->staging_len ? staging_len : a->staging_len,
			  &total);
	if (rc)
		return rc;
	uint64_t npages = total / UFC_PAGE_SIZE;
	if (npages > UFC_AGENT_MOVE_MAX_PAGES || nruns > UFC_AGENT_MAX_RUNS)
		return -E2BIG;
	/* in the dropped set before they go, as a drop's: should the handler die, a moved
	 * page faults SIGBUS, never zeros */
	rc = begin_drop(a, runs, nruns);
	if (rc)
		return rc;
	uint64_t off = 0;
	for (uint32_t i = 0; i < nruns; i++) {
		if (registered(a, runs[i].addr, runs[i].len))
			move_run(a, runs[i].addr, runs[i].len, a->move_area + off,
				 off / UFC_PAGE_SIZE, stayed);
		else
			for (uint64_t p = 0; p < runs[i].len / UFC_PAGE_SIZE; p++)
				stays(stayed, off / UFC_PAGE_SIZE + p);
		off += runs[i].len;
	}
	end_move(a, runs, nruns, stayed);
	if (stage(a, npages, staging, stayed) < 0)
		move_back(a, runs, nruns, stayed);
	/* emptied for the next command; its uffd sends no REMOVE event */
	ufc_madvise(a->move_area, total, MADV_DONTNEED);
	*bytes = total;
	return 0;
}

/* Clean pages (the node keeps their entries) moved out and thrown away: a drop without
 * its REMOVE event and round trip. The area is emptied each time it fills, so a command
 * may be larger than it. */
int move_discard(struct agent *a, const struct ufc_run *runs, uint32_t nruns, uint64_t *bytes,
		 uint8_t *stayed)
{
	uint64_t total, fill = 0, page = 0;
	*bytes = 0;
	if (a->move_uffd < 0)
		return -EOPNOTSUPP;
	int rc = runs_fit(runs, nruns, UINT64_MAX, &total);
	if (rc)
		return rc;
	if (total / UFC_PAGE_SIZE > UFC_AGENT_MOVE_MAX_PAGES || nruns > UFC_AGENT_MAX_RUNS)
		return -E2BIG;
	rc = begin_drop(a, runs, nruns);
	if (rc)
		return rc;
	for (uint32_t i = 0; i < nruns; i++) {
		for (uint64_t done = 0; done < runs[i].len;) {
			if (fill == a->staging_len) {
				ufc_madvise(a->move_area, fill, MADV_DONTNEED);
				fill = 0;
			}
			uint64_t len = runs[i].len - done < a->staging_len - fill
					       ? runs[i].len - done : a->staging_len - fill;
			uint64_t first = page + done / UFC_PAGE_SIZE;
			if (registered(a, runs[i].addr + done, len))
				move_run(a, runs[i].addr + done, len, a->move_area + fill, first,
					 stayed);
			else
				for (uint64_t p = 0; p < len / UFC_PAGE_SIZE; p++)
					stays(stayed, first + p);
			done += len;
			fill += len;
		}
		page += runs[i].len / UFC_PAGE_SIZE;
	}
	end_move(a, runs, nruns, stayed);
	ufc_madvise(a->move_area, fill, MADV_DONTNEED);
	*bytes = total;
	return 0;
}
