/* A program's own LD_PRELOAD library, for `ufcram run` to keep beside its own: its
 * constructor says that it ran, in which program, and whose a small malloc made there is
 * (libc's, as for any allocation under the threshold, or a region of the node, which is
 * at least a page). */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>

__attribute__((constructor)) static void loaded(void)
{
	char *p = malloc(100);
	fprintf(stderr, "own preload ran in %s: its 100-byte malloc is %s\n",
		program_invocation_short_name, malloc_usable_size(p) < 4096 ? "libc's" : "a region");
	free(p);
}
