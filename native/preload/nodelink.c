/* Joining a node from C: open and negotiate a userfaultfd, start the agent thread with
 * its staging buffer, send HELLO with the three descriptors, then request/reply. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "nodelink.h"
#include "ufcram_native.h"

/* as ufcram/uffd.py's WANTED: write-protect, thread ids, and every event */
#define LINK_FEATURES                                                                 \
	(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_THREAD_ID |                   \
	 UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP | \
	 UFFD_FEATURE_EVENT_FORK)

static int fail(char *why, size_t n, int rc, const char *what)
{
	snprintf(why, n, "%s: %s", what, strerror(rc < 0 ? -rc : rc));
	return rc < 0 ? rc : -rc;
}

static int open_uffd(int user_mode_only)
{
	int fd = ufc_uffd_open_syscall(user_mode_only ? UFFD_USER_MODE_ONLY : 0);
	if (fd < 0 && !user_mode_only)
		fd = ufc_uffd_open_dev(0);
	if (fd < 0)
		return fd;
	uint64_t features, ioctls;
	/* MOVE where the kernel has it (Linux 6.8+): the agent demotes by moving pages out */
	int rc = ufc_uffd_api(fd, LINK_FEATURES | UFFD_FEATURE_MOVE, &features, &ioctls);
	if (rc == -EINVAL) {   /* once per descriptor: again, on a new one, without it */
		close(fd);
		fd = ufc_uffd_open_syscall(user_mode_only ? UFFD_USER_MODE_ONLY : 0);
		if (fd < 0 && !user_mode_only)
			fd = ufc_uffd_open_dev(0);
		if (fd < 0)
			return fd;
		rc = ufc_uffd_api(fd, LINK_FEATURES, &features, &ioctls);
	}
	if (rc < 0) {
		close(fd);
		return rc;
	}
	return fd;
}

static int connect_node(const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(addr.sun_path))
		return -ENAMETOOLONG;
	strcpy(addr.sun_path, path);
	int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sock < 0)
		return -errno;
	if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		int err = errno;
		close(sock);
		return -err;
	}
	return sock;
}

/* The staging buffer stays mapped for the life of the process: the agent writes into
 * it whenever the handler asks. Returns the memfd (to pass in HELLO) or -errno. */
static int start_agent(int uffd, uint64_t bytes, int *handler_end)
{
	int memfd = (int)syscall(SYS_memfd_create, "ufcram-staging", MFD_CLOEXEC);
	if (memfd < 0)
		return -errno;
	int pair[2] = { -1, -1 };
	int rc = ftruncate(memfd, (off_t)bytes) < 0 ? -errno : 0;
	void *staging = MAP_FAILED;
	if (!rc)
		staging = (void *)syscall(SYS_mmap, NULL, bytes, PROT_READ | PROT_WRITE,
					  MAP_SHARED, memfd, 0);
	if (!rc && staging == MAP_FAILED)
		rc = -errno;
	if (!rc && socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0)
		rc = -errno;
	if (!rc)
		rc = ufc_agent_start(uffd, pair[0], (uint64_t)(uintptr_t)staging, bytes);
	if (rc) {
		if (pair[0] >= 0) {
			close(pair[0]);
			close(pair[1]);
		}
		close(memfd);
		return rc;
	}
	*handler_end = pair[1];
	return memfd;
}

static void put_header(struct ufc_frame_header *h, uint16_t op, uint32_t seq, uint32_t len)
{
	memcpy(h->magic, "UFCR", 4);
	h->version = UFC_PROTO_VERSION;
	h->op = op;
	h->seq = seq;
	h->length = len;
}

/* One reply: its count (if any) or -errno with the handler's message in why. */
static int await_reply(struct ufc_link *link, uint64_t *count, char *why, size_t why_len)
{
	char buf[512];
	ssize_t n;
	do
		n = recv(link->sock, buf, sizeof(buf), 0);
	while (n < 0 && errno == EINTR);
	if (n <= 0)
		return fail(why, why_len, n < 0 ? errno : EPIPE, "the ufcram node has gone away");
	struct ufc_frame_header h;
	if ((size_t)n < sizeof(h))
		return fail(why, why_len, EBADMSG, "truncated reply");
	memcpy(&h, buf, sizeof(h));
	size_t body = (size_t)n - sizeof(h);
	if (memcmp(h.magic, "UFCR", 4) || h.seq != link->seq || h.length != body)
		return fail(why, why_len, EBADMSG, "malformed reply");
	if (h.op == UFC_PROTO_ERROR && body >= 4) {
		int32_t code;
		memcpy(&code, buf + sizeof(h), 4);
		snprintf(why, why_len, "the handler refused: %.*s", (int)(body - 4),
			 buf + sizeof(h) + 4);
		return code > 0 ? -code : -EINVAL;
	}
	if (h.op != UFC_PROTO_OK)
		return fail(why, why_len, EBADMSG, "unexpected reply");
	if (count) {
		*count = 0;
		if (body >= 8)
			memcpy(count, buf + sizeof(h), 8);
	}
	return 0;
}

static int send_frame(struct ufc_link *link, uint16_t op, const void *payload, uint32_t len,
		      const int *fds, int nfds)
{
	char frame[sizeof(struct ufc_frame_header) + 64];
	if (len > sizeof(frame) - sizeof(struct ufc_frame_header))
		return -E2BIG;
	put_header((struct ufc_frame_header *)frame, op, ++link->seq, len);
	memcpy(frame + sizeof(struct ufc_frame_header), payload, len);
	size_t n = sizeof(struct ufc_frame_header) + len;
	if (nfds) {
		int rc = ufc_send_fds(link->sock, frame, n, fds, nfds);
		return rc < 0 ? rc : 0;
	}
	return send(link->sock, frame, n, MSG_NOSIGNAL) < 0 ? -errno : 0;
}

/* One request (with descriptors to pass, if any) and its reply, under the link's lock. */
static int exchange(struct ufc_link *link, uint16_t op, const void *payload, uint32_t len,
		    const int *fds, int nfds, uint64_t *count, char *why, size_t why_len)
{
	pthread_mutex_lock(&link->lock);
	int rc = send_frame(link, op, payload, len, fds, nfds);
	if (rc)
		fail(why, why_len, rc, "the ufcram node is unreachable");
	else
		rc = await_reply(link, count, why, why_len);
	pthread_mutex_unlock(&link->lock);
	return rc;
}

int ufc_link_request(struct ufc_link *link, uint16_t op, const void *payload, uint32_t len,
		     uint64_t *count, char *why, size_t why_len)
{
	return exchange(link, op, payload, len, NULL, 0, count, why, why_len);
}

int ufc_link_open(struct ufc_link *link, const char *path, uint64_t staging_pages,
		  int user_mode_only, char *why, size_t why_len)
{
	*link = (struct ufc_link){ .sock = -1, .uffd = -1 };
	pthread_mutex_init(&link->lock, NULL);
	link->uffd = open_uffd(user_mode_only);
	if (link->uffd < 0)
		return fail(why, why_len, link->uffd, "userfaultfd (run `ufcram check`)");
	link->sock = connect_node(path);
	if (link->sock < 0) {
		int rc = link->sock;
		snprintf(why, why_len, "no ufcram node at %s: %s", path, strerror(-rc));
		return rc;
	}
	uint64_t bytes = staging_pages * UFC_PAGE_SIZE;
	int handler_end = -1;
	int memfd = start_agent(link->uffd, bytes, &handler_end);
	if (memfd < 0)
		return fail(why, why_len, memfd, "could not start the agent thread");
	struct ufc_req_hello hello = { bytes, UFC_PROTO_HELLO_COVERS };
	int fds[3] = { link->uffd, handler_end, memfd };
	int rc = exchange(link, UFC_PROTO_HELLO, &hello, sizeof(hello), fds, 3, NULL, why,
			  why_len);
	close(handler_end); /* the handler has its own copies now, or never will */
	close(memfd);
	return rc;
}
