/* scan: sequential passes over a large array of sensor readings, a ufcram demo (see README.md).
 * Grows the array with realloc, scans it three times, then round-trips it through a file. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEMO_NAME "scan"
#include "demo.h"

#define CHUNK (1 << 18)         /* readings that arrive at a time: 1 MiB */
#define CHECKPOINT (1 << 16)    /* readings between stored prefix sums */

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* The buffer goes through write() and read() so that the kernel, not the program,
 * touches its pages: both loop because either may move fewer bytes than asked. */
static void round_trip(const void *src, void *dst, size_t n)
{
    const char *dir = getenv("TMPDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/ufcram-scan-XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0)
        die("scan: mkstemp");
    unlink(path);
    for (size_t done = 0; done < n;) {
        ssize_t k = write(fd, (const char *)src + done, n - done);
        if (k <= 0)
            die("scan: write");
        done += k;
    }
    if (lseek(fd, 0, SEEK_SET) < 0)
        die("scan: lseek");
    for (size_t done = 0; done < n;) {
        ssize_t k = read(fd, (char *)dst + done, n - done);
        if (k <= 0)
            die("scan: read");
        done += k;
    }
    close(fd);
}

int main(int argc, char **argv)
{
    unsigned long long mib = 64, seed = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mib") && i + 1 < argc)
            mib = num(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = num(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--mib N] [--seed S]\n", argv[0]);
            return 2;
        }
    }
    if (mib < 2) {
        fprintf(stderr, "scan: --mib must be at least 2\n");
        return 2;
    }
    double t0 = now();
    size_t n = (size_t)(mib << 20) / sizeof(int32_t);

    /* Readings arrive a chunk at a time, as from a stream of unknown length, into a
     * buffer that doubles: the big blocks move through realloc, as in real programs. */
    size_t cap = 2 * CHUNK, len = 0;
    int32_t *x = malloc(cap * sizeof *x);
    if (!x)
        die("scan: malloc");
    uint64_t rng = seed;
    int32_t v = 2048;
    while (len < n) {
        if (len + CHUNK > cap) {
            cap *= 2;
            if (!(x = realloc(x, cap * sizeof *x)))
                die("scan: realloc");
        }
        size_t end = len + CHUNK < n ? len + CHUNK : n;
        for (; len < end; len++) {
            uint64_t r = splitmix64(&rng);
            if (r & 1)   /* a slow sensor: half the readings repeat the last one */
                v += (int32_t)((r >> 8) % 15) - 7 - (v - 2048) / 64;
            x[len] = v;
        }
    }
    if (!(x = realloc(x, n * sizeof *x)))   /* give back the slack of the last doubling */
        die("scan: realloc");

    int64_t sum = 0;
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    for (size_t i = 0; i < n; i++) {
        sum += x[i];
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    uint64_t above = 0, sqdev = 0;  /* x > mean and (x - mean)^2, kept in integers */
    int64_t mean = sum / (int64_t)n;
    for (size_t i = 0; i < n; i++) {
        above += (int64_t)x[i] * (int64_t)n > sum;
        sqdev += (uint64_t)((x[i] - mean) * (x[i] - mean));
    }
    size_t ncp = (n + CHECKPOINT - 1) / CHECKPOINT;
    int64_t *cp = malloc(ncp * sizeof *cp);     /* small: stays with libc */
    if (!cp)
        die("scan: malloc");
    int64_t prefix = 0;
    for (size_t i = 0; i < n; i++) {
        if (i % CHECKPOINT == 0)
            cp[i / CHECKPOINT] = prefix;
        prefix += x[i];
    }

    int32_t *copy = malloc(n * sizeof *copy);
    if (!copy)
        die("scan: malloc");
    round_trip(x, copy, n * sizeof *x);
    if (memcmp(x, copy, n * sizeof *x)) {
        fprintf(stderr, "scan: the file round trip changed the data\n");
        return 1;
    }

    int64_t stats[] = {sum, lo, hi, (int64_t)above, (int64_t)sqdev, prefix};
    uint64_t h = hash_words(0xcbf29ce484222325ULL, stats, sizeof stats);
    h = hash_words(h, cp, ncp * sizeof *cp);
    h = hash_words(h, copy, n * sizeof *copy);
    printf("scan: %zu readings (%llu MiB) grown by realloc; min %d max %d mean %.3f, %" PRIu64 " above mean\n",
           n, mib, lo, hi, (double)sum / n, above);
    printf("scan: 3 sequential passes, %zu prefix-sum checkpoints, file round trip verified\n", ncp);
    printf("checksum %016" PRIx64 "\n", h);
    fprintf(stderr, "scan: %.2f s\n", now() - t0);
    free(copy);
    free(cp);
    free(x);
    return 0;
}
