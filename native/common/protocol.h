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

/* values with a meaning of their own */
#define UFC_PROTO_NO_LIMIT UINT64_MAX      /* REGISTER, LIMITS: no resident limit */
#define UFC_PROTO_AUTO_BUDGET (-1)         /* REGISTER: write budget "auto" */
#define UFC_PROTO_NODE 0xFFFFFFFFu         /* STATS: the node, with its largest clients */
#define UFC_PROTO_NODE_SUMMARY 0xFFFFFFFEu /* STATS: the node's totals alone */

/* The request payloads, little-endian and packed like every frame. protocol.py speaks
 * them as struct formats; tests/unit/test_protocol.py pins those to these layouts. */
struct ufc_req_hello {
	uint64_t staging_bytes;
	int32_t flags;
} __attribute__((packed));
struct ufc_req_register {
	uint64_t start, length, resident_limit;
	int64_t write_budget; /* pages; UFC_PROTO_AUTO_BUDGET */
} __attribute__((packed));
struct ufc_req_unregister {
	uint32_t region;
	uint8_t restore;
} __attribute__((packed));
struct ufc_req_demote {
	uint32_t region;
	uint64_t offset, length;
} __attribute__((packed));
struct ufc_req_stats {
	uint32_t region; /* or UFC_PROTO_NODE[_SUMMARY] */
} __attribute__((packed));
struct ufc_req_set_capacity {
	uint64_t capacity;
} __attribute__((packed));
struct ufc_req_limits {
	uint64_t resident_limit, group; /* group 0: the client alone */
} __attribute__((packed));

_Static_assert(sizeof(struct ufc_req_hello) == 12, "HELLO payload");
_Static_assert(sizeof(struct ufc_req_register) == 32, "REGISTER payload");
_Static_assert(sizeof(struct ufc_req_unregister) == 5, "UNREGISTER payload");
_Static_assert(sizeof(struct ufc_req_demote) == 20, "DEMOTE payload");
_Static_assert(sizeof(struct ufc_req_stats) == 4, "STATS payload");
_Static_assert(sizeof(struct ufc_req_set_capacity) == 8, "SET_CAPACITY payload");
_Static_assert(sizeof(struct ufc_req_limits) == 16, "LIMITS payload");

/* little-endian on the wire, like the Python side's struct formats */
struct ufc_frame_header {
	char magic[4]; /* "UFCR" */
	uint16_t version;
	uint16_t op;
	uint32_t seq;
	uint32_t length; /* payload bytes after the header */
} __attribute__((packed));

#endif
