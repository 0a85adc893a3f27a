/* Coverage by mapping (coverage.c): which of the process's mappings its node manages.
 * Internal to the preload library, like nodelink.h. */
#ifndef UFCRAM_COVERAGE_H
#define UFCRAM_COVERAGE_H

#include <limits.h>
#include <stdint.h>

#include "agent_internal.h"
#include "nodelink.h"

struct coverage {
	struct ufc_link *link;
	uint64_t threshold;     /* smallest mapping managed, bytes */
	int64_t write_budget;   /* of each region: pages, or -1 for auto */
	int debug;
	char exe[PATH_MAX];     /* the program's own file: its .bss is managed */
	char *buf;              /* /proc/self/maps, in our own memory */
	size_t cap;
	unsigned said_refused;  /* a refused registration was said (debug) */
};

UFC_HIDDEN int coverage_init(struct coverage *c, struct ufc_link *link, uint64_t threshold,
			     int64_t write_budget, int debug);
/* Registers every mapping not managed yet: how many, or -errno once the node is gone. */
UFC_HIDDEN int coverage_scan(struct coverage *c);
/* Registers one mapping known to be private anonymous memory: 1, 0 (refused: it stays
 * plain memory) or -errno once the node is gone. */
UFC_HIDDEN int coverage_manage(struct coverage *c, uint64_t start, uint64_t end);

#endif
