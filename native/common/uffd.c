/* userfaultfd syscalls and ioctls, memory syscalls, and SCM_RIGHTS fd passing.
 * Each function is one kernel call (or a loop of the same call); -errno on failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ufcram_native.h"

int ufc_uffd_open_syscall(int flags)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | flags);
	return fd < 0 ? -errno : fd;
}

int ufc_uffd_open_dev(int flags)
{
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return -errno;
	int fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK | flags);
	int err = errno;
	close(dev);
	return fd < 0 ? -err : fd;
}

int ufc_uffd_api(int fd, uint64_t want, uint64_t *features, uint64_t *ioctls)
{
	struct uffdio_api api = { .api = UFFD_API, .features = want };
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	*features = api.features;
	*ioctls = api.ioctls;
	return 0;
}

int ufc_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls)
{
	struct uffdio_register reg = { .range = { start, len }, .mode = mode };
	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	*ioctls = reg.ioctls;
	return 0;
}

int ufc_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };
	return ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

int ufc_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_copy copy = { .dst = dst, .src = src, .len = len, .mode = mode };
	int rc = ioctl(fd, UFFDIO_COPY, &copy) < 0 ? -errno : 0;
	*done = copy.copy;
	return rc;
}

int ufc_uffd_copy_batch(int fd, const uint64_t *dst, const uint64_t *src, const uint64_t *len,
			int n, uint64_t mode, int32_t *results)
{
	int failed = 0;
	for (int i = 0; i < n; i++) {
		int64_t done;
		results[i] = ufc_uffd_copy(fd, dst[i], src[i], len[i], mode, &done);
		failed += results[i] != 0;
	}
	return failed;
}

int ufc_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_zeropage zp = { .range = { start, len }, .mode = mode };
	int rc = ioctl(fd, UFFDIO_ZEROPAGE, &zp) < 0 ? -errno : 0;
	*done = zp.zeropage;
	return rc;
}

int ufc_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_writeprotect wp = { .range = { start, len }, .mode = mode };
	return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

int ufc_uffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };
	return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

int ufc_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_move mv = { .dst = dst, .src = src, .len = len, .mode = mode };
	int rc = ioctl(fd, UFFDIO_MOVE, &mv) < 0 ? -errno : 0;
	*done = mv.move;
	return rc;
}

int ufc_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_poison p = { .range = { start, len }, .mode = mode };
	int rc = ioctl(fd, UFFDIO_POISON, &p) < 0 ? -errno : 0;
	*done = p.updated;
	return rc;
}

/* Reads as many whole uffd_msg records as are queued, without blocking. */
int ufc_uffd_read_msgs(int fd, void *buf, int max_msgs)
{
	ssize_t n = read(fd, buf, (size_t)max_msgs * sizeof(struct uffd_msg));
	if (n < 0)
		return errno == EAGAIN ? 0 : -errno;
	return (int)(n / (ssize_t)sizeof(struct uffd_msg));
}

int ufc_wait_readable(int fd, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int n = poll(&p, 1, timeout_ms);
	if (n < 0)
		return -errno;
	return n > 0 ? p.revents : 0;
}

int ufc_send_fds(int sock, const void *data, size_t len, const int *fds, int nfds)
{
	char control[CMSG_SPACE(sizeof(int) * UFC_MAX_FDS)];
	struct iovec iov = { (void *)data, len };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds < 0 || nfds > UFC_MAX_FDS)
		return -EINVAL;
	if (nfds > 0) {
		memset(control, 0, sizeof(control));
		msg.msg_control = control;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
	}
	ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	return n < 0 ? -errno : (int)n;
}

int ufc_recv_fds(int sock, void *data, size_t len, int *fds, int maxfds, int *nfds)
{
	char control[CMSG_SPACE(sizeof(int) * UFC_MAX_FDS)];
	struct iovec iov = { data, len };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = control, .msg_controllen = sizeof(control) };
	ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	*nfds = 0;
	if (n < 0)
		return -errno;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
		int *got = (int *)CMSG_DATA(c);
		for (int i = 0; i < count; i++) {
			if (*nfds < maxfds)
				fds[(*nfds)++] = got[i];
			else
				close(got[i]); /* never leak a descriptor we cannot return */
		}
	}
	return (int)n;
}

int ufc_madvise(uint64_t addr, uint64_t len, int advice)
{
	return madvise((void *)(uintptr_t)addr, len, advice) < 0 ? -errno : 0;
}

int64_t ufc_process_vm_readv(int pid, uint64_t local, uint64_t remote, uint64_t len)
{
	struct iovec l = { (void *)(uintptr_t)local, len };
	struct iovec r = { (void *)(uintptr_t)remote, len };
	ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
	return n < 0 ? -errno : n;
}

int ufc_gettid(void)
{
	return (int)syscall(SYS_gettid);
}
