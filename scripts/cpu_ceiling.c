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

#define REPS 50000000L

// A register-only peak: ten independent accumulators, `op(acc, b, c)` REPS times each, `flops`
// per instruction. Each use below is one function compiled for its own instruction set.
#define PEAK(name, isa, vec, zero, b_init, c_init, op, reduce, flops)                                  \
    __attribute__((target(isa))) static double name(void) {                                            \
        vec a0 = zero, a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0;      \
        const __typeof__(b_init) b = b_init, c = c_init;                                                   \
        double t0 = now();                                                                                 \
        for (long i = 0; i < REPS; i++) {                                                                  \
            a0 = op(a0, b, c); a1 = op(a1, b, c); a2 = op(a2, b, c); a3 = op(a3, b, c); a4 = op(a4, b, c); \
            a5 = op(a5, b, c); a6 = op(a6, b, c); a7 = op(a7, b, c); a8 = op(a8, b, c); a9 = op(a9, b, c); \
        }                                                                                                  \
        double t = now() - t0;                                                                             \
        volatile float sink = reduce(a0) + reduce(a1) + reduce(a2) + reduce(a3) + reduce(a4) + reduce(a5) + \
                              reduce(a6) + reduce(a7) + reduce(a8) + reduce(a9);                           \
        (void)sink;                                                                                        \
        return REPS * 10.0 * (flops) / t / 1e9;                                                            \
    }

#define FMA512(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FIRST512(v) _mm512_reduce_add_ps(v)
PEAK(peak512, "avx512f", __m512, _mm512_set1_ps(0.1f), _mm512_set1_ps(0.9999f), _mm512_set1_ps(0.0001f), FMA512,
     FIRST512, 32)
// bf16 1.0 and 2^-7 in every half of every lane: 16 lanes x 2 multiply-adds.
#define DP(a, b, c) _mm512_dpbf16_ps(a, b, c)
PEAK(peak_bf16, "avx512f,avx512bf16", __m512, _mm512_setzero_ps(), (__m512bh)_mm512_set1_epi16(0x3f80),
     (__m512bh)_mm512_set1_epi16(0x3c00), DP, FIRST512, 64)

// The 12 x 32 f32 tile: per step of k, two 16-lane loads of the B panel and twelve broadcasts of A
// into 24 accumulators (what a packed AVX-512 SGEMM's inner loop is).
__attribute__((target("avx512f"), noinline)) static void tile512(long kc, const float *a, const float *b, float *c) {
    __m512 acc[12][2];
    for (int i = 0; i < 12; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long p = 0; p < kc; p++) {
        __m512 b0 = _mm512_load_ps(b + p * 32), b1 = _mm512_load_ps(b + p * 32 + 16);
        for (int i = 0; i < 12; i++) {
            __m512 ai = _mm512_set1_ps(a[p * 12 + i]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < 12; i++) {
        _mm512_storeu_ps(c + i * 32, _mm512_add_ps(acc[i][0], _mm512_loadu_ps(c + i * 32)));
        _mm512_storeu_ps(c + i * 32 + 16, _mm512_add_ps(acc[i][1], _mm512_loadu_ps(c + i * 32 + 16)));
    }
}

// The same tile in bf16: each step covers two values of k (a pair of bf16 per 32-bit lane).
__attribute__((target("avx512f,avx512bf16"), noinline)) static void tile_bf16(long kc, const float *a, const float *b,
                                                                               float *c) {
    __m512 acc[12][2];
    for (int i = 0; i < 12; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long p = 0; p < kc / 2; p++) {
        __m512bh b0 = (__m512bh)_mm512_load_si512(b + p * 32), b1 = (__m512bh)_mm512_load_si512(b + p * 32 + 16);
        for (int i = 0; i < 12; i++) {
            __m512bh ai = (__m512bh)_mm512_set1_ps(a[p * 12 + i]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
        }
    }
    for (int i = 0; i < 12; i++) {
        _mm512_storeu_ps(c + i * 32, _mm512_add_ps(acc[i][0], _mm512_loadu_ps(c + i * 32)));
        _mm512_storeu_ps(c + i * 32 + 16, _mm512_add_ps(acc[i][1], _mm512_loadu_ps(c + i * 32 + 16)));
    }
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
    printf("per core, GFLOP/s\n");
    // The AVX2 peak and meet's AVX2 tiles: scripts/fma_ceiling.c.
    if (!__builtin_cpu_supports("avx512f")) {
        printf("  no AVX-512 F: the 512-bit and bf16 parts are skipped\n");
        return 0;
    }
    printf("  f32 FMA, 512-bit registers (peak):      %7.1f\n", peak512());
    printf("  f32 12x32 GEMM tile, k=256, L1:         %7.1f\n", tile_rate(tile512, 256, 2.0 * 12 * 32 * 256));
    if (!__builtin_cpu_supports("avx512bf16")) {
        printf("  no AVX512_BF16: the bf16 parts are skipped\n");
        return 0;
    }
    printf("  bf16 dot product vdpbf16ps (peak):      %7.1f\n", peak_bf16());
    printf("  bf16 12x32 GEMM tile, k=512, L1:        %7.1f\n", tile_rate(tile_bf16, 512, 2.0 * 12 * 32 * 512));
    // AMX needs the kernel's permission for its tile state (Linux 5.16+).
    if (!__builtin_cpu_supports("amx-bf16") || syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) != 0) {
        printf("  no AMX-BF16 (or the kernel refuses its tile state): skipped\n");
        return 0;
    }
    printf("  bf16 AMX tdpbf16ps (peak):              %7.1f\n", peak_amx());
    return 0;
}
