// What one core of this machine does with the AVX2 tiles of meet's generation kernels: the 3x4
// dot-product tile of its row-major kernels (7 loads per 12 FMAs), and the 6x16 broadcast tile of
// its batched packed kernel (2 panel loads + 6 broadcasts per 12 FMAs), data in L1. The AVX2 peak
// they are measured against (register-only FMAs) is scripts/cpu_ceiling.c's "f32 FMA, 256-bit".
//   gcc -O3 -mavx2 -mfma scripts/fma_ceiling.c -o /tmp/fma_ceiling && /tmp/fma_ceiling
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// One pass of the 3x4 dot tile over k columns: x holds 3 rows of k, w 4 rows of k.
static float tile_pass(const float *x, const float *w, int k) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
           a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int i = 0; i < k; i += 8) {
        __m256 x0 = _mm256_load_ps(x + i), x1 = _mm256_load_ps(x + k + i), x2 = _mm256_load_ps(x + 2 * k + i);
        __m256 w0 = _mm256_load_ps(w + i);
        a00 = _mm256_fmadd_ps(x0, w0, a00); a10 = _mm256_fmadd_ps(x1, w0, a10); a20 = _mm256_fmadd_ps(x2, w0, a20);
        __m256 w1 = _mm256_load_ps(w + k + i);
        a01 = _mm256_fmadd_ps(x0, w1, a01); a11 = _mm256_fmadd_ps(x1, w1, a11); a21 = _mm256_fmadd_ps(x2, w1, a21);
        __m256 w2 = _mm256_load_ps(w + 2 * k + i);
        a02 = _mm256_fmadd_ps(x0, w2, a02); a12 = _mm256_fmadd_ps(x1, w2, a12); a22 = _mm256_fmadd_ps(x2, w2, a22);
        __m256 w3 = _mm256_load_ps(w + 3 * k + i);
        a03 = _mm256_fmadd_ps(x0, w3, a03); a13 = _mm256_fmadd_ps(x1, w3, a13); a23 = _mm256_fmadd_ps(x2, w3, a23);
    }
    __m256 s0 = _mm256_add_ps(_mm256_add_ps(a00, a01), _mm256_add_ps(a02, a03));
    __m256 s1 = _mm256_add_ps(_mm256_add_ps(a10, a11), _mm256_add_ps(a12, a13));
    __m256 s2 = _mm256_add_ps(_mm256_add_ps(a20, a21), _mm256_add_ps(a22, a23));
    return _mm256_add_ps(s0, _mm256_add_ps(s1, s2))[0];
}

// One pass of 6 rows of x (each value broadcast) against a [k][16] panel: 12 named accumulators,
// as the Rust kernel's registers (an array of them makes gcc spill).
static float panel_pass(const float *x, const float *w, int k) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
           a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    for (int i = 0; i < k; i++) {
        __m256 w0 = _mm256_load_ps(w + 16 * i), w1 = _mm256_load_ps(w + 16 * i + 8), b;
        b = _mm256_broadcast_ss(x + i); a00 = _mm256_fmadd_ps(b, w0, a00); a01 = _mm256_fmadd_ps(b, w1, a01);
        b = _mm256_broadcast_ss(x + k + i); a10 = _mm256_fmadd_ps(b, w0, a10); a11 = _mm256_fmadd_ps(b, w1, a11);
        b = _mm256_broadcast_ss(x + 2 * k + i); a20 = _mm256_fmadd_ps(b, w0, a20); a21 = _mm256_fmadd_ps(b, w1, a21);
        b = _mm256_broadcast_ss(x + 3 * k + i); a30 = _mm256_fmadd_ps(b, w0, a30); a31 = _mm256_fmadd_ps(b, w1, a31);
        b = _mm256_broadcast_ss(x + 4 * k + i); a40 = _mm256_fmadd_ps(b, w0, a40); a41 = _mm256_fmadd_ps(b, w1, a41);
        b = _mm256_broadcast_ss(x + 5 * k + i); a50 = _mm256_fmadd_ps(b, w0, a50); a51 = _mm256_fmadd_ps(b, w1, a51);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a00, a01), _mm256_add_ps(a10, a11)),
                             _mm256_add_ps(_mm256_add_ps(a20, a21), _mm256_add_ps(a30, a31)));
    return _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a40, a41), _mm256_add_ps(a50, a51)))[0];
}

// GFLOP/s of `pass` (12 FMAs of 8 lanes per 8 columns for the tile, per column for the panel:
// `flops` per pass) over x of xn floats and w of wn, best of 200 repetitions of 1000 passes.
static double best_rate(float (*pass)(const float *, const float *, int), int xn, int wn, int k, double flops) {
    float *x = aligned_alloc(64, xn * 4), *w = aligned_alloc(64, wn * 4);
    for (int i = 0; i < xn; i++) x[i] = i * 1e-3f;
    for (int i = 0; i < wn; i++) w[i] = i * 1e-4f;
    double best = 1e9;
    volatile float sink = 0;
    for (int rep = 0; rep < 200; rep++) {
        double t0 = now();
        for (int it = 0; it < 1000; it++) sink += pass(x, w, k);
        double t = now() - t0;
        if (t < best) best = t;
    }
    free(x);
    free(w);
    return 1000.0 * flops / best / 1e9;
}

int main(void) {
    const int k = 576;
    printf("3x4 dot tile, k=576, L1: %.1f GFLOP/s per core\n", best_rate(tile_pass, 3 * k, 4 * k, k, 12.0 * k * 2));
    printf("6x16 broadcast tile, k=576, L1 and L2: %.1f GFLOP/s per core\n",
           best_rate(panel_pass, 6 * k, 16 * k, k, 12.0 * 8 * k * 2));
    return 0;
}
