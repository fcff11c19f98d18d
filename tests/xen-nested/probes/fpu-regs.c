/* fpu-regs.c - holds fixed values in ymm0-15 across a busy loop and counts how often they
 * come back changed. Run in dom0 while a PV guest runs (probes/fpu-regs.sh) to see whether
 * Xen's FPU context switching keeps dom0's vector registers intact (under QEMU TCG with Xen's
 * lazy FPU switching it did not: README.md, "Known limits").
 * Build on the host: gcc -O2 -mavx -static -o /tmp/fpu-regs tests/xen-nested/probes/fpu-regs.c
 * usage: fpu-regs [SECONDS [SPIN]]   exit 1 if any check saw a changed register */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <stdint.h>
#include <unistd.h>
int main(int argc,char**argv){
  int secs = argc>1?atoi(argv[1]):60; long spin = argc>2?atol(argv[2]):100000;
  static uint8_t pat[512] __attribute__((aligned(32))), out[512] __attribute__((aligned(32)));
  for(int i=0;i<512;i++) pat[i]=(uint8_t)(i*7+3+getpid());
  time_t end=time(NULL)+secs; long iters=0, bad=0;
  while(time(NULL)<end){
    asm volatile("vmovdqa 0(%0),%%ymm0\n"
"vmovdqa 32(%0),%%ymm1\n"
"vmovdqa 64(%0),%%ymm2\n"
"vmovdqa 96(%0),%%ymm3\n"
"vmovdqa 128(%0),%%ymm4\n"
"vmovdqa 160(%0),%%ymm5\n"
"vmovdqa 192(%0),%%ymm6\n"
"vmovdqa 224(%0),%%ymm7\n"
"vmovdqa 256(%0),%%ymm8\n"
"vmovdqa 288(%0),%%ymm9\n"
"vmovdqa 320(%0),%%ymm10\n"
"vmovdqa 352(%0),%%ymm11\n"
"vmovdqa 384(%0),%%ymm12\n"
"vmovdqa 416(%0),%%ymm13\n"
"vmovdqa 448(%0),%%ymm14\n"
"vmovdqa 480(%0),%%ymm15\n"
      "mov %2,%%rcx\n1: dec %%rcx\n jnz 1b\n"
      "vmovdqa %%ymm0,0(%1)\n"
"vmovdqa %%ymm1,32(%1)\n"
"vmovdqa %%ymm2,64(%1)\n"
"vmovdqa %%ymm3,96(%1)\n"
"vmovdqa %%ymm4,128(%1)\n"
"vmovdqa %%ymm5,160(%1)\n"
"vmovdqa %%ymm6,192(%1)\n"
"vmovdqa %%ymm7,224(%1)\n"
"vmovdqa %%ymm8,256(%1)\n"
"vmovdqa %%ymm9,288(%1)\n"
"vmovdqa %%ymm10,320(%1)\n"
"vmovdqa %%ymm11,352(%1)\n"
"vmovdqa %%ymm12,384(%1)\n"
"vmovdqa %%ymm13,416(%1)\n"
"vmovdqa %%ymm14,448(%1)\n"
"vmovdqa %%ymm15,480(%1)\n"
      :: "r"(pat),"r"(out),"r"(spin):"rcx","memory","xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm12","xmm13","xmm14","xmm15");
    if(memcmp(pat,out,512)){ bad++; if(bad<=5){int j=0; while(pat[j]==out[j]) j++; printf("fpu-regs MISMATCH iter %ld: first diff at byte %d (ymm%d) want %02x got %02x\n",iters,j,j/32,pat[j],out[j]); fflush(stdout);} }
    iters++;
  }
  printf("fpu-regs pid %d: %d s, iters=%ld bad=%ld\n",getpid(),secs,iters,bad);
  return bad!=0;
}
