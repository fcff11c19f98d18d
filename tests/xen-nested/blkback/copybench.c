/* copybench - how fast does dom0 copy a file's cached bytes, by each way a backend can copy?
 * Built statically on the host by run-fs-bench.sh and run in dom0 by phase C of main-fs.sh.
 *
 *   copybench FILE MIB
 *
 * Reads the first MIB MiB of FILE once (page cache warm), then copies them, 1 MiB at a time,
 * into a 1 MiB buffer in each of these ways, best of 3 passes each, and prints one line per
 * way: "XSB-COPY <way> ms_per_mib=<t>".
 *   pread       - pread(2) of 1 MiB: the kernel copies page cache -> user (copy_to_user)
 *   preadv4k    - preadv(2) with 256 iovecs of 4 KiB (what a backend does into guest pages)
 *   mmap-memcpy - from a MAP_POPULATE mapping of the file with glibc's memcpy (user space)
 *   mmap-movsb  - the same with `rep movsb`
 *   mmap-movsq  - the same with `rep movsq`
 *   mmap-u64    - the same with a plain loop of 8-byte loads and stores
 * Under TCG the instructions a copy is made of decide its cost; this tells which copy is
 * cheapest on the test bed.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MIB (1u << 20)

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void movsb(void *d, const void *s, size_t n) {
  __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}

static void movsq(void *d, const void *s, size_t n) {
  size_t q = n / 8;
  __asm__ volatile("rep movsq" : "+D"(d), "+S"(s), "+c"(q) : : "memory");
}

static void u64loop(void *d, const void *s, size_t n) {
  volatile uint64_t *dq = d;
  const volatile uint64_t *sq = s;
  for (size_t i = 0; i < n / 8; i++) dq[i] = sq[i];
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s FILE MIB\n", argv[0]);
    return 2;
  }
  size_t mibs = strtoul(argv[2], NULL, 10);
  int fd = open(argv[1], O_RDONLY);
  if (fd < 0 || mibs == 0) {
    perror(argv[1]);
    return 2;
  }
  char *buf;
  if (posix_memalign((void **)&buf, 4096, MIB)) return 2;
  memset(buf, 1, MIB);
  for (size_t i = 0; i < mibs; i++)
    if (pread(fd, buf, MIB, (off_t)i * MIB) != MIB) { perror("pread"); return 2; }
  char *map = mmap(NULL, mibs * MIB, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (map == MAP_FAILED) { perror("mmap"); return 2; }
  struct iovec iov[256];
  for (int i = 0; i < 256; i++) { iov[i].iov_base = buf + i * 4096; iov[i].iov_len = 4096; }
  const char *ways[] = {"pread", "preadv4k", "mmap-memcpy", "mmap-movsb", "mmap-movsq", "mmap-u64"};
  for (int w = 0; w < 6; w++) {
    double best = 1e9;
    for (int pass = 0; pass < 3; pass++) {
      double t = now();
      for (size_t i = 0; i < mibs; i++) {
        const char *src = map + i * MIB;
        off_t off = (off_t)i * MIB;
        switch (w) {
        case 0: if (pread(fd, buf, MIB, off) != MIB) { perror("pread"); return 1; } break;
        case 1: if (preadv(fd, iov, 256, off) != MIB) { perror("preadv"); return 1; } break;
        case 2: memcpy(buf, src, MIB); break;
        case 3: movsb(buf, src, MIB); break;
        case 4: movsq(buf, src, MIB); break;
        case 5: u64loop(buf, src, MIB); break;
        }
      }
      t = (now() - t) * 1000 / mibs;
      if (t < best) best = t;
    }
    printf("XSB-COPY %s ms_per_mib=%.2f\n", ways[w], best);
    fflush(stdout);
  }
  return 0;
}
