/* What the fault engine's two files share (plan.c decides, faults.c serves): the page
 * tables' resident count, which the resident limits bound. */
#ifndef UFCRAM_ENGINE_H
#define UFCRAM_ENGINE_H

#include "ufcram_native.h"

/* Pages of r resident and not in flight: what its resident limit counts. */
static inline int64_t resident(const struct ufc_region_view *r)
{
	return r->tally[UFC_STATE_NORMAL] + r->tally[UFC_STATE_READONLY] +
	       r->tally[UFC_STATE_WRITABLE];
}

#endif
