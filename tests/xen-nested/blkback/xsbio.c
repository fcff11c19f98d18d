/* xsbio - a tiny O_DIRECT block benchmark for the busybox PV guest (no fio there).
 * Built statically on the host by run-fs-bench.sh (gcc -O2 -static) and put into the
 * guest's initramfs.
 *
 *   xsbio DEV MODE BS SPAN_MIB SECONDS [LABEL]
 *     MODE: randread | randwrite | seqread | seqwrite | fill (seqwrite of the span once, SECONDS ignored)
 *     BS:   request size in bytes (multiple of 4096)
 *     SPAN_MIB: the first SPAN_MIB MiB of DEV are used (sequential wraps around)
 *
 * Queue depth 1 (one synchronous pread/pwrite at a time, O_DIRECT, so every request goes
 * through blkfront to the backend; writes are not followed by a flush). Runs for SECONDS
 * (CLOCK_MONOTONIC) and prints one line:
 *   XSB-BENCH LABEL MODE bs=BS ops=N bytes=B secs=S iops=I mibps=M
 * Random offsets: xorshift64 with a fixed seed, aligned to BS. Write data: a random pattern
 * made once (the backend sees non-zero data).
 */
#define _GNU_SOURCE
#include <fcntl.h>
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

int main(int argc, char **argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: %s DEV randread|randwrite|seqread|seqwrite BS SPAN_MIB SECONDS [LABEL]\n", argv[0]);
    return 2;
  }
  const char *dev = argv[1], *mode = argv[2], *label = argc > 6 ? argv[6] : "-";
  long bs = atol(argv[3]);
  uint64_t span = (uint64_t)atol(argv[4]) << 20;
  double secs = atof(argv[5]);
  int fill = strcmp(mode, "fill") == 0;
  int wr = fill || strstr(mode, "write") != NULL, rnd = strncmp(mode, "rand", 4) == 0;
  if (bs <= 0 || bs % 4096 || span < (uint64_t)bs) { fprintf(stderr, "bad bs/span\n"); return 2; }
  int fd = open(dev, (wr ? O_RDWR : O_RDONLY) | O_DIRECT);
  if (fd < 0) { perror(dev); return 1; }
  void *buf;
  if (posix_memalign(&buf, 4096, bs)) return 1;
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (long i = 0; i < bs; i += 8) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; memcpy((char *)buf + i, &x, 8); }
  uint64_t nblocks = span / bs, seq = 0, ops = 0;
  x = 88172645463325252ull;
  double t0 = now(), t = t0;
  while (fill ? seq < nblocks : t - t0 < secs) {
    uint64_t blk;
    if (rnd) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; blk = x % nblocks; }
    else { blk = seq++ % nblocks; }
    ssize_t r = wr ? pwrite(fd, buf, bs, blk * bs) : pread(fd, buf, bs, blk * bs);
    if (r != bs) { perror(wr ? "pwrite" : "pread"); return 1; }
    ops++;
    if ((ops & 7) == 0 || bs >= 65536) t = now();
  }
  t = now() - t0;
  printf("XSB-BENCH %s %s bs=%ld ops=%llu bytes=%llu secs=%.2f iops=%.1f mibps=%.2f\n", label, mode, bs,
         (unsigned long long)ops, (unsigned long long)(ops * bs), t, ops / t, ops * bs / t / 1048576.0);
  close(fd);
  return 0;
}
