// How fast one or two threads stream a buffer the size of batch-1 decoding's weights (85 MB, the
// Q4_1 SmolLM2-135M) with sequential vector loads: what the one-row kernel could reach if it were
// bound by bandwidth rather than by the latency of each line (README, Generation). A larger size
// (MB as the second argument, e.g. 540 for f32 weights) shows the rate beyond the last-level cache.
// 512-bit loads where built with -mavx512f, else 256-bit (-mavx2):
//   gcc -O2 -mavx512f -pthread scripts/read_bandwidth.c -o /tmp/read_bandwidth && /tmp/read_bandwidth 2 [MB]
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define PASSES 20

static char *buf;
static size_t per_thread;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#ifdef __AVX512F__
typedef __m512i vec;
#define ZERO _mm512_setzero_si512()
#define ADD_LOAD(acc, p) _mm512_add_epi32(acc, _mm512_load_si512(p))
#define LOW(acc) _mm512_cvtsi512_si32(acc)
#define CONSTRAINT "+v"
#else
typedef __m256i vec;
#define ZERO _mm256_setzero_si256()
#define ADD_LOAD(acc, p) _mm256_add_epi32(acc, _mm256_load_si256((const __m256i *)(p)))
#define LOW(acc) _mm256_extract_epi32(acc, 0)
#define CONSTRAINT "+x"
#endif

static void *stream(void *arg) {
    const char *p = buf + (size_t)arg * per_thread;
    vec acc = ZERO;
    for (int r = 0; r < PASSES; r++)
        for (size_t i = 0; i < per_thread; i += sizeof(vec)) {
            acc = ADD_LOAD(acc, p + i);
            // Keeps every load: the sum is otherwise loop-invariant across passes.
            __asm__ volatile("" : CONSTRAINT(acc));
        }
    return (void *)(size_t)LOW(acc);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    size_t mb = argc > 2 ? (size_t)atol(argv[2]) : 85;
    if (threads < 1 || threads > 64 || mb < 1) {
        fprintf(stderr, "usage: read_bandwidth [THREADS (1-64)] [MB]\n");
        return 2;
    }
    per_thread = (mb << 20) / threads / 64 * 64;
    buf = aligned_alloc(64, per_thread * threads);
    if (!buf) {
        fprintf(stderr, "cannot allocate %zu MB\n", mb);
        return 1;
    }
    for (size_t i = 0; i < per_thread * threads; i++) buf[i] = (char)i;
    pthread_t t[64];
    double t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, stream, (void *)(size_t)i);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    double dt = now() - t0;
    printf("%d thread(s), %zu MB: %.1f GB/s\n", threads, mb, (double)PASSES * per_thread * threads / dt / 1e9);
    return 0;
}
