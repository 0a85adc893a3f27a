/* The handler's socket protocol, as numbers both sides share: the preload library
 * speaks it from C, and ufcram/protocol.py takes these values through the shim. */
#ifndef UFCRAM_PROTOCOL_H
#define UFCRAM_PROTOCOL_H

#include <stdint.h>

#define UFC_PROTO_VERSION 1
#define UFC_PROTO_MAX_FRAME 65536
#define UFC_PROTO_MAX_FDS 4

/* requests */
#define UFC_PROTO_HELLO 1        /* fds: uffd, agent socket, staging memfd */
#define UFC_PROTO_REGISTER 2     /* start, length, resident limit, write budget -> id */
#define UFC_PROTO_UNREGISTER 3   /* region id, restore flag -> pages restored */
#define UFC_PROTO_DEMOTE 4       /* region id, offset, length -> pages demoted */
#define UFC_PROTO_STATS 5        /* region id (or NODE) -> JSON */
#define UFC_PROTO_SET_CAPACITY 6 /* node capacity in bytes */
#define UFC_PROTO_LIMITS 7       /* resident limit over the regions of the client's group
                                    (a process tree), and the group (0: the client) */
#define UFC_PROTO_PING 8         /* is the handler there and reading? (no payload) */
/* HELLO's flags */
#define UFC_PROTO_HELLO_COVERS 1 /* the client manages all its mappings (the preload
                                    library): a fault outside its regions extends them */
/* replies */
#define UFC_PROTO_OK 100
#define UFC_PROTO_ERROR 101

/* little-endian on the wire, like the Python side's struct formats */
struct ufc_frame_header {
	char magic[4]; /* "UFCR" */
	uint16_t version;
	uint16_t op;
	uint32_t seq;
	uint32_t length; /* payload bytes after the header */
} __attribute__((packed));

#endif
