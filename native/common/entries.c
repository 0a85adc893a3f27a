/* A pool entry read back: the one decoder of the format pool.py writes. Python's loads
 * and the fault engine both come here, through the pool's view (ufc_pool_view). */
#include <string.h>

#include "ufcram_native.h"

/* The page of entry h into page; 0, or -1 when the view holds no such entry or it does
 * not decode to a whole page. */
int ufc_load_entry(const struct ufc_pool_view *pool, int64_t h, uint8_t *page)
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

/* The pages of n entries into consecutive pages of out: n, or -(i + 1) where entry i
 * failed (those before it are loaded). */
int64_t ufc_load_entries(const struct ufc_pool_view *pool, const int64_t *handles, int64_t n,
			 uint8_t *out)
{
	for (int64_t i = 0; i < n; i++)
		if (ufc_load_entry(pool, handles[i], out + i * UFC_PAGE_SIZE) < 0)
			return -(i + 1);
	return n;
}
