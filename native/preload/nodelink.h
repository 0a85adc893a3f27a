/* The preload library's link to a node: C's counterpart of ufcram/connection.py.
 * Internal to the preload library (hidden symbols), not part of the shim's API. */
#ifndef UFCRAM_NODELINK_H
#define UFCRAM_NODELINK_H

#include <pthread.h>
#include <stdint.h>

struct ufc_link {
	int sock;
	int uffd;
	uint32_t seq;
	pthread_mutex_t lock; /* one request and its reply at a time */
};

int ufc_link_open(struct ufc_link *link, const char *path, uint64_t staging_pages,
		  int user_mode_only, char *why, size_t why_len);
int ufc_link_request(struct ufc_link *link, uint16_t op, const void *payload, uint32_t len,
		     uint64_t *count, char *why, size_t why_len);

#endif
