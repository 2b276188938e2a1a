// What one core of this machine can do, for each kind of arithmetic `meet`'s products could use:
// register-only peaks (nothing but independent multiply-adds), and the GEMM register tile that a
// real product runs (a packed panel of B loaded, values of A broadcast, accumulators in registers,
// data in L1) — the tile is the ceiling a matrix product can approach, the peak is what the
// arithmetic units could do. Each part runs only where the CPU (and, for AMX, the kernel) has it.
//   gcc -O2 scripts/cpu_ceiling.c -o /tmp/cpu_ceiling && /tmp/cpu_ceiling
// FLOP counts: a multiply-add is 2 FLOP; a bf16 dot-product lane (vdpbf16ps) does 2 multiply-adds.
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define REPS 100000000L

// The core's clock: a chain of dependent register-to-register integer adds runs one per cycle on
// every x86 core of this century, so adds per second is cycles per second (turbo included). Not
// `add $1`: Intel's Golden Cove cores fold small immediate adds in the renamer (that chain ran at
// "19.3 GHz" on a Sapphire Rapids Xeon).
static double clock_ghz(void) {
    const long n = 1000000000L;
    long x = 0, one = 1;
    double t0 = now();
    for (long i = 0; i < n; i += 10)
        __asm__ volatile("add %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\t"
                         "add %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\tadd %1,%0"
                         : "+r"(x)
                         : "r"(one));
    return n / (now() - t0) / 1e9;
}

// Register-only peaks: twelve independent accumulators, one instruction `ins` into each per
// iteration, REPS iterations, `flops` per instruction. Written in assembly: with intrinsics gcc
// sees ten identical chains (same start, same operands), merges them into one and times one
// latency-bound chain as if it were ten (the figures of this script before 2026-12-02, and of
// scripts/fma_ceiling.c, were that artefact).
#define ACC12(ins, reg)                                                                              \
    ins " %%" reg "14,%%" reg "15,%%" reg "0\n\t" ins " %%" reg "14,%%" reg "15,%%" reg "1\n\t"       \
    ins " %%" reg "14,%%" reg "15,%%" reg "2\n\t" ins " %%" reg "14,%%" reg "15,%%" reg "3\n\t"       \
    ins " %%" reg "14,%%" reg "15,%%" reg "4\n\t" ins " %%" reg "14,%%" reg "15,%%" reg "5\n\t"       \
    ins " %%" reg "14,%%" reg "15,%%" reg "6\n\t" ins " %%" reg "14,%%" reg "15,%%" reg "7\n\t"       \
    ins " %%" reg "14,%%" reg "15,%%" reg "8\n\t" ins " %%" reg "14,%%" reg "15,%%" reg "9\n\t"       \
    ins " %%" reg "14,%%" reg "15,%%" reg "10\n\t" ins " %%" reg "14,%%" reg "15,%%" reg "11\n\t"
#define PEAK(name, isa, ins, reg, flops)                                                             \
    __attribute__((target(isa))) static double name(void) {                                          \
        long n = REPS;                                                                               \
        double t0 = now();                                                                           \
        __asm__ volatile("vxorps %%xmm14,%%xmm14,%%xmm14\n\tvxorps %%xmm15,%%xmm15,%%xmm15\n\t"     \
                         "1:\n\t" ACC12(ins, reg) "dec %0\n\tjnz 1b"                                   \
                         : "+r"(n)                                                                   \
                         :                                                                           \
                         : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",   \
                           "xmm9", "xmm10", "xmm11", "xmm14", "xmm15", "cc");                        \
        return REPS * 12.0 * (flops) / (now() - t0) / 1e9;                                           \
    }
PEAK(peak256, "avx2,fma", "vfmadd231ps", "ymm", 16)
PEAK(peak512, "avx512f", "vfmadd231ps", "zmm", 32)
// A vdpbf16ps lane does two multiply-adds: 16 lanes x 2 x 2 FLOP.
PEAK(peak_bf16, "avx512f,avx512bf16", "vdpbf16ps", "zmm", 64)

// The 12 x 32 f32 tile: per step of k, two 16-lane loads of the B panel and twelve broadcasts of A
// into 24 accumulators (what a packed AVX-512 SGEMM's inner loop is). The accumulators are named
// variables: as an array gcc keeps them in memory (a load and a store around every FMA).
#define DECL2(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0;
#define DECL12 DECL2(0) DECL2(1) DECL2(2) DECL2(3) DECL2(4) DECL2(5) DECL2(6) DECL2(7) DECL2(8) DECL2(9) DECL2(a) DECL2(b)
#define ROWS12(R) R(0, 0) R(1, 1) R(2, 2) R(3, 3) R(4, 4) R(5, 5) R(6, 6) R(7, 7) R(8, 8) R(9, 9) R(a, 10) R(b, 11)
#define STORE2(i, n)                                                                                    \
    _mm512_storeu_ps(c + n * 32, _mm512_add_ps(c##i##0, _mm512_loadu_ps(c + n * 32)));                   \
    _mm512_storeu_ps(c + n * 32 + 16, _mm512_add_ps(c##i##1, _mm512_loadu_ps(c + n * 32 + 16)));
#define FMA2(i, n)                                                                                      \
    {                                                                                                   \
        __m512 ai = _mm512_set1_ps(a[p * 12 + n]);                                                      \
        c##i##0 = _mm512_fmadd_ps(ai, b0, c##i##0);                                                     \
        c##i##1 = _mm512_fmadd_ps(ai, b1, c##i##1);                                                     \
    }
__attribute__((target("avx512f"), noinline)) static void tile512(long kc, const float *a, const float *b, float *c) {
    DECL12
    for (long p = 0; p < kc; p++) {
        __m512 b0 = _mm512_load_ps(b + p * 32), b1 = _mm512_load_ps(b + p * 32 + 16);
        ROWS12(FMA2)
    }
    ROWS12(STORE2)
}

// The same tile in bf16: each step covers two values of k (a pair of bf16 per 32-bit lane).
#define DP2(i, n)                                                                                       \
    {                                                                                                   \
        __m512bh ai = (__m512bh)_mm512_set1_ps(a[p * 12 + n]);                                          \
        c##i##0 = _mm512_dpbf16_ps(c##i##0, ai, b0);                                                    \
        c##i##1 = _mm512_dpbf16_ps(c##i##1, ai, b1);                                                    \
    }
__attribute__((target("avx512f,avx512bf16"), noinline)) static void tile_bf16(long kc, const float *a, const float *b,
                                                                               float *c) {
    DECL12
    for (long p = 0; p < kc / 2; p++) {
        __m512bh b0 = (__m512bh)_mm512_load_si512(b + p * 32), b1 = (__m512bh)_mm512_load_si512(b + p * 32 + 16);
        ROWS12(DP2)
    }
    ROWS12(STORE2)
}

// GFLOP/s of a tile over depth kc (both panels in L1), best of 20 runs of `reps` calls.
static double tile_rate(void (*tile)(long, const float *, const float *, float *), long kc, double flops_per_call) {
    float *a = aligned_alloc(64, kc * 12 * 4), *b = aligned_alloc(64, kc * 32 * 4), *c = aligned_alloc(64, 12 * 32 * 4);
    for (long i = 0; i < kc * 12; i++) a[i] = 1e-3f;
    for (long i = 0; i < kc * 32; i++) b[i] = 1e-3f;
    memset(c, 0, 12 * 32 * 4);
    const long reps = 20000;
    double best = 1e9;
    for (int r = 0; r < 20; r++) {
        double t0 = now();
        for (long i = 0; i < reps; i++) tile(kc, a, b, c);
        double t = now() - t0;
        if (t < best) best = t;
    }
    volatile float sink = c[5];
    (void)sink;
    free(a);
    free(b);
    free(c);
    return reps * flops_per_call / best / 1e9;
}

// AMX: tdpbf16ps multiplies a 16 x 32 bf16 tile by a 32 x 16 one (as 16 x 16 pairs) into 16 x 16
// f32: 16*16*32 multiply-adds per instruction. Four independent accumulators, operands in tiles.
struct tilecfg {
    unsigned char palette, start;
    unsigned char reserved[14];
    unsigned short colsb[16];
    unsigned char rows[16];
};

__attribute__((target("amx-tile,amx-bf16"))) static double peak_amx(void) {
    struct tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    static unsigned short buf[16 * 32] __attribute__((aligned(64)));
    for (int i = 0; i < 16 * 32; i++) buf[i] = 0x3c00;
    _tile_loadconfig(&cfg);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, buf, 64); _tile_loadd(5, buf, 64); _tile_loadd(6, buf, 64); _tile_loadd(7, buf, 64);
    const long reps = REPS / 20;
    double t0 = now();
    for (long i = 0; i < reps; i++) {
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    double t = now() - t0;
    static float out[16 * 16] __attribute__((aligned(64)));
    _tile_stored(0, out, 64);
    _tile_release();
    volatile float sink = out[3];
    (void)sink;
    return reps * 4.0 * 16 * 16 * 32 * 2 / t / 1e9;
}

int main(void) {
    __builtin_cpu_init();
    double ghz = clock_ghz();
    printf("per core, GFLOP/s (clock %.2f GHz; FLOP per cycle in brackets)\n", ghz);
#define SHOW(label, rate)                                                                               \
    do {                                                                                                \
        double r_ = (rate);                                                                             \
        printf("  %-40s %7.1f  (%5.1f)\n", label, r_, r_ / ghz);                                        \
    } while (0)
    // meet's AVX2 tiles: scripts/fma_ceiling.c.
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        printf("  no AVX2 + FMA: nothing to measure\n");
        return 0;
    }
    SHOW("f32 FMA, 256-bit registers (peak):", peak256());
    if (!__builtin_cpu_supports("avx512f")) {
        printf("  no AVX-512 F: the 512-bit and bf16 parts are skipped\n");
        return 0;
    }
    SHOW("f32 FMA, 512-bit registers (peak):", peak512());
    SHOW("f32 12x32 GEMM tile, k=256, L1:", tile_rate(tile512, 256, 2.0 * 12 * 32 * 256));
    if (!__builtin_cpu_supports("avx512bf16")) {
        printf("  no AVX512_BF16: the bf16 parts are skipped\n");
        return 0;
    }
    SHOW("bf16 dot product vdpbf16ps (peak):", peak_bf16());
    SHOW("bf16 12x32 GEMM tile, k=512, L1:", tile_rate(tile_bf16, 512, 2.0 * 12 * 32 * 512));
    // AMX needs the kernel's permission for its tile state (Linux 5.16+).
    if (!__builtin_cpu_supports("amx-bf16") || syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) != 0) {
        printf("  no AMX-BF16 (or the kernel refuses its tile state): skipped\n");
        return 0;
    }
    SHOW("bf16 AMX tdpbf16ps (peak):", peak_amx());
    return 0;
}
