/* A program's own LD_PRELOAD library, for `ufcram run` to keep beside its own: its
 * constructor says that it ran, in which program, and that malloc works there (ours
 * interposes no allocator, and joins the node in its own constructor, after this one). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((constructor)) static void loaded(void)
{
	char *p = malloc(100);
	if (p)
		strcpy(p, "works");
	fprintf(stderr, "own preload ran in %s: its malloc %s\n", program_invocation_short_name,
		p ? p : "failed");
	free(p);
}
