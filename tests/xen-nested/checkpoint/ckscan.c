/* ckscan.c - dom0-side reader of the checker's records (see checker.c) in a qcow2 image that
 * blkback-snap serves, through the guest->host map the backend's control socket returns
 * (`{"op":"map","checkpoint":NAME|null}`, a JSON list of {guest_offset, host_offset, kind,
 * length, ...}). Prints one line "INDEX NONCE sum-ok|sum-bad" per sector that holds a record
 * (magic XSCKREC1), in guest order. Data clusters of a checkpoint are never written in place,
 * so reading them from the image file while the backend serves the disk is exact.
 * usage: ckscan IMAGE MAP.json   (exit 2: unreadable input) */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SLOT0 2048ULL
struct rec { char magic[8]; uint64_t counter, nonce, sum; };
static uint64_t fnv(uint64_t c, uint64_t n) {
  uint64_t h = 1469598103934665603ULL; unsigned char b[16]; memcpy(b, &c, 8); memcpy(b + 8, &n, 8);
  for (int i = 0; i < 16; i++) { h ^= b[i]; h *= 1099511628211ULL; }
  return h;
}
/* value of "key": inside [p, end): 1 = number in *v, 0 = null/absent */
static int field(const char *p, const char *end, const char *key, unsigned long long *v) {
  char k[64]; snprintf(k, sizeof k, "\"%s\"", key);
  const char *q = strstr(p, k);
  if (!q || q >= end) return 0;
  q += strlen(k);
  while (q < end && (*q == ' ' || *q == ':' || *q == '\n')) q++;
  if (q >= end || *q < '0' || *q > '9') return 0;
  *v = strtoull(q, 0, 10); return 1;
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: ckscan IMAGE MAP.json\n"); return 2; }
  int fd = open(argv[1], O_RDONLY | O_DIRECT);
  if (fd < 0) fd = open(argv[1], O_RDONLY);
  FILE *mf = fopen(argv[2], "r");
  if (fd < 0 || !mf) { perror("ckscan open"); return 2; }
  static char js[4 << 20]; size_t n = fread(js, 1, sizeof js - 1, mf); js[n] = 0;
  unsigned char *buf;
  if (posix_memalign((void **)&buf, 4096, 1 << 20)) return 2;
  int extents = 0;
  for (char *p = strchr(js, '{'); p; p = strchr(p + 1, '{')) {
    char *end = strchr(p, '}'); if (!end) break;
    unsigned long long g, h, len;
    if (!field(p, end, "guest_offset", &g) || !field(p, end, "length", &len)) continue;
    extents++;
    if (!field(p, end, "host_offset", &h) || !strstr(p, "\"data\"") || strstr(p, "\"data\"") > end) continue;
    for (unsigned long long o = 0; o < len; o += 1 << 20) {
      size_t want = len - o < (1 << 20) ? len - o : (1 << 20);
      ssize_t r = pread(fd, buf, want, h + o);
      if (r != (ssize_t)want) { fprintf(stderr, "ckscan: short read at host %llu\n", h + o); return 2; }
      for (size_t s = 0; s < want; s += 512) {
        unsigned long long sec = (g + o + s) / 512;
        const struct rec *rc = (const void *)(buf + s);
        if (sec < SLOT0 || memcmp(rc->magic, "XSCKREC1", 8)) continue;
        printf("%llu %016llx %s\n", (unsigned long long)rc->counter, (unsigned long long)rc->nonce,
               rc->counter == sec - SLOT0 && rc->sum == fnv(rc->counter, rc->nonce) ? "sum-ok" : "sum-bad");
      }
    }
  }
  if (!extents) { fprintf(stderr, "ckscan: no extents in %s\n", argv[2]); return 2; }
  return 0;
}
