// The AMX 2 x 2 tile kernel that meet's bf16 products use (src/nn/bf16.rs: four f32
// accumulators, two A and two B tiles per 32 depths), run over one row block of A (in L1)
// against a column panel of B (10 blocks of 32 columns, streamed from L2), with the operands
// 64-byte aligned or offset by MIS bytes. A tile row that straddles two cache lines halves the
// speed of tile loads: why meet aligns its packed tiles.
//     gcc -O2 scripts/amx_alignment.c -o /tmp/a && /tmp/a            (aligned)
//     gcc -O2 -DMIS=16 scripts/amx_alignment.c -o /tmp/a && /tmp/a   (16-byte offset, as a Vec)
// "prefetch 1/2": software prefetch of the next B tiles 1 or 2 steps ahead (no gain measured).
#ifndef MIS
#define MIS 0
#endif
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
struct tilecfg { unsigned char palette, start; unsigned char res[14]; unsigned short colsb[16]; unsigned char rows[16]; };
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
// A: 2 x dsteps tiles (L1-resident, reused for each col block); B: nblocks col blocks each 2 x dsteps tiles, streamed.
__attribute__((target("amx-tile,amx-bf16"),noinline)) void blockrow(long dsteps, long nblocks, const char*a, const char*b, float*c, int pf, long pfd){
  const char *a2 = a + dsteps*1024;
  for (long j=0;j<nblocks;j++){
    const char *b1 = b + j*dsteps*2048, *b2 = b1 + dsteps*1024;
    _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
    for(long s=0;s<dsteps;s++){
      if (pf) { const char *p1 = b1 + (s+pfd)*1024, *p2 = b2 + (s+pfd)*1024;
        for (int l=0;l<1024;l+=64){ _mm_prefetch(p1+l,_MM_HINT_T0); _mm_prefetch(p2+l,_MM_HINT_T0);} }
      _tile_loadd(4,a+s*1024,64);_tile_loadd(6,b1+s*1024,64);_tile_loadd(7,b2+s*1024,64);_tile_loadd(5,a2+s*1024,64);
      _tile_dpbf16ps(0,4,6);_tile_dpbf16ps(1,4,7);_tile_dpbf16ps(2,5,6);_tile_dpbf16ps(3,5,7);
    }
    _tile_stored(0,c,128);_tile_stored(1,c+16,128);_tile_stored(2,c+512,128);_tile_stored(3,c+528,128);
  }
}
__attribute__((target("amx-tile,amx-bf16"))) int main(){
  if (syscall(SYS_arch_prctl,0x1023,18)) {puts("no amx");return 1;}
  struct tilecfg cfg; memset(&cfg,0,64); cfg.palette=1; for(int t=0;t<8;t++){cfg.colsb[t]=64;cfg.rows[t]=16;}
  _tile_loadconfig(&cfg);
  float c[32*32];
  long depths[]={256,384,576,768};
  for(int pf=0;pf<3;pf++) for(int d=0;d<4;d++){
    long dsteps=depths[d]/32, nblocks=10; // B panel = 320 cols
    char*a=aligned_alloc(64,dsteps*2048+65536); char*b=aligned_alloc(64,nblocks*dsteps*2048+65536);
    memset(a,0x3f,dsteps*2048+65536); memset(b,0x3f,nblocks*dsteps*2048+65536);
    long reps = (1L<<22)/depths[d];
    double best=1e9;
    for(int r=0;r<5;r++){double t=now(); for(long i=0;i<reps;i++) blockrow(dsteps, nblocks, a + MIS, b + MIS, c, pf > 0, pf == 1 ? 1 : 2); t=now()-t; if(t<best)best=t;}
    double flop = 2.0*32*32*depths[d]*nblocks*reps;
    printf("prefetch %d depth %4ld (A %3ld KB, B panel %4ld KB): %.0f GFLOP/s\n",pf,depths[d],dsteps*2,dsteps*2*nblocks,flop/best/1e9);
    free(a);free(b);
  }
}
