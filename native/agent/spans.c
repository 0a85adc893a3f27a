/* The set of pages the agent dropped on command, as sorted address ranges: what the
 * fallback poisons once the handler, and the pool that held those pages, are gone. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "agent_internal.h"

static int spans_reserve(struct spans *s, size_t more)
{
	if (s->n + more <= s->cap)
		return 0;
	size_t cap = s->cap ? s->cap : UFC_PAGE_SIZE / sizeof(struct span);
	while (cap < s->n + more)
		cap *= 2;
	struct span *v = mem_resize(s->v, s->cap * sizeof(*v), cap * sizeof(*v));
	if (!v)
		return -ENOMEM;
	s->v = v;
	s->cap = cap;
	return 0;
}

void spans_free(struct spans *s)
{
	mem_free(s->v, s->cap * sizeof(*s->v));
	*s = (struct spans){ 0 };
}

/* the first span that ends after addr */
static size_t spans_find(const struct spans *s, uint64_t addr)
{
	size_t lo = 0, hi = s->n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (s->v[mid].end <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

int spans_has(const struct spans *s, uint64_t addr)
{
	size_t i = spans_find(s, addr);
	return i < s->n && s->v[i].start <= addr;
}

/* Adds k spans sorted by start in O(n + k): a merge from the back (it never overwrites
 * a span not yet read), then one pass that joins what overlaps or touches. */
int spans_add(struct spans *s, const struct span *add, size_t k)
{
	if (spans_reserve(s, k))
		return -ENOMEM;
	size_t i = s->n, j = k, out = s->n + k, n = s->n + k;
	while (j) {
		if (i && s->v[i - 1].start > add[j - 1].start)
			s->v[--out] = s->v[--i];
		else
			s->v[--out] = add[--j];
	}
	size_t w = i ? i - 1 : 0;   /* the spans before it were not moved */
	for (size_t r = w + 1; r < n; r++) {
		if (s->v[r].start > s->v[w].end)
			s->v[++w] = s->v[r];
		else if (s->v[r].end > s->v[w].end)
			s->v[w].end = s->v[r].end;
	}
	s->n = n ? w + 1 : 0;
	return 0;
}

/* Appends a span that starts at or after every other one. */
int spans_push(struct spans *s, uint64_t start, uint64_t end)
{
	if (s->n && s->v[s->n - 1].end == start) {
		s->v[s->n - 1].end = end;
		return 0;
	}
	if (spans_reserve(s, 1))
		return -ENOMEM;
	s->v[s->n++] = (struct span){ start, end };
	return 0;
}

/* Only a split needs memory; without it the span stays whole, and a page wrongly kept
 * raises SIGBUS: loud, never zeros. */
void spans_remove(struct spans *s, uint64_t start, uint64_t end)
{
	size_t i = spans_find(s, start);
	if (start >= end || i == s->n)
		return;
	if (s->v[i].start < start && s->v[i].end > end) {
		if (spans_reserve(s, 1))
			return;
		memmove(&s->v[i + 2], &s->v[i + 1], (s->n - i - 1) * sizeof(*s->v));
		s->v[i + 1] = (struct span){ end, s->v[i].end };
		s->v[i].end = start;
		s->n++;
		return;
	}
	if (s->v[i].start < start)
		s->v[i++].end = start;
	size_t j = i;
	while (j < s->n && s->v[j].end <= end)
		j++;
	if (j < s->n && s->v[j].start < end)
		s->v[j].start = end;
	memmove(&s->v[i], &s->v[j], (s->n - j) * sizeof(*s->v));
	s->n -= j - i;
}

/* mremap moved [from, from + len) to `to`, over whatever was there */
int spans_move(struct spans *s, uint64_t from, uint64_t to, uint64_t len)
{
	struct spans moved = { 0 };
	int rc = 0;
	for (size_t i = spans_find(s, from); !rc && i < s->n && s->v[i].start < from + len; i++) {
		uint64_t a = s->v[i].start > from ? s->v[i].start : from;
		uint64_t b = s->v[i].end < from + len ? s->v[i].end : from + len;
		rc = spans_push(&moved, a - from + to, b - from + to);
	}
	if (!rc) {
		spans_remove(s, from, from + len);
		spans_remove(s, to, to + len);
		rc = spans_add(s, moved.v, moved.n);
	}
	spans_free(&moved);
	return rc;
}

int spans_copy(struct spans *dst, const struct spans *src)
{
	*dst = (struct spans){ 0 };
	if (spans_reserve(dst, src->n))
		return -ENOMEM;
	if (src->n)
		memcpy(dst->v, src->v, src->n * sizeof(*src->v));
	dst->n = src->n;
	return 0;
}

/* Insertion sort by start: the handler sends runs in address order, so this is one pass.
 * Not qsort, which may take its buffer from malloc: the heap is memory the node holds,
 * possibly pages of the very batch being demoted. */
void spans_sort(struct span *v, size_t n)
{
	for (size_t i = 1; i < n; i++) {
		struct span x = v[i];
		size_t j = i;
		for (; j > 0 && v[j - 1].start > x.start; j--)
			v[j] = v[j - 1];
		v[j] = x;
	}
}
