/* checker.c - guest-side consistency checker for xl-snap checkpoints (static binary, PID 1's
 * child in the PV guest). Keeps a counter C in memory and appends 512-byte records
 * (magic, counter, nonce, checksum) to /dev/xvda with O_DIRECT, never waiting: record k lives
 * in sector SLOT0+k. Every iteration first reads sectors C and C+1 back (O_DIRECT) and checks
 * that sector C holds exactly the record this process wrote last (same random nonce) and that
 * sector C+1 is still empty, then writes record C+1 and increments C.
 * After a pause (> 500 ms: a checkpoint or a restore) it checks the last HIST records instead of
 * only the last one: a write that was in flight at the suspend is re-issued by blkfront after a
 * restore (blkif recover) and re-creates record C on *any* disk, also on one older than memory;
 * only the records before it tell an older disk apart (records C-HIST+1..C-1 must carry the
 * nonces this memory wrote). So right after a restore the first iteration proves that the disk
 * holds exactly this memory's last HIST records and nothing after them.
 * Output (hvc0): CK-START, CK-TICK every 2 s, CK-GAP when >500 ms passed between iterations
 * (gap_ms is the guest-visible pause; nonce= is record C's, so dom0 can look it up in an image
 * with ckscan.c; from_ms= the pause's start, ms since the epoch on the guest's clock, to line it
 * up with dom0's; seg_ms=R/W/L where the interrupted iteration spent the pause: in its read, in
 * its write, after its write), CK-MISMATCH (then it stops; first_bad= is the newest record that
 * differs). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#define SLOT0 2048ULL /* 1 MiB */
#define HIST 64      /* records checked after a pause */
struct rec { char magic[8]; uint64_t counter, nonce, sum; };
static uint64_t fnv(uint64_t c, uint64_t n) {
  uint64_t h = 1469598103934665603ULL; unsigned char b[16]; memcpy(b, &c, 8); memcpy(b + 8, &n, 8);
  for (int i = 0; i < 16; i++) { h ^= b[i]; h *= 1099511628211ULL; }
  return h;
}
static uint64_t rnd_state;
static uint64_t rnd(void) { rnd_state ^= rnd_state << 13; rnd_state ^= rnd_state >> 7; rnd_state ^= rnd_state << 17; return rnd_state; }
static double now_ms(void) { struct timeval tv; gettimeofday(&tv, 0); return tv.tv_sec * 1000.0 + tv.tv_usec / 1000.0; }
static int is_zero(const unsigned char *p) { for (int i = 0; i < 512; i++) if (p[i]) return 0; return 1; }
static void desc(const unsigned char *p, char *out) {
  const struct rec *r = (const void *)p;
  if (is_zero(p)) strcpy(out, "empty");
  else if (memcmp(r->magic, "XSCKREC1", 8)) strcpy(out, "garbage");
  else sprintf(out, "(%llu,%016llx,%s)", (unsigned long long)r->counter, (unsigned long long)r->nonce,
               r->sum == fnv(r->counter, r->nonce) ? "sum-ok" : "sum-bad");
}

int main(int argc, char **argv) {
  const char *dev = argc > 1 ? argv[1] : "/dev/xvda";
  int fd = open(dev, O_RDWR | O_DIRECT);
  if (fd < 0) { perror("CK-ERROR open"); return 1; }
  int ur = open("/dev/urandom", O_RDONLY);
  if (ur < 0 || read(ur, &rnd_state, 8) != 8) rnd_state = 88172645463325252ULL ^ (uint64_t)now_ms();
  if (!rnd_state) rnd_state = 1;
  unsigned char *buf, *w;
  if (posix_memalign((void **)&buf, 4096, (HIST + 8) * 512) || posix_memalign((void **)&w, 4096, 4096)) return 1;
  uint64_t hist[HIST]; /* hist[k % HIST] = nonce of record k */
  uint64_t c = 0, nonce = rnd();
  hist[0] = nonce;
  struct rec r = { "XSCKREC1", 0, nonce, fnv(0, nonce) };
  memset(w, 0, 512); memcpy(w, &r, sizeof r);
  if (pwrite(fd, w, 512, (SLOT0 + 0) * 512) != 512) { perror("CK-ERROR first write"); return 1; }
  printf("CK-START counter=0 nonce=%016llx\n", (unsigned long long)nonce); fflush(stdout);
  double prev = now_ms(), tick = prev, maxgap = 0, prev_rd = prev, prev_wr = prev;
  for (;;) {
    double t = now_ms(), gap = t - prev;
    /* where the previous iteration (the one a pause interrupted) spent the gap: its read,
       its write, after its write (ms) */
    double seg_r = prev_rd - prev, seg_w = prev_wr - prev_rd, seg_l = t - prev_wr;
    prev = t; prev_rd = t; prev_wr = t;
    if (gap > maxgap) maxgap = gap;
    /* after a pause: records lo..c and the empty c+1; else just c and c+1 */
    uint64_t lo = gap > 500 && c >= HIST - 1 ? c - (HIST - 1) : gap > 500 ? 0 : c;
    size_t len = (size_t)(c + 2 - lo) * 512;
    if (pread(fd, buf, len, (SLOT0 + lo) * 512) != (ssize_t)len) { perror("CK-ERROR read"); sleep(1); continue; }
    prev_rd = prev_wr = now_ms();
    int ok = is_zero(buf + (c + 1 - lo) * 512);
    uint64_t bad = c + 1;
    for (uint64_t k = c + 1; ok && k-- > lo;) {
      const struct rec *a = (const void *)(buf + (k - lo) * 512);
      if (memcmp(a->magic, "XSCKREC1", 8) || a->counter != k || a->nonce != hist[k % HIST] || a->sum != fnv(k, a->nonce)) {
        ok = 0; bad = k;
      }
    }
    if (!ok) {
      char d0[80], d1[80], db[80]; desc(buf + (c - lo) * 512, d0); desc(buf + (c + 1 - lo) * 512, d1);
      desc(buf + (bad - lo) * 512, db);
      for (;;) {
        printf("CK-MISMATCH counter=%llu nonce=%016llx disk[%llu]=%s disk[%llu]=%s first_bad=%llu disk[first_bad]=%s want=%016llx checked=%llu gap_ms=%.1f\n",
               (unsigned long long)c, (unsigned long long)nonce, (unsigned long long)c, d0,
               (unsigned long long)c + 1, d1, (unsigned long long)bad, db,
               (unsigned long long)(bad <= c ? hist[bad % HIST] : 0), (unsigned long long)(c + 1 - lo), gap);
        fflush(stdout); sleep(5);
      }
    }
    if (gap > 500) { printf("CK-GAP counter=%llu gap_ms=%.1f disk_last=%llu next=empty checked=%llu check=ok nonce=%016llx from_ms=%.1f seg_ms=%.1f/%.1f/%.1f\n",
                            (unsigned long long)c, gap, (unsigned long long)c, (unsigned long long)(c + 1 - lo),
                            (unsigned long long)nonce, t - gap, seg_r, seg_w, seg_l); fflush(stdout); }
    uint64_t n2 = rnd();
    struct rec r2 = { "XSCKREC1", c + 1, n2, fnv(c + 1, n2) };
    memset(w, 0, 512); memcpy(w, &r2, sizeof r2);
    if (pwrite(fd, w, 512, (SLOT0 + c + 1) * 512) != 512) { perror("CK-ERROR write"); sleep(1); continue; }
    prev_wr = now_ms();
    c++; nonce = n2; hist[c % HIST] = n2;
    if (t - tick > 2000) { printf("CK-TICK counter=%llu maxgap_ms=%.1f\n", (unsigned long long)c, maxgap); fflush(stdout); tick = t; maxgap = 0; }
  }
}
