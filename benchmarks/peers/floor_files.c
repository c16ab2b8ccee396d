/* The file work issue 3 and 4 require per message, in C, with no SMTP at all: a lower bound
 * on the CPU any implementation spends on it on this machine (benchmarks/ceiling_bench.py).
 *
 *   floor_files DIR THREADS MESSAGES BYTES
 *
 * THREADS threads share MESSAGES messages of BYTES bytes. Per message, as our server does:
 *   queue (before the 250): create queue/tmp/N (O_EXCL), write envelope + message, fsync,
 *     close, rename into queue/mess/, fsync queue/mess/;
 *   delivery (after the 250): read queue/mess/N back, create Maildir/tmp/NAME, write
 *     Return-Path + Delivered-To + message, fsync, close, rename into Maildir/new/, fsync new/,
 *     unlink queue/mess/N.
 * Directory descriptors are opened once per thread (cheaper than any real server); concurrent
 * fsyncs share ext4's journal commits. Prints one JSON line: messages, wall seconds, user and
 * system CPU seconds of the whole process. Exit 1 on any error (with the failing call).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static const char *base;
static long total, bytes;
static long next_index;
static char *body;

static void die(const char *what, const char *path) {
    fprintf(stderr, "floor_files: %s %s: %s\n", what, path, strerror(errno));
    exit(1);
}

static void write_all(int fd, const char *p, size_t n, const char *path) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) die("write", path);
        p += w;
        n -= (size_t)w;
    }
}

static int open_dir(const char *sub) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", base, sub);
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) die("open", path);
    return fd;
}

/* Create tmp (O_EXCL), write data, fsync, close, rename to final, fsync the final directory. */
static void commit(const char *tmp, const char *final, int dir_fd, const char *data, size_t n) {
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) die("open", tmp);
    write_all(fd, data, n, tmp);
    if (fsync(fd) < 0) die("fsync", tmp);
    close(fd);
    if (rename(tmp, final) < 0) die("rename", tmp);
    if (fsync(dir_fd) < 0) die("fsync", final);
}

static void *worker(void *arg) {
    (void)arg;
    int mess_dir = open_dir("queue/mess"), new_dir = open_dir("Maildir/new");
    size_t cap = (size_t)bytes + 1024;
    char *buf = malloc(cap), *out = malloc(cap + 512);
    char qtmp[4096], qmess[4096], mtmp[4096], mnew[4096];
    if (!buf || !out) die("malloc", "");
    for (;;) {
        long i = __atomic_fetch_add(&next_index, 1, __ATOMIC_RELAXED);
        if (i >= total) break;
        snprintf(qtmp, sizeof qtmp, "%s/queue/tmp/%ld", base, i);
        snprintf(qmess, sizeof qmess, "%s/queue/mess/%ld", base, i);
        int n = snprintf(buf, cap, "Fa@test.com\nTtest@test.com\n\n");
        memcpy(buf + n, body, (size_t)bytes);
        commit(qtmp, qmess, mess_dir, buf, (size_t)n + (size_t)bytes);
        /* the 250 would be sent here; local delivery follows */
        int fd = open(qmess, O_RDONLY | O_CLOEXEC);
        if (fd < 0) die("open", qmess);
        ssize_t got = read(fd, buf, cap);
        if (got < 0) die("read", qmess);
        close(fd);
        int h = snprintf(out, cap + 512, "Return-Path: <a@test.com>\nDelivered-To: test@test.com\n");
        memcpy(out + h, buf, (size_t)got);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        snprintf(mtmp, sizeof mtmp, "%s/Maildir/tmp/%ld.M%ldP%dQ%ld.floor", base,
                 (long)ts.tv_sec, ts.tv_nsec / 1000, getpid(), i);
        snprintf(mnew, sizeof mnew, "%s/Maildir/new/%ld.M%ldP%dQ%ld.floor", base,
                 (long)ts.tv_sec, ts.tv_nsec / 1000, getpid(), i);
        commit(mtmp, mnew, new_dir, out, (size_t)h + (size_t)got);
        if (unlink(qmess) < 0) die("unlink", qmess);
    }
    free(buf);
    free(out);
    close(mess_dir);
    close(new_dir);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: floor_files DIR THREADS MESSAGES BYTES\n");
        return 2;
    }
    base = argv[1];
    int threads = atoi(argv[2]);
    total = atol(argv[3]);
    bytes = atol(argv[4]);
    if (threads < 1 || threads > 1024 || total < 1 || bytes < 1) {
        fprintf(stderr, "floor_files: bad arguments\n");
        return 2;
    }
    const char *subs[] = {"queue", "queue/tmp", "queue/mess", "Maildir", "Maildir/tmp",
                          "Maildir/new", "Maildir/cur"};
    for (size_t k = 0; k < sizeof subs / sizeof *subs; k++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", base, subs[k]);
        if (mkdir(path, 0700) < 0 && errno != EEXIST) die("mkdir", path);
    }
    body = malloc((size_t)bytes);
    if (!body) die("malloc", "");
    for (long k = 0; k < bytes; k++) body[k] = (k % 78 == 77) ? '\n' : 'x';
    pthread_t *tids = calloc((size_t)threads, sizeof *tids);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int k = 0; k < threads; k++)
        if (pthread_create(&tids[k], NULL, worker, NULL)) die("pthread_create", "");
    for (int k = 0; k < threads; k++) pthread_join(tids[k], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double wall = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("{\"messages\": %ld, \"wall\": %.6f, \"user\": %.6f, \"sys\": %.6f}\n", total, wall,
           (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
    return 0;
}
