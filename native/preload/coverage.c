/* Coverage by mapping: the preload library's node manages every private anonymous
 * read-write mapping of the process, whatever allocator made it, found in /proc/self/maps. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent_internal.h"
#include "coverage.h"

/* Whether a mapping that starts at addr is registered with some uffd already: ours from
 * an earlier scan, the fork context a child inherited, or a Region of the program's own.
 * UFFDIO_CONTINUE resolves nothing on anonymous memory: it answers EINVAL where a uffd
 * is registered and ENOENT where none is, and changes no page either way. EAGAIN (the
 * mappings are changing) reads as registered: the next scan looks again. */
static int registered(int uffd, uint64_t addr)
{
	struct uffdio_continue probe = { .range = { addr, UFC_PAGE_SIZE } };
	return !(ioctl(uffd, UFFDIO_CONTINUE, &probe) < 0 && errno == ENOENT);
}

/* Register [start, end) with the uffd, then as a region of the node. */
int coverage_manage(struct coverage *c, uint64_t start, uint64_t end)
{
	uint64_t ioctls, rid;
	char why[256];
	int rc = ufc_uffd_register(c->link->uffd, start, end - start,
				   UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP, &ioctls);
	if (rc) {
		/* Asked again at the next scan: a refusal is as often a mapping changing
		 * under us (allocators unmap and map the same range again and again) as one
		 * the kernel will never take. Said once. */
		if (c->debug && !c->said_refused++)
			say("ufcram: a mapping stays plain memory (UFFDIO_REGISTER %#llx-%#llx: %s)\n",
			    (unsigned long long)start, (unsigned long long)end, strerrorname_np(-rc));
		return 0;
	}
	struct ufc_req_register reg = { start, end - start, UFC_PROTO_NO_LIMIT, c->write_budget };
	rc = ufc_link_request(c->link, UFC_PROTO_REGISTER, &reg, sizeof(reg), &rid, why,
			      sizeof(why));
	if (rc == -EPIPE || rc == -ECONNRESET)
		return rc;   /* the node is gone: the registration stays, its faults go loud */
	/* A refusal leaves it registered all the same: the handler serves its faults as
	 * memory outside its regions (plain memory), or covers it later as it faults. Not
	 * unregistered: the handler may hold pages of it already. */
	if (rc && c->debug)
		say("ufcram: the node did not take the mapping %#llx-%#llx: %s\n",
		    (unsigned long long)start, (unsigned long long)end, why);
	return !rc;
}

/* One line of /proc/self/maps: "start-end perms offset dev inode   path". */
struct mapping {
	uint64_t start, end, inode;
	char perms[5];
	const char *path;   /* within the line; "" for none */
	size_t path_len;
};

static const char *parse_line(const char *p, const char *stop, struct mapping *m)
{
	char *q;
	m->start = strtoull(p, &q, 16);
	m->end = strtoull(q + 1, &q, 16);
	memcpy(m->perms, q + 1, 4);
	m->perms[4] = 0;
	q += 6;
	strtoull(q, &q, 16);          /* offset */
	while (*q == ' ')
		q++;
	while (*q != ' ' && q < stop)   /* device */
		q++;
	m->inode = strtoull(q, &q, 10);
	while (*q == ' ')
		q++;
	const char *eol = memchr(q, '\n', (size_t)(stop - q));
	if (!eol)
		eol = stop;
	m->path = q;
	m->path_len = (size_t)(eol - q);
	return eol < stop ? eol + 1 : stop;
}

static int path_is(const struct mapping *m, const char *s)
{
	size_t n = strlen(s);
	return m->path_len == n && !memcmp(m->path, s, n);
}

/* A shared object's data, which its .bss follows: a private writable file mapping. Not
 * our own memory (/memfd:ufcram, private too), nor a mapping the program shares. */
static int is_data_segment(const struct mapping *m)
{
	static const char memfd[] = "/memfd:";
	return m->inode && !strcmp(m->perms, "rw-p") &&
	       !(m->path_len >= sizeof(memfd) - 1 && !memcmp(m->path, memfd, sizeof(memfd) - 1));
}

/* Private anonymous read-write memory: the heap, any allocator's arenas, anonymous
 * mmaps. Not the agent's own, the stack, the kernel's named areas, shared or file memory, reservations
 * (PROT_NONE) or read-only memory. Not a shared object's .bss either (anonymous memory
 * right after its file): libc's and the loader's own data are there, which our threads
 * use while they demote. The program's own .bss is its data and is managed. */
static int candidate(const struct coverage *c, const struct mapping *m,
		     const struct mapping *prev)
{
	if (strcmp(m->perms, "rw-p") || m->inode || (m->path_len && !path_is(m, "[heap]")))
		return 0;
	if (m->end - m->start < c->threshold)
		return 0;
	if (prev && prev->end == m->start && is_data_segment(prev) && !path_is(prev, c->exe))
		return 0;
	return !agent_area(m->start, m->end);   /* the agent's MOVE area (move.c) */
}

static ssize_t read_maps(struct coverage *c)
{
	int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	size_t n = 0;
	for (;;) {
		if (c->cap - n < 4096) {
			size_t cap = c->cap ? 2 * c->cap : 64 << 10;
			char *buf = mem_resize(c->buf, c->cap, cap);
			if (!buf) {
				close(fd);
				return -ENOMEM;
			}
			c->buf = buf;
			c->cap = cap;
		}
		ssize_t got = read(fd, c->buf + n, c->cap - n);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0) {
			close(fd);
			return got < 0 ? -errno : (ssize_t)n;
		}
		n += (size_t)got;
	}
}

int coverage_scan(struct coverage *c)
{
	ssize_t n = read_maps(c);
	if (n < 0)
		return (int)n;
	const char *p = c->buf, *stop = c->buf + n;
	struct mapping m, prev;
	int have_prev = 0, added = 0;
	while (p < stop) {
		p = parse_line(p, stop, &m);
		if (candidate(c, &m, have_prev ? &prev : NULL) &&
		    !registered(c->link->uffd, m.start)) {
			int rc = coverage_manage(c, m.start, m.end);
			if (rc < 0)
				return rc;
			added += rc;
		}
		prev = m;
		have_prev = 1;
	}
	return added;
}

int coverage_init(struct coverage *c, struct ufc_link *link, uint64_t threshold,
		  int64_t write_budget, int debug)
{
	*c = (struct coverage){ .link = link, .threshold = threshold ? threshold : 1,
				.write_budget = write_budget, .debug = debug };
	ssize_t n = readlink("/proc/self/exe", c->exe, sizeof(c->exe) - 1);
	c->exe[n > 0 ? n : 0] = 0;
	return 0;
}
