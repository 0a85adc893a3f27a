/* System calls whose user buffers are demoted when the kernel copies them: the kernel's
 * own access faults, and the handler must serve it as it serves the program's.
 * usage: io file|socket [--demoted] */
#include "common.c"

#include <pthread.h>
#include <sys/socket.h>

#define SIZE (8 * MiB)

/* Two buffers, the source filled and the destination scribbled on, both mostly demoted. */
static void buffers(char **src, char **dst)
{
	*src = xmalloc(SIZE);
	*dst = xmalloc(SIZE);
	fill(*src, SIZE, 1);
	fill(*dst, SIZE, 2); /* written, so demotion stores it: the read lands on demoted pages */
	require_demoted("the source buffer", *src, SIZE);
	require_demoted("the destination buffer", *dst, SIZE);
}

/* write() out of a demoted buffer into a file, read() it back into another. */
static void via_file(char *src, char *dst)
{
	FILE *f = tmpfile();
	if (!f)
		die(2, "tmpfile: %s", strerror(errno));
	int fd = fileno(f);
	for (size_t done = 0; done < SIZE;) {
		ssize_t n = write(fd, src + done, SIZE - done);
		if (n <= 0)
			fail("write() from the demoted buffer at byte %zu: %s", done,
			     n ? strerror(errno) : "wrote nothing");
		done += (size_t)n;
	}
	require_demoted("the destination buffer before read()", dst, SIZE);
	if (lseek(fd, 0, SEEK_SET))
		die(2, "lseek: %s", strerror(errno));
	for (size_t done = 0; done < SIZE;) {
		ssize_t n = read(fd, dst + done, SIZE - done);
		if (n <= 0)
			fail("read() into the demoted buffer at byte %zu: %s", done,
			     n ? strerror(errno) : "end of file");
		done += (size_t)n;
	}
	fclose(f);
}

struct sender {
	int fd;
	const char *buf;
	const char *error;
};

static void *send_all(void *arg)
{
	struct sender *s = arg;
	for (size_t done = 0; done < SIZE;) {
		ssize_t n = send(s->fd, s->buf + done, SIZE - done, MSG_NOSIGNAL);
		if (n <= 0) {
			s->error = n ? strerror(errno) : "sent nothing";
			break;
		}
		done += (size_t)n;
	}
	return NULL;
}

/* send() out of a demoted buffer over a socketpair while recv() fills another: the
 * socket holds far less than the buffer, so a thread sends while the program receives. */
static void via_socket(char *src, char *dst)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		die(2, "socketpair: %s", strerror(errno));
	struct sender s = { sv[0], src, NULL };
	pthread_t t;
	if (pthread_create(&t, NULL, send_all, &s))
		die(2, "pthread_create failed");
	for (size_t done = 0; done < SIZE;) {
		ssize_t n = recv(sv[1], dst + done, SIZE - done, 0);
		if (n <= 0)
			fail("recv() into the demoted buffer at byte %zu: %s", done,
			     n ? strerror(errno) : "the sender closed");
		done += (size_t)n;
	}
	pthread_join(t, NULL);
	if (s.error)
		fail("send() from the demoted buffer: %s", s.error);
	close(sv[0]);
	close(sv[1]);
}

int main(int argc, char **argv)
{
	setup(argc, argv);
	const char *how = argc > 1 ? argv[1] : "";
	char *src, *dst;
	if (strcmp(how, "file") && strcmp(how, "socket"))
		die(2, "usage: io file|socket [--demoted]");
	buffers(&src, &dst);
	if (!strcmp(how, "file"))
		via_file(src, dst);
	else
		via_socket(src, dst);
	expect_pattern("the destination after the round trip", dst, SIZE, 1);
	expect_pattern("the source after the round trip", src, SIZE, 1);
	free(src);
	free(dst);
	puts("ok");
	return 0;
}
