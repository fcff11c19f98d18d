/* xsbio - a tiny O_DIRECT block benchmark for the busybox PV guest (no fio there).
 * Built statically on the host by run-fs-bench.sh (gcc -O2 -static -pthread) and put into
 * the guest's initramfs.
 *
 *   xsbio DEV MODE BS SPAN_MIB SECONDS [LABEL [QD]]
 *     MODE: randread | randwrite | seqread | seqwrite | fill (seqwrite of the span once, SECONDS ignored)
 *     BS:   request size in bytes (multiple of 4096)
 *     SPAN_MIB: the first SPAN_MIB MiB of DEV are used (sequential wraps around)
 *     QD:   queue depth = number of threads, each doing one synchronous pread/pwrite at a time
 *           (default 1). Sequential modes give each thread its own stripe of the span.
 *
 * O_DIRECT, so every request goes through blkfront to the backend; writes are not followed by
 * a flush. Runs for SECONDS (CLOCK_MONOTONIC) and prints one line:
 *   XSB-BENCH LABEL MODE bs=BS qd=QD ops=N bytes=B secs=S iops=I mibps=M
 * Random offsets: xorshift64 with a fixed seed per thread, aligned to BS. Write data: a random
 * pattern made once (the backend sees non-zero data).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int fd, wr, rnd, fill;
static long bs;
static uint64_t nblocks;
static double secs, t0;
static volatile int failed;

struct th { int i, qd; uint64_t ops; pthread_t t; };

static void *run(void *arg) {
  struct th *th = arg;
  void *buf;
  if (posix_memalign(&buf, 4096, bs)) { failed = 1; return NULL; }
  uint64_t x = 0x9e3779b97f4a7c15ull ^ (uint64_t)th->i;
  for (long i = 0; i < bs; i += 8) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; memcpy((char *)buf + i, &x, 8); }
  /* each thread: its own random stream, or its own stripe for sequential modes */
  uint64_t stripe = nblocks / th->qd, first = stripe * th->i, seq = 0;
  if (stripe == 0) { stripe = nblocks; first = 0; }
  x = 88172645463325252ull + 0x1000193ull * (uint64_t)th->i;
  double t = now();
  while (fill ? seq < stripe : t - t0 < secs) {
    uint64_t blk;
    if (rnd) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; blk = x % nblocks; }
    else { blk = first + seq++ % stripe; }
    ssize_t r = wr ? pwrite(fd, buf, bs, blk * bs) : pread(fd, buf, bs, blk * bs);
    if (r != bs) { perror(wr ? "pwrite" : "pread"); failed = 1; break; }
    th->ops++;
    if ((th->ops & 7) == 0 || bs >= 65536) t = now();
  }
  free(buf);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: %s DEV randread|randwrite|seqread|seqwrite|fill BS SPAN_MIB SECONDS [LABEL [QD]]\n", argv[0]);
    return 2;
  }
  const char *dev = argv[1], *mode = argv[2], *label = argc > 6 ? argv[6] : "-";
  int qd = argc > 7 ? atoi(argv[7]) : 1;
  bs = atol(argv[3]);
  uint64_t span = (uint64_t)atol(argv[4]) << 20;
  secs = atof(argv[5]);
  fill = strcmp(mode, "fill") == 0;
  wr = fill || strstr(mode, "write") != NULL; rnd = strncmp(mode, "rand", 4) == 0;
  if (bs <= 0 || bs % 4096 || span < (uint64_t)bs || qd < 1 || qd > 256) { fprintf(stderr, "bad bs/span/qd\n"); return 2; }
  fd = open(dev, (wr ? O_RDWR : O_RDONLY) | O_DIRECT);
  if (fd < 0) { perror(dev); return 1; }
  nblocks = span / bs;
  struct th *ths = calloc(qd, sizeof *ths);
  if (!ths) return 1;
  t0 = now();
  for (int i = 0; i < qd; i++) {
    ths[i].i = i; ths[i].qd = qd;
    if (pthread_create(&ths[i].t, NULL, run, &ths[i])) { perror("pthread_create"); return 1; }
  }
  uint64_t ops = 0;
  for (int i = 0; i < qd; i++) { pthread_join(ths[i].t, NULL); ops += ths[i].ops; }
  double t = now() - t0;
  if (failed) return 1;
  printf("XSB-BENCH %s %s bs=%ld qd=%d ops=%llu bytes=%llu secs=%.2f iops=%.1f mibps=%.2f\n", label, mode, bs, qd,
         (unsigned long long)ops, (unsigned long long)(ops * bs), t, ops / t, ops * bs / t / 1048576.0);
  close(fd);
  return 0;
}
