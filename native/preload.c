/* The LD_PRELOAD library behind `ufcram run`: an unmodified program's large private
 * allocations become regions of a ufcram node; all other memory passes through to libc. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "agent_internal.h"
#include "nodelink.h"
#include "ufcram_native.h"

#define EXPORT __attribute__((visibility("default")))
#define NO_LIMIT UINT64_MAX
#define AUTO_BUDGET (-1)

/* glibc's own allocator, reachable without dlsym (which itself allocates) */
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

enum { UNSET, READY, PLAIN }; /* PLAIN: cannot manage; every allocation is libc's */

/* set while this thread joins the node: what joining allocates is always libc's */
static __thread int joining;

/* A managed allocation: what the program was given (user), the mapping behind it
 * (base, len, registered with the uffd) and the node's region id. Few and large, so
 * an open-addressing table keyed by user pointer does. */
struct block {
	uintptr_t user, base;
	size_t len;
	uint32_t rid;
};

static struct {
	pthread_mutex_t lock; /* the table, and the state's one-time change */
	int state;
	int forked_child;   /* the link's socket is the parent's: never use it here */
	size_t threshold;   /* bytes; larger allocations are managed */
	uint64_t resident_limit;
	int64_t write_budget;
	struct ufc_link link;
	struct block *table;
	size_t capacity, count;
	size_t (*libc_usable_size)(void *);
} pl = { .lock = PTHREAD_MUTEX_INITIALIZER, .state = UNSET, .threshold = 1 << 20 };

static void debug(const char *fmt, ...)
{
	static int said;
	const char *on = getenv("UFCRAM_DEBUG");
	if (!on || !*on || !strcmp(on, "0") || __atomic_exchange_n(&said, 1, __ATOMIC_RELAXED))
		return;
	va_list ap;
	va_start(ap, fmt);
	vsay(fmt, ap);
	va_end(ap);
}

static uint64_t env_u64(const char *name, uint64_t fallback)
{
	const char *v = getenv(name);
	if (!v || !*v)
		return fallback;
	char *end;
	errno = 0;
	unsigned long long x = strtoull(v, &end, 10);
	return errno || *end ? fallback : x;
}

static size_t page_up(size_t n)
{
	return (n + UFC_PAGE_SIZE - 1) & ~(size_t)(UFC_PAGE_SIZE - 1);
}

/* --- the table of managed blocks (callers hold pl.lock) ---------------------------- */
static size_t slot_of(uintptr_t user)
{
	size_t i = (user / UFC_PAGE_SIZE) * 0x9E3779B97F4A7C15ull & (pl.capacity - 1);
	while (pl.table[i].user && pl.table[i].user != user)
		i = (i + 1) & (pl.capacity - 1);
	return i;
}

static int table_grow(void)
{
	size_t old_cap = pl.capacity, cap = old_cap ? old_cap * 2 : 256;
	struct block *old = pl.table, *fresh = __libc_calloc(cap, sizeof(*fresh));
	if (!fresh)
		return -ENOMEM;
	pl.table = fresh;
	pl.capacity = cap;
	for (size_t i = 0; i < old_cap; i++)
		if (old[i].user)
			pl.table[slot_of(old[i].user)] = old[i];
	__libc_free(old);
	return 0;
}

static int table_put(struct block b)
{
	if (2 * (pl.count + 1) > pl.capacity && table_grow())
		return -ENOMEM;
	pl.table[slot_of(b.user)] = b;
	pl.count++;
	return 0;
}

static int table_take(uintptr_t user, struct block *out)
{
	if (!pl.capacity)
		return 0;
	size_t i = slot_of(user);
	if (!pl.table[i].user)
		return 0;
	*out = pl.table[i];
	pl.table[i].user = 0;
	pl.count--;
	/* re-place the rest of the cluster so that lookups never stop at the hole */
	for (size_t j = (i + 1) & (pl.capacity - 1); pl.table[j].user;
	     j = (j + 1) & (pl.capacity - 1)) {
		struct block b = pl.table[j];
		pl.table[j].user = 0;
		pl.table[slot_of(b.user)] = b;
	}
	return 1;
}

/* A managed block overlapping [start, end), for munmap and mremap of managed memory. */
static int table_take_overlap(uintptr_t start, uintptr_t end, struct block *out)
{
	for (size_t i = 0; i < pl.capacity; i++) {
		struct block *b = &pl.table[i];
		if (b->user && b->base < end && start < b->base + b->len)
			return table_take(b->user, out);
	}
	return 0;
}

static int is_ours(const void *p, struct block *out, int take)
{
	/* managed pointers are page-aligned: most pointers are rejected without the lock */
	if (!p || ((uintptr_t)p & (UFC_PAGE_SIZE - 1)) ||
	    !__atomic_load_n(&pl.count, __ATOMIC_RELAXED))
		return 0;
	pthread_mutex_lock(&pl.lock);
	int found = 0;
	if (take) {
		found = table_take((uintptr_t)p, out);
	} else if (pl.capacity) {
		struct block *b = &pl.table[slot_of((uintptr_t)p)];
		found = b->user != 0;
		if (found)
			*out = *b;
	}
	pthread_mutex_unlock(&pl.lock);
	return found;
}

/* --- joining the node ----------------------------------------------------------- */
static void after_fork_in_child(void)
{
	pthread_mutex_init(&pl.lock, NULL);
	pthread_mutex_init(&pl.link.lock, NULL);
	pl.forked_child = 1;
}

static void before_fork(void)
{
	pthread_mutex_lock(&pl.lock);
}

static void after_fork_in_parent(void)
{
	pthread_mutex_unlock(&pl.lock);
}

static void set_limits(void)
{
	char why[256];
	uint64_t limit = pl.resident_limit;
	int rc = ufc_link_request(&pl.link, UFC_PROTO_LIMITS, &limit, sizeof(limit), NULL, why,
				  sizeof(why));
	if (rc)
		debug("ufcram: resident limit not set: %s\n", why);
}

/* Called with pl.lock held, once: join the node named by UFCRAM_NODE, or stay plain.
 * Lazily, at the first large allocation: most processes a shell starts never make one. */
static int join_node(void)
{
	const char *path = getenv("UFCRAM_NODE");
	if (!path || !*path) {
		debug("ufcram: UFCRAM_NODE is not set; this program runs on plain memory\n");
		return PLAIN;
	}
	pl.resident_limit = env_u64("UFCRAM_RESIDENT_LIMIT", NO_LIMIT);
	const char *budget = getenv("UFCRAM_WRITE_BUDGET");
	pl.write_budget = !budget || !*budget || !strcmp(budget, "auto")
				  ? AUTO_BUDGET
				  : (int64_t)env_u64("UFCRAM_WRITE_BUDGET", 0);
	char why[256];
	if (ufc_link_open(&pl.link, path, env_u64("UFCRAM_STAGING_PAGES", 256),
			  (int)env_u64("UFCRAM_USER_MODE_ONLY", 0), why, sizeof(why))) {
		debug("ufcram: cannot join the node (%s); this program runs on plain memory\n",
		      why);
		return PLAIN;
	}
	pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
	if (pl.resident_limit != NO_LIMIT)
		set_limits();
	return READY;
}

/* Whether an allocation of size bytes goes to the node. */
static int ready(size_t size)
{
	if (size <= pl.threshold || joining || pl.forked_child)
		return 0;
	if (__atomic_load_n(&pl.state, __ATOMIC_ACQUIRE) == UNSET) {
		pthread_mutex_lock(&pl.lock);
		if (pl.state == UNSET) {
			joining = 1;
			__atomic_store_n(&pl.state, join_node(), __ATOMIC_RELEASE);
			joining = 0;
		}
		pthread_mutex_unlock(&pl.lock);
	}
	return pl.state == READY;
}

/* Constructors of libraries preloaded after us may allocate before this runs: the
 * static default threshold covers them. */
__attribute__((constructor)) static void read_settings(void)
{
	pl.threshold = env_u64("UFCRAM_THRESHOLD", 1 << 20);
	pl.libc_usable_size = (size_t(*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
}

/* --- managed memory ------------------------------------------------------------- */
static void *raw_mmap(size_t len)
{
	return (void *)syscall(SYS_mmap, NULL, len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

/* A new region of at least size bytes aligned to align, or NULL (the caller then
 * falls back to libc): nothing the node refuses ever fails the program. */
static void *managed_alloc(size_t size, size_t align)
{
	size_t extra = align > UFC_PAGE_SIZE ? align : 0;
	if (size > SIZE_MAX / 2 || !ready(size))
		return NULL;
	size_t len = page_up(size + extra);
	void *base = raw_mmap(len);
	if (base == MAP_FAILED)
		return NULL;
	uintptr_t b = (uintptr_t)base;
	madvise(base, len, MADV_NOHUGEPAGE); /* huge pages defeat page-sized demotion */
	uint64_t ioctls;
	char why[256];
	int rc = ufc_uffd_register(pl.link.uffd, b, len,
				   UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP, &ioctls);
	uint64_t rid = 0;
	if (rc) {
		snprintf(why, sizeof(why), "UFFDIO_REGISTER: %s", strerror(-rc));
	} else {
		struct __attribute__((packed)) {
			uint64_t start, length, limit;
			int64_t budget;
		} reg = { b, len, NO_LIMIT, pl.write_budget };
		rc = ufc_link_request(&pl.link, UFC_PROTO_REGISTER, &reg, sizeof(reg), &rid, why,
				      sizeof(why));
		if (rc)
			ufc_uffd_unregister(pl.link.uffd, b, len);
	}
	struct block blk = { extra ? (b + extra - 1) & ~(uintptr_t)(align - 1) : b, b, len,
			     (uint32_t)rid };
	if (!rc) {
		pthread_mutex_lock(&pl.lock);
		rc = table_put(blk);
		pthread_mutex_unlock(&pl.lock);
	}
	if (rc) {
		debug("ufcram: a %zu-byte allocation falls back to plain memory: %s\n", size,
		      why);
		syscall(SYS_munmap, base, len);
		return NULL;
	}
	return (void *)blk.user;
}

/* Let the node forget the region (restoring its pages first if the memory lives on),
 * then give up the registration. A forked child's node learns it all from events. */
static void managed_release(const struct block *b, int restore)
{
	if (pl.forked_child)
		return;
	struct __attribute__((packed)) {
		uint32_t rid;
		uint8_t restore;
	} unreg = { b->rid, (uint8_t)restore };
	char why[256];
	if (ufc_link_request(&pl.link, UFC_PROTO_UNREGISTER, &unreg, sizeof(unreg), NULL, why,
			     sizeof(why))) {
		/* Its pages were not restored (the handler may be gone): unregistering would
		 * turn the demoted ones into zeros. Registered, they fault loudly instead. */
		debug("ufcram: releasing a region: %s\n", why);
		return;
	}
	if (restore)
		ufc_uffd_unregister(pl.link.uffd, b->base, b->len);
}

static size_t usable(const struct block *b)
{
	return b->len - (b->user - b->base);
}

/* --- the intercepted allocator ---------------------------------------------------- */
EXPORT void *malloc(size_t size)
{
	void *p = managed_alloc(size, 0);
	return p ? p : __libc_malloc(size);
}

EXPORT void *calloc(size_t n, size_t size)
{
	if (size && n > SIZE_MAX / size) {
		errno = ENOMEM;
		return NULL;
	}
	void *p = managed_alloc(n * size, 0); /* fresh anonymous memory reads as zeros */
	return p ? p : __libc_calloc(n, size);
}

EXPORT void free(void *p)
{
	struct block b;
	if (!is_ours(p, &b, 1)) {
		__libc_free(p);
		return;
	}
	managed_release(&b, 0);
	syscall(SYS_munmap, b.base, b.len);
}

static void *move_block(void *p, size_t old_size, size_t size)
{
	void *q = malloc(size);
	if (q) {
		memcpy(q, p, old_size < size ? old_size : size);
		free(p);
	}
	return q;
}

EXPORT void *realloc(void *p, size_t size)
{
	struct block b;
	if (is_ours(p, &b, 0)) {
		if (size == 0) {
			free(p);
			return NULL;
		}
		return size <= usable(&b) ? p : move_block(p, usable(&b), size);
	}
	/* a libc block growing past the threshold moves onto the node */
	if (p && ready(size) && pl.libc_usable_size)
		return move_block(p, pl.libc_usable_size(p), size);
	return __libc_realloc(p, size);
}

static void *aligned(size_t align, size_t size)
{
	void *p = managed_alloc(size, align);
	return p ? p : __libc_memalign(align, size);
}

EXPORT int posix_memalign(void **out, size_t align, size_t size)
{
	if (!align || (align & (align - 1)) || align % sizeof(void *))
		return EINVAL;
	void *p = aligned(align, size);
	if (!p)
		return ENOMEM;
	*out = p;
	return 0;
}

EXPORT void *aligned_alloc(size_t align, size_t size)
{
	return aligned(align, size);
}

EXPORT void *memalign(size_t align, size_t size)
{
	return aligned(align, size);
}

EXPORT void *valloc(size_t size)
{
	return aligned(UFC_PAGE_SIZE, size);
}

EXPORT void *pvalloc(size_t size)
{
	return aligned(UFC_PAGE_SIZE, page_up(size));
}

EXPORT size_t malloc_usable_size(void *p)
{
	struct block b;
	if (is_ours(p, &b, 0))
		return usable(&b);
	return pl.libc_usable_size ? pl.libc_usable_size(p) : 0;
}

/* --- the intercepted mapping calls ---------------------------------------------------- */
EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	/* private, anonymous, read-write, placed by the kernel: plain heap memory by
	 * another name. Reservations (PROT_NONE), fixed, shared, file and huge-page
	 * mappings keep their own semantics. */
	int plain = MAP_PRIVATE | MAP_ANONYMOUS;
	if (!addr && prot == (PROT_READ | PROT_WRITE) && (flags & ~MAP_NORESERVE) == plain) {
		void *p = managed_alloc(len, 0);
		if (p)
			return p;
	}
	return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

/* Unmapping part of a managed region, or moving it: the node gives its pages back and
 * the region becomes plain memory first, so partial unmaps and mremap work as always.
 * A whole region unmapped needs nothing back: its memory is gone. */
static void release_overlap(void *addr, size_t len, int keeps_data)
{
	if (!__atomic_load_n(&pl.count, __ATOMIC_RELAXED))
		return;
	struct block b;
	uintptr_t start = (uintptr_t)addr;
	for (;;) {
		pthread_mutex_lock(&pl.lock);
		int found = table_take_overlap(start, start + len, &b);
		pthread_mutex_unlock(&pl.lock);
		if (!found)
			return;
		int whole = b.base >= start && b.base + b.len <= start + len;
		managed_release(&b, keeps_data || !whole);
	}
}

EXPORT int munmap(void *addr, size_t len)
{
	release_overlap(addr, len, 0);
	return (int)syscall(SYS_munmap, addr, len);
}

EXPORT void *mremap(void *old, size_t old_len, size_t new_len, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	void *new_addr = flags & MREMAP_FIXED ? va_arg(ap, void *) : NULL;
	va_end(ap);
	release_overlap(old, old_len, 1);
	return (void *)syscall(SYS_mremap, old, old_len, new_len, flags, new_addr);
}
