/* phi3's CPU kernels for packed weights: y = x @ W^T with W stored as int4 or int8 blocks.
 *
 * Exact in fp32: each weight is dequantized in registers as `phi3.quantize.dequantize` defines it
 * (q * scale + bias in fp32; here one fma, so at most one rounding apart) and multiplied with fp32
 * activations, so the result equals `x @ dequantize(W).T` up to fp32 rounding and the order of the
 * sums. Decoding reads 0.56 (int4) or 1.06 (int8) bytes per weight instead of 4.
 *
 * Layouts (phi3/quantize.py): int4 `w` uint8 (N, K/2), per block of 32 columns byte j holds column
 * j (low nibble) and j + 16 (high nibble) (GGUF's Q4); int8 `w` int8 (N, K); `scales` and `biases`
 * fp16 (N, G), G groups of K/G columns. x (M, K) and y (M, N) fp32, contiguous.
 *
 * Built on first use by phi3/kernels.py with the machine's C compiler (-O3 -march=native
 * -fopenmp); AVX2+FMA+F16C where the CPU has them, NEON on arm64, portable C otherwise (and with
 * -DPHI3_PORTABLE). Threads: parallel.h.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "packed.h"

#include "parallel.h"

#define MR 4 /* rows of x that share one pass over the weights (8 where there is a q*_row8) */
#define A16_MR 8 /* the same with int16 activations */

/* The row functions: y[m, n] for rows m0.. of x and one weight row n. */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(PHI3_PORTABLE)
#include <immintrin.h>

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The four 8-weight vectors (columns 0-7, 8-15, 16-23, 24-31) of the int4 block at p, dequantized
 * as w = q * s + b (the fp32 operations of `dequantize`, rounded once by the fma). The block's bytes
 * are zero-extended to 32-bit lanes straight from memory: a byte's low nibble is column k, its high
 * one (byte >> 4: no mask needed) column k + 16. `low4` is _mm256_set1_epi32(0x0F). */
#define Q4_EXPAND(p, s, b, w)                                                                          \
    do {                                                                                               \
        const __m256i b0_ = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)));                \
        const __m256i b1_ = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((p) + 8)));          \
        w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0_, low4)), s, b);                  \
        w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1_, low4)), s, b);                  \
        w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0_, 4)), s, b);                    \
        w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1_, 4)), s, b);                    \
    } while (0)

#if defined(__AVX512F__) && !defined(PHI3_NO_AVX512)
/* x's 32 columns of block j times the int4 block at wr + j * 16 (w = q * s + b, as Q4_EXPAND), into
 * accumulators lo (columns 0-15: the bytes' low nibbles) and hi (16-31: the high ones). */
#define Q4_FMA16(j, s, b, lo, hi)                                                                          \
    do {                                                                                                  \
        const __m512i q_ = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr + (j) * 16)));       \
        lo = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q_, low4)), s, b),         \
                             _mm512_loadu_ps(x + (j) * 32), lo);                                           \
        hi = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q_, 4)), s, b),           \
                             _mm512_loadu_ps(x + (j) * 32 + 16), hi);                                      \
    } while (0)

/* One row of x (decoding one sequence) on 512-bit registers: a block's 16 bytes widen to 16 lanes;
 * blocks taken in pairs (across groups where a group is one block) for four accumulators. */
static float q4_dot1(const float *x, const uint8_t *wr, const uint16_t *sr, const uint16_t *br, int64_t K, int64_t G) {
    const int64_t bpg = K / 32 / G; /* blocks of 32 columns per group */
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    float sf[16], bf[16]; /* sixteen groups' scales and biases in fp32 */
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
        const int64_t n = G - g0 < 16 ? G - g0 : 16;
        if (n == 16) {
            _mm512_storeu_ps(sf, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sr + g0))));
            _mm512_storeu_ps(bf, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(br + g0))));
        } else {
            for (int64_t i = 0; i < n; i++) sf[i] = half_to_float(sr[g0 + i]), bf[i] = half_to_float(br[g0 + i]);
        }
        if (bpg == 1) {
            int64_t i = 0;
            for (; i + 2 <= n; i += 2) {
                Q4_FMA16(g0 + i, _mm512_set1_ps(sf[i]), _mm512_set1_ps(bf[i]), a0, a1);
                Q4_FMA16(g0 + i + 1, _mm512_set1_ps(sf[i + 1]), _mm512_set1_ps(bf[i + 1]), a2, a3);
            }
            if (i < n) Q4_FMA16(g0 + i, _mm512_set1_ps(sf[i]), _mm512_set1_ps(bf[i]), a0, a1);
            continue;
        }
        for (int64_t i = 0; i < n; i++) {
            const __m512 s = _mm512_set1_ps(sf[i]), b = _mm512_set1_ps(bf[i]);
            int64_t j = (g0 + i) * bpg;
            for (; j + 2 <= (g0 + i + 1) * bpg; j += 2) {
                Q4_FMA16(j, s, b, a0, a1);
                Q4_FMA16(j + 1, s, b, a2, a3);
            }
            if (j < (g0 + i + 1) * bpg) Q4_FMA16(j, s, b, a0, a1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#else
/* One row of x (decoding one sequence): four accumulators, so no fma waits on the one before it. */
static float q4_dot1(const float *x, const uint8_t *wr, const uint16_t *sr, const uint16_t *br, int64_t K, int64_t G) {
    const int64_t bpg = K / 32 / G; /* blocks of 32 columns per group */
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, w[4];
    float sf[8], bf[8]; /* eight groups' scales and biases in fp32: broadcast from memory, a load each */
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
        const int64_t n = G - g0 < 8 ? G - g0 : 8;
        if (n == 8) {
            _mm256_storeu_ps(sf, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + g0))));
            _mm256_storeu_ps(bf, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(br + g0))));
        } else {
            for (int64_t i = 0; i < n; i++) sf[i] = half_to_float(sr[g0 + i]), bf[i] = half_to_float(br[g0 + i]);
        }
        for (int64_t i = 0; i < n; i++) {
            const __m256 s = _mm256_broadcast_ss(sf + i), b = _mm256_broadcast_ss(bf + i);
            for (int64_t j = (g0 + i) * bpg; j < (g0 + i + 1) * bpg; j++) {
                const float *xr = x + j * 32;
                Q4_EXPAND(wr + j * 16, s, b, w);
                a0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xr), a0);
                a1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), a1);
                a2 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), a2);
                a3 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), a3);
            }
        }
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}
#endif

/* mr (<= MR) rows of x, two accumulators each; always inlined so that mr = MR and mr = 2 unroll */
static inline __attribute__((always_inline)) void q4_row_mr(const float *x, const uint8_t *wr, const uint16_t *sr,
        const uint16_t *br, float *y, int64_t m0, int mr, int64_t n, int64_t N, int64_t K, int64_t G) {
    if (mr == 1) {
        y[m0 * N + n] = q4_dot1(x + m0 * K, wr, sr, br, K, G);
        return;
    }
    const int64_t bpg = K / 32 / G;
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    __m256 a0[MR], a1[MR], w[4];
    for (int i = 0; i < MR; i++) a0[i] = a1[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m256 s = _mm256_set1_ps(half_to_float(sr[g])), b = _mm256_set1_ps(half_to_float(br[g]));
        for (int64_t j = g * bpg; j < (g + 1) * bpg; j++) {
            Q4_EXPAND(wr + j * 16, s, b, w);
            for (int i = 0; i < mr; i++) {
                const float *xr = x + (m0 + i) * K + j * 32;
                a0[i] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xr), a0[i]);
                a1[i] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), a1[i]);
                a0[i] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), a0[i]);
                a1[i] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), a1[i]);
            }
        }
    }
    for (int i = 0; i < mr; i++) y[(m0 + i) * N + n] = hsum(_mm256_add_ps(a0[i], a1[i]));
}

static void q4_row(const float *x, const uint8_t *wr, const uint16_t *sr, const uint16_t *br, float *y, int64_t m0,
                   int mr, int64_t n, int64_t N, int64_t K, int64_t G) {
    if (mr == MR) q4_row_mr(x, wr, sr, br, y, m0, MR, n, N, K, G);
    else if (mr == 2) q4_row_mr(x, wr, sr, br, y, m0, 2, n, N, K, G);
    else q4_row_mr(x, wr, sr, br, y, m0, mr, n, N, K, G);
}

/* Eight rows of x share one expansion of each block, one accumulator per row: eight independent
 * fma chains (more would not fit the 16 registers). */
static void q4_row8(const float *x, const uint8_t *wr, const uint16_t *sr, const uint16_t *br, float *y,
                    int64_t m0, int64_t n, int64_t N, int64_t K, int64_t G) {
    const int64_t bpg = K / 32 / G;
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    const float *x0 = x + m0 * K;
    __m256 a[8], w[4];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m256 s = _mm256_set1_ps(half_to_float(sr[g])), b = _mm256_set1_ps(half_to_float(br[g]));
        for (int64_t j = g * bpg; j < (g + 1) * bpg; j++) {
            Q4_EXPAND(wr + j * 16, s, b, w);
            for (int v = 0; v < 4; v++)
                for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x0 + i * K + j * 32 + v * 8), a[i]);
        }
    }
    for (int i = 0; i < 8; i++) y[(m0 + i) * N + n] = hsum(a[i]);
}

/* int8: gs (columns per group) is a multiple of 16 */
static inline __m256 q8_load8(const int8_t *p, __m256 s) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))), s);
}

#if defined(__AVX512F__) && !defined(PHI3_NO_AVX512)
static inline __m512 q8_load16(const int8_t *p, __m512 s) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))), s);
}

/* One row of x on 512-bit registers: w = q * s as below, four accumulators (groups of 16n columns). */
static float q8_dot1(const float *x, const int8_t *wr, const uint16_t *sr, int64_t K, int64_t G) {
    const int64_t gs = K / G;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t g = 0, k = 0; g < G; g++) {
        const int64_t end = (g + 1) * gs;
        const __m512 s = _mm512_set1_ps(half_to_float(sr[g]));
        for (; k + 64 <= end; k += 64) {
            a0 = _mm512_fmadd_ps(q8_load16(wr + k, s), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(q8_load16(wr + k + 16, s), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(q8_load16(wr + k + 32, s), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(q8_load16(wr + k + 48, s), _mm512_loadu_ps(x + k + 48), a3);
        }
        for (; k < end; k += 16) a0 = _mm512_fmadd_ps(q8_load16(wr + k, s), _mm512_loadu_ps(x + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#else
static float q8_dot1(const float *x, const int8_t *wr, const uint16_t *sr, int64_t K, int64_t G) {
    const int64_t gs = K / G;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t g = 0, k = 0; g < G; g++) {
        const int64_t end = (g + 1) * gs;
        const __m256 s = _mm256_set1_ps(half_to_float(sr[g]));
        for (; k + 32 <= end; k += 32) {
            a0 = _mm256_fmadd_ps(q8_load8(wr + k, s), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(q8_load8(wr + k + 8, s), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(q8_load8(wr + k + 16, s), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(q8_load8(wr + k + 24, s), _mm256_loadu_ps(x + k + 24), a3);
        }
        for (; k < end; k += 16) {
            a0 = _mm256_fmadd_ps(q8_load8(wr + k, s), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(q8_load8(wr + k + 8, s), _mm256_loadu_ps(x + k + 8), a1);
        }
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}
#endif

static inline __attribute__((always_inline)) void q8_row_mr(const float *x, const int8_t *wr, const uint16_t *sr,
        float *y, int64_t m0, int mr, int64_t n, int64_t N, int64_t K, int64_t G) {
    if (mr == 1) {
        y[m0 * N + n] = q8_dot1(x + m0 * K, wr, sr, K, G);
        return;
    }
    const int64_t gs = K / G;
    __m256 a0[MR], a1[MR];
    for (int i = 0; i < MR; i++) a0[i] = a1[i] = _mm256_setzero_ps();
    for (int64_t g = 0, k = 0; g < G; g++) {
        const int64_t end = (g + 1) * gs;
        const __m256 s = _mm256_set1_ps(half_to_float(sr[g]));
        for (; k < end; k += 16) {
            const __m256 w0 = q8_load8(wr + k, s), w1 = q8_load8(wr + k + 8, s);
            for (int i = 0; i < mr; i++) {
                const float *xr = x + (m0 + i) * K + k;
                a0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a0[i]);
                a1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), a1[i]);
            }
        }
    }
    for (int i = 0; i < mr; i++) y[(m0 + i) * N + n] = hsum(_mm256_add_ps(a0[i], a1[i]));
}

static void q8_row(const float *x, const int8_t *wr, const uint16_t *sr, float *y, int64_t m0, int mr, int64_t n,
                   int64_t N, int64_t K, int64_t G) {
    if (mr == MR) q8_row_mr(x, wr, sr, y, m0, MR, n, N, K, G);
    else if (mr == 2) q8_row_mr(x, wr, sr, y, m0, 2, n, N, K, G);
    else q8_row_mr(x, wr, sr, y, m0, mr, n, N, K, G);
}

static void q8_row8(const float *x, const int8_t *wr, const uint16_t *sr, float *y, int64_t m0, int64_t n,
                    int64_t N, int64_t K, int64_t G) {
    const int64_t gs = K / G;
    const float *x0 = x + m0 * K;
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t g = 0, k = 0; g < G; g++) {
        const int64_t end = (g + 1) * gs;
        const __m256 s = _mm256_set1_ps(half_to_float(sr[g]));
        for (; k < end; k += 8) {
            const __m256 w = q8_load8(wr + k, s);
            for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x0 + i * K + k), a[i]);
        }
    }
    for (int i = 0; i < 8; i++) y[(m0 + i) * N + n] = hsum(a[i]);
}

/* fp32 weights (a dense layer in a decode step run by layer.c): the same blocking, no expansion */
static float f32_dot1(const float *x, const float *wr, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += wr[k] * x[k];
    return s;
}

static void f32_row(const float *x, const float *wr, float *y, int64_t m0, int mr, int64_t n, int64_t N, int64_t K) {
    for (int i = 0; i < mr; i++) y[(m0 + i) * N + n] = f32_dot1(x + (m0 + i) * K, wr, K);
}

/* fp32 weights, two or more rows of x (a batch of sequences): six weight rows at a time, against
 * the rows of x in pairs, so that each 8-float load of weights feeds two fmas and each load of x six
 * (twelve accumulators in registers). K is walked in chunks of F32_KC columns, and within a chunk
 * every pair of up to eight rows of x runs in turn, so the chunk's weights (6 x 1 KiB) and x (8 x
 * 1 KiB) are read from L1; the partial sums wait in `acc` between chunks (against oneDNN: docs/PERFORMANCE.md). */
#define F32_NW 6
#define F32_KC 256

static inline void f32_tile6(const float *x, const float *wr, __m256 *acc, int mx, int64_t K, int64_t k0, int64_t k1) {
    __m256 a[F32_NW][2];
    for (int j = 0; j < F32_NW; j++) { a[j][0] = acc[j]; a[j][1] = mx == 2 ? acc[F32_NW + j] : _mm256_setzero_ps(); }
    for (int64_t k = k0; k < k1; k += 8) {
        __m256 v[F32_NW];
        for (int j = 0; j < F32_NW; j++) v[j] = _mm256_loadu_ps(wr + j * K + k);
        const __m256 u0 = _mm256_loadu_ps(x + k);
        for (int j = 0; j < F32_NW; j++) a[j][0] = _mm256_fmadd_ps(v[j], u0, a[j][0]);
        if (mx == 2) {
            const __m256 u1 = _mm256_loadu_ps(x + K + k);
            for (int j = 0; j < F32_NW; j++) a[j][1] = _mm256_fmadd_ps(v[j], u1, a[j][1]);
        }
    }
    for (int j = 0; j < F32_NW; j++) { acc[j] = a[j][0]; if (mx == 2) acc[F32_NW + j] = a[j][1]; }
}

/* y[m0 .. m0 + mb, n .. n + 6] for mb <= 8 rows of x; K a multiple of 8 */
static void f32_block6(const float *x, const float *wr, float *y, int64_t m0, int mb, int64_t n, int64_t N, int64_t K) {
    __m256 acc[8 * F32_NW];
    for (int i = 0; i < mb * F32_NW; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += F32_KC) {
        const int64_t k1 = k0 + F32_KC < K ? k0 + F32_KC : K;
        for (int i = 0; i < mb; i += 2) {
            const float *xr = x + (m0 + i) * K;
            if (mb - i >= 2) f32_tile6(xr, wr, acc + i * F32_NW, 2, K, k0, k1); /* constant mx: two copies inlined */
            else f32_tile6(xr, wr, acc + i * F32_NW, 1, K, k0, k1);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < F32_NW; j++) y[(m0 + i) * N + n + j] = hsum(acc[i * F32_NW + j]);
}

/* -- int16 activations (opt-in: `activations="int16"`) ----------------------------------------------
 * Each row of x is rounded to int16 per block of 32 columns, q = round(x * 32767 / max|x|) with the
 * block's d = max|x| / 32767 and its fp32 sum kept (act16_quantize_block), and then
 *     y = sum over blocks  s_w d (sum_k q_w q)  +  sum over groups  b_w (sum_k x)
 * with the integer dot exact (int4: |sum| <= 32 * 15 * 32767 < 2^24, exact even in fp32). The only
 * error is x's rounding, at most d / 2 per element (~2^-16 of the block's largest; bf16 activations
 * are 2^-9 of each element). Two vpmaddwd per 32 weights replace expanding them to fp32 (four
 * conversions and eight fmas): faster than the fp32-activation kernels at one row, less so at 8 rows,
 * where those share each expanded block among the rows (docs/PERFORMANCE.md). A row's
 * result does not depend on the other rows of x (same operations, same order), so batching keeps
 * it. Needs K and the group size to be multiples of 32 (kernels.py checks). */

static void act16_quantize_block(const float *x, int16_t *q, float *d, float *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
                 v3 = _mm256_loadu_ps(x + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float top = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    const __m256 inv = _mm256_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    /* packs works within 128-bit lanes: [0-3 8-11 | 4-7 12-15] -> permute to 0-15 */
    _mm256_storeu_si256((__m256i *)q, _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8));
    _mm256_storeu_si256((__m256i *)(q + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8));
    *d = top / 32767.0f;
    *sum = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
}

/* block j of a weight row as int16: columns 0-15 in lo, 16-31 in hi (int4 when `br` is given, else int8) */
static inline __attribute__((always_inline)) void a16_expand(const uint8_t *wr, const uint16_t *br, int64_t j, __m256i *lo,
                                                             __m256i *hi, __m256i low4) {
    if (br) {
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wr + j * 16)));
        *lo = _mm256_and_si256(b, low4), *hi = _mm256_srli_epi16(b, 4);
    } else {
        *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wr + j * 32)));
        *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wr + j * 32 + 16)));
    }
}

/* the block's integer dot with 32 int16 activations at q, in 8 fp32 lanes (exact for int4) */
static inline __attribute__((always_inline)) __m256 a16_dot(__m256i lo, __m256i hi, const int16_t *q) {
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)q)),
                                               _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(q + 16)))));
}

/* mr (<= A16_MR) rows of x against one weight row: q (mr, K) int16, d (mr, K/32) block scales, gsum
 * (mr, G) the rows' group sums (int4 only); y[i * N] for row i. Weights int4 (`biases` given) or int8.
 * One accumulator per row, whatever mr is, so that a row's sums do not depend on the others. */
static inline __attribute__((always_inline)) void a16_rows(const int16_t *q, const float *d, const float *gsum,
        const uint8_t *wr, const uint16_t *sr, const uint16_t *br, float *y, int mr, int64_t N, int64_t K, int64_t G) {
    const int64_t nb = K / 32, bpg = nb / G;
    const __m256i low4 = _mm256_set1_epi16(0x0F);
    __m256 acc[A16_MR];
    for (int i = 0; i < mr; i++) acc[i] = _mm256_setzero_ps();
    int64_t g = 0, left = bpg; /* the group of the next block, and its blocks still to come (no divisions) */
    float sg = half_to_float(sr[0]);
    for (int64_t j0 = 0; j0 < nb; j0 += 8) {
        const int n8 = nb - j0 < 8 ? (int)(nb - j0) : 8;
        float sw[8], cf[A16_MR][8]; /* the blocks' weight scales; times each row's d */
        if (bpg == 1 && n8 == 8) _mm256_storeu_ps(sw, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + j0))));
        else if (bpg == 1)
            for (int t = 0; t < n8; t++) sw[t] = half_to_float(sr[j0 + t]);
        else
            for (int t = 0; t < n8; t++) {
                sw[t] = sg;
                if (--left == 0 && ++g < G) sg = half_to_float(sr[g]), left = bpg;
            }
        if (n8 == 8) {
            const __m256 s8 = _mm256_loadu_ps(sw);
            for (int i = 0; i < mr; i++) _mm256_storeu_ps(cf[i], _mm256_mul_ps(s8, _mm256_loadu_ps(d + i * nb + j0)));
        } else {
            for (int i = 0; i < mr; i++)
                for (int t = 0; t < n8; t++) cf[i][t] = sw[t] * d[i * nb + j0 + t];
        }
        int t = 0;
        for (; t + 2 <= n8; t += 2) { /* two blocks: each row's pair of products summed, then added */
            __m256i lo[2], hi[2];
            a16_expand(wr, br, j0 + t, lo, hi, low4);
            a16_expand(wr, br, j0 + t + 1, lo + 1, hi + 1, low4);
            for (int i = 0; i < mr; i++) {
                const int16_t *qr = q + i * K + (j0 + t) * 32;
                const __m256 p0 = _mm256_mul_ps(a16_dot(lo[0], hi[0], qr), _mm256_broadcast_ss(&cf[i][t]));
                acc[i] = _mm256_add_ps(acc[i], _mm256_fmadd_ps(a16_dot(lo[1], hi[1], qr + 32), _mm256_broadcast_ss(&cf[i][t + 1]), p0));
            }
        }
        if (t < n8) { /* an odd block at the end */
            __m256i lo[1], hi[1];
            a16_expand(wr, br, j0 + t, lo, hi, low4);
            for (int i = 0; i < mr; i++)
                acc[i] = _mm256_fmadd_ps(a16_dot(lo[0], hi[0], q + i * K + (j0 + t) * 32), _mm256_broadcast_ss(&cf[i][t]), acc[i]);
        }
    }
    for (int i = 0; i < mr; i++) {
        float bias = 0.0f; /* sum over groups of b_w times the group's sum of x */
        if (br) {
            int64_t k = 0; /* a group */
            __m256 b8 = _mm256_setzero_ps();
            for (; k + 8 <= G; k += 8)
                b8 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(br + k))), _mm256_loadu_ps(gsum + i * G + k), b8);
            bias = hsum(b8);
            for (; k < G; k++) bias += half_to_float(br[k]) * gsum[i * G + k];
        }
        y[i * N] = hsum(acc[i]) + bias;
    }
}

static void a16_row(const int16_t *q, const float *d, const float *gsum, const uint8_t *wr, const uint16_t *sr,
                    const uint16_t *br, float *y, int mr, int64_t N, int64_t K, int64_t G) {
    if (mr == A16_MR) a16_rows(q, d, gsum, wr, sr, br, y, A16_MR, N, K, G); /* constant mr: unrolled copies */
    else if (mr == 1) a16_rows(q, d, gsum, wr, sr, br, y, 1, N, K, G);
    else a16_rows(q, d, gsum, wr, sr, br, y, mr, N, K, G);
}

#define ROW8 1

static void q4_dequant_row(const uint8_t *wr, const uint16_t *sr, const uint16_t *br, float *out, int64_t K, int64_t G) {
    const int64_t bpg = K / 32 / G;
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    __m256 w[4];
    for (int64_t g = 0; g < G; g++) {
        const __m256 s = _mm256_set1_ps(half_to_float(sr[g])), b = _mm256_set1_ps(half_to_float(br[g]));
        for (int64_t j = g * bpg; j < (g + 1) * bpg; j++) {
            Q4_EXPAND(wr + j * 16, s, b, w);
            for (int v = 0; v < 4; v++) _mm256_storeu_ps(out + j * 32 + v * 8, w[v]);
        }
    }
}

#if defined(__AVX512F__) && !defined(PHI3_NO_AVX512)
int phi3_simd(void) { return 3; } /* AVX2's path, its one-row dots on 512-bit registers */
#else
int phi3_simd(void) { return 1; }
#endif

#elif defined(__ARM_NEON) && defined(__aarch64__) && !defined(PHI3_PORTABLE)
/* arm64 (Apple Silicon, Graviton, Ampere): NEON is part of the base architecture, 32 registers of
 * four floats. The same blocking as the AVX2 path, four lanes where it has eight. */
#include <arm_neon.h>

static inline float half_to_float(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

/* The eight 4-weight vectors of the int4 block at p (columns 0-3, 4-7, .., 28-31), w = q * s + b
 * rounded once (fma), as on AVX2: low nibbles are columns 0-15, high ones 16-31. */
static inline __attribute__((always_inline)) void q4_expand(const uint8_t *p, float32x4_t s, float32x4_t b,
                                                            float32x4_t w[8]) {
    const uint8x16_t bytes = vld1q_u8(p);
    const uint8x16_t nib[2] = {vandq_u8(bytes, vdupq_n_u8(0x0F)), vshrq_n_u8(bytes, 4)};
    for (int h = 0; h < 2; h++) {
        const uint16x8_t u0 = vmovl_u8(vget_low_u8(nib[h])), u1 = vmovl_high_u8(nib[h]);
        w[4 * h + 0] = vfmaq_f32(b, vcvtq_f32_u32(vmovl_u16(vget_low_u16(u0))), s);
        w[4 * h + 1] = vfmaq_f32(b, vcvtq_f32_u32(vmovl_high_u16(u0)), s);
        w[4 * h + 2] = vfmaq_f32(b, vcvtq_f32_u32(vmovl_u16(vget_low_u16(u1))), s);
        w[4 * h + 3] = vfmaq_f32(b, vcvtq_f32_u32(vmovl_high_u16(u1)), s);
    }
}

/* mr (<= MR) rows of x against weight row n: one row keeps four accumulators (independent fma
 * chains), more rows two each. Always inlined, so that the constant mr of q4_row's calls unrolls. */
static inline __attribute__((always_inline)) void q4_row_mr(const float *x, const uint8_t *wr, const uint16_t *sr,
        const uint16_t *br, float *y, int64_t m0, int mr, int64_t n, int64_t N, int64_t K, int64_t G) {
    const int64_t bpg = K / 32 / G;
    const int chains = mr == 1 ? 4 : 2;
    float32x4_t acc[MR][4], w[8];
    for (int i = 0; i < MR; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < G; g++) {
        const float32x4_t s = vdupq_n_f32(half_to_float(sr[g])), b = vdupq_n_f32(half_to_float(br[g]));
        for (int64_t j = g * bpg; j < (g + 1) * bpg; j++) {
            q4_expand(wr + j * 16, s, b, w);
            for (int i = 0; i < mr; i++) {
                const float *xr = x + (m0 + i) * K + j * 32;
                for (int v = 0; v < 8; v++) acc[i][v % chains] = vfmaq_f32(acc[i][v % chains], w[v], vld1q_f32(xr + 4 * v));
            }
        }
    }
    for (int i = 0; i < mr; i++)
        y[(m0 + i) * N + n] = vaddvq_f32(vaddq_f32(vaddq_f32(acc[i][0], acc[i][1]), vaddq_f32(acc[i][2], acc[i][3])));
}

static void q4_row(const float *x, const uint8_t *wr, const uint16_t *sr, const uint16_t *br, float *y, int64_t m0,
                   int mr, int64_t n, int64_t N, int64_t K, int64_t G) {
    if (mr == MR) q4_row_mr(x, wr, sr, br, y, m0, MR, n, N, K, G);
    else if (mr == 1) q4_row_mr(x, wr, sr, br, y, m0, 1, n, N, K, G);
    else q4_row_mr(x, wr, sr, br, y, m0, mr, n, N, K, G);
}

/* int8: 16 weights (gs, the columns per group, is a multiple of 16) as four vectors, w = q * s */
static inline __attribute__((always_inline)) void q8_expand(const int8_t *p, float32x4_t s, float32x4_t w[4]) {
    const int8x16_t q = vld1q_s8(p);
    const int16x8_t q0 = vmovl_s8(vget_low_s8(q)), q1 = vmovl_high_s8(q);
    w[0] = vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(q0))), s);
    w[1] = vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(q0)), s);
    w[2] = vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(q1))), s);
    w[3] = vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(q1)), s);
}

static inline __attribute__((always_inline)) void q8_row_mr(const float *x, const int8_t *wr, const uint16_t *sr,
        float *y, int64_t m0, int mr, int64_t n, int64_t N, int64_t K, int64_t G) {
    const int64_t gs = K / G;
    const int chains = mr == 1 ? 4 : 2;
    float32x4_t acc[MR][4], w[4];
    for (int i = 0; i < MR; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < G; g++) {
        const float32x4_t s = vdupq_n_f32(half_to_float(sr[g]));
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
            q8_expand(wr + k, s, w);
            for (int i = 0; i < mr; i++) {
                const float *xr = x + (m0 + i) * K + k;
                for (int v = 0; v < 4; v++) acc[i][v % chains] = vfmaq_f32(acc[i][v % chains], w[v], vld1q_f32(xr + 4 * v));
            }
        }
    }
    for (int i = 0; i < mr; i++)
        y[(m0 + i) * N + n] = vaddvq_f32(vaddq_f32(vaddq_f32(acc[i][0], acc[i][1]), vaddq_f32(acc[i][2], acc[i][3])));
}

static void q8_row(const float *x, const int8_t *wr, const uint16_t *sr, float *y, int64_t m0, int mr, int64_t n,
                   int64_t N, int64_t K, int64_t G) {
    if (mr == MR) q8_row_mr(x, wr, sr, y, m0, MR, n, N, K, G);
    else if (mr == 1) q8_row_mr(x, wr, sr, y, m0, 1, n, N, K, G);
    else q8_row_mr(x, wr, sr, y, m0, mr, n, N, K, G);
}

/* fp32 weights: 16 columns a step in four chains, then 4, then one at a time */
static float f32_dot1(const float *x, const float *wr, int64_t K) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(wr + k), vld1q_f32(x + k));
        a1 = vfmaq_f32(a1, vld1q_f32(wr + k + 4), vld1q_f32(x + k + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(wr + k + 8), vld1q_f32(x + k + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(wr + k + 12), vld1q_f32(x + k + 12));
    }
    for (; k + 4 <= K; k += 4) a0 = vfmaq_f32(a0, vld1q_f32(wr + k), vld1q_f32(x + k));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; k < K; k++) s += wr[k] * x[k];
    return s;
}

static void f32_row(const float *x, const float *wr, float *y, int64_t m0, int mr, int64_t n, int64_t N, int64_t K) {
    for (int i = 0; i < mr; i++) y[(m0 + i) * N + n] = f32_dot1(x + (m0 + i) * K, wr, K);
}

static void q4_dequant_row(const uint8_t *wr, const uint16_t *sr, const uint16_t *br, float *out, int64_t K, int64_t G) {
    const int64_t bpg = K / 32 / G;
    float32x4_t w[8];
    for (int64_t g = 0; g < G; g++) {
        const float32x4_t s = vdupq_n_f32(half_to_float(sr[g])), b = vdupq_n_f32(half_to_float(br[g]));
        for (int64_t j = g * bpg; j < (g + 1) * bpg; j++) {
            q4_expand(wr + j * 16, s, b, w);
            for (int v = 0; v < 8; v++) vst1q_f32(out + j * 32 + 4 * v, w[v]);
        }
    }
}

/* int16 activations (see the AVX2 path): q = round(x * 32767 / max|x|) to nearest even, as lrintf */
static void act16_quantize_block(const float *x, int16_t *q, float *d, float *sum) {
    float32x4_t v[8], top4 = vdupq_n_f32(0.0f), sum4 = vdupq_n_f32(0.0f);
    for (int i = 0; i < 8; i++) {
        v[i] = vld1q_f32(x + 4 * i);
        top4 = vmaxq_f32(top4, vabsq_f32(v[i]));
        sum4 = vaddq_f32(sum4, v[i]);
    }
    const float top = vmaxvq_f32(top4);
    const float32x4_t inv = vdupq_n_f32(top > 0.0f ? 32767.0f / top : 0.0f);
    for (int i = 0; i < 8; i += 2)
        vst1q_s16(q + 4 * i, vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(v[i], inv))),
                                          vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(v[i + 1], inv)))));
    *d = top / 32767.0f;
    *sum = vaddvq_f32(sum4);
}

/* block j of a weight row as int16: columns 0-7, 8-15, 16-23, 24-31 (int4 when `br` is given, else int8) */
static inline __attribute__((always_inline)) void a16_expand(const uint8_t *wr, const uint16_t *br, int64_t j,
                                                             int16x8_t w[4]) {
    if (br) {
        const uint8x16_t bytes = vld1q_u8(wr + j * 16);
        const uint8x16_t lo = vandq_u8(bytes, vdupq_n_u8(0x0F)), hi = vshrq_n_u8(bytes, 4);
        w[0] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo))), w[1] = vreinterpretq_s16_u16(vmovl_high_u8(lo));
        w[2] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi))), w[3] = vreinterpretq_s16_u16(vmovl_high_u8(hi));
    } else {
        const int8x16_t a = vld1q_s8((const int8_t *)wr + j * 32), b = vld1q_s8((const int8_t *)wr + j * 32 + 16);
        w[0] = vmovl_s8(vget_low_s8(a)), w[1] = vmovl_high_s8(a), w[2] = vmovl_s8(vget_low_s8(b)), w[3] = vmovl_high_s8(b);
    }
}

/* mr (<= A16_MR) rows against one weight row: each block expanded once for all rows, its exact
 * integer dot per row, then accumulated per row in the portable path's order (so the same sums). */
static void a16_row(const int16_t *q, const float *d, const float *gsum, const uint8_t *wr, const uint16_t *sr,
                    const uint16_t *br, float *y, int mr, int64_t N, int64_t K, int64_t G) {
    const int64_t nb = K / 32, bpg = nb / G;
    float acc[A16_MR] = {0};
    int16x8_t w[4];
    for (int64_t j = 0; j < nb; j++) {
        a16_expand(wr, br, j, w);
        const float sw = half_to_float(sr[j / bpg]);
        for (int i = 0; i < mr; i++) {
            const int16_t *qr = q + i * K + j * 32;
            int32x4_t dot = vdupq_n_s32(0);
            for (int v = 0; v < 4; v++) {
                const int16x8_t a = vld1q_s16(qr + 8 * v);
                dot = vmlal_s16(dot, vget_low_s16(w[v]), vget_low_s16(a));
                dot = vmlal_high_s16(dot, w[v], a);
            }
            acc[i] += (float)vaddvq_s32(dot) * (sw * d[i * nb + j]);
        }
    }
    for (int i = 0; i < mr; i++) {
        float bias = 0.0f;
        if (br)
            for (int64_t g = 0; g < G; g++) bias += half_to_float(br[g]) * gsum[i * G + g];
        y[i * N] = acc[i] + bias;
    }
}

int phi3_simd(void) { return 2; }

#else /* portable C (or -DPHI3_PORTABLE): the compiler vectorizes what it can */

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    union { uint32_t u; float f; } v;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        v.f = (float)man * (1.0f / 16777216.0f);
        v.u |= sign;
        return v.f;
    }
    v.u = sign | (exp == 31 ? 0x7F800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
    return v.f;
}

static void q4_row(const float *x, const uint8_t *wr, const uint16_t *sr, const uint16_t *br, float *y, int64_t m0,
                   int mr, int64_t n, int64_t N, int64_t K, int64_t G) {
    const int64_t bpg = K / 32 / G;
    float acc[MR] = {0};
    for (int64_t j = 0; j < K / 32; j++) {
        const float s = half_to_float(sr[j / bpg]), b = half_to_float(br[j / bpg]);
        float w[32];
        for (int i = 0; i < 16; i++) {
            w[i] = (float)(wr[j * 16 + i] & 15) * s + b;
            w[i + 16] = (float)(wr[j * 16 + i] >> 4) * s + b;
        }
        for (int r = 0; r < mr; r++)
            for (int i = 0; i < 32; i++) acc[r] += w[i] * x[(m0 + r) * K + j * 32 + i];
    }
    for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = acc[r];
}

static void q8_row(const float *x, const int8_t *wr, const uint16_t *sr, float *y, int64_t m0, int mr, int64_t n,
                   int64_t N, int64_t K, int64_t G) {
    const int64_t gs = K / G;
    float acc[MR] = {0};
    for (int64_t k = 0; k < K; k++) {
        const float w = (float)wr[k] * half_to_float(sr[k / gs]);
        for (int r = 0; r < mr; r++) acc[r] += w * x[(m0 + r) * K + k];
    }
    for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = acc[r];
}

static void q4_dequant_row(const uint8_t *wr, const uint16_t *sr, const uint16_t *br, float *out, int64_t K, int64_t G) {
    const int64_t gs = K / G;
    for (int64_t k = 0; k < K; k += 32) {
        const float s = half_to_float(sr[k / gs]), z = half_to_float(br[k / gs]);
        for (int j = 0; j < 16; j++) {
            out[k + j] = (float)(wr[k / 2 + j] & 15) * s + z;
            out[k + j + 16] = (float)(wr[k / 2 + j] >> 4) * s + z;
        }
    }
}

static void f32_row(const float *x, const float *wr, float *y, int64_t m0, int mr, int64_t n, int64_t N, int64_t K) {
    for (int r = 0; r < mr; r++) {
        float acc[8] = {0}, s = 0.0f;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8)
            for (int i = 0; i < 8; i++) acc[i] += wr[k + i] * x[(m0 + r) * K + k + i];
        for (; k < K; k++) s += wr[k] * x[(m0 + r) * K + k];
        y[(m0 + r) * N + n] = s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
}

static void act16_quantize_block(const float *x, int16_t *q, float *d, float *sum) {
    float top = 0.0f, s = 0.0f;
    for (int i = 0; i < 32; i++) top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
    const float inv = top > 0.0f ? 32767.0f / top : 0.0f;
    for (int i = 0; i < 32; i++) q[i] = (int16_t)lrintf(x[i] * inv), s += x[i];
    *d = top / 32767.0f;
    *sum = s;
}

static void a16_row(const int16_t *q, const float *d, const float *gsum, const uint8_t *wr, const uint16_t *sr,
                    const uint16_t *br, float *y, int mr, int64_t N, int64_t K, int64_t G) {
    const int64_t nb = K / 32, bpg = nb / G;
    for (int i = 0; i < mr; i++) {
        float acc = 0.0f, bias = 0.0f;
        for (int64_t j = 0; j < nb; j++) {
            const int16_t *qr = q + i * K + j * 32;
            int32_t dot = 0;
            if (br)
                for (int k = 0; k < 16; k++) dot += (wr[j * 16 + k] & 15) * qr[k] + (wr[j * 16 + k] >> 4) * qr[k + 16];
            else
                for (int k = 0; k < 32; k++) dot += ((const int8_t *)wr)[j * 32 + k] * qr[k];
            acc += (float)dot * (half_to_float(sr[j / bpg]) * d[i * nb + j]);
        }
        if (br)
            for (int64_t g = 0; g < G; g++) bias += half_to_float(br[g]) * gsum[i * G + g];
        y[i * N] = acc + bias;
    }
}

int phi3_simd(void) { return 0; }

#endif

/* Output columns are split across threads; each thread passes over its weight rows once per block
 * of rows of x (8 where there is a q*_row8, else MR).
 * The *_rows functions are the loops alone, each ending at a barrier: called inside a parallel
 * region (layer.c runs a whole decoder layer in one) they share it; outside one they run on one thread. */
void phi3_q4_rows(const float *x, const uint8_t *w, const uint16_t *scales, const uint16_t *biases, float *y,
                  int64_t M, int64_t N, int64_t K, int64_t G) {
    const phi3_range share = phi3_share(N);
    for (int64_t n = share.begin; n < share.end; n++) {
        const uint8_t *wr = w + n * (K / 2);
        int64_t m0 = 0;
#ifdef ROW8
        for (; M - m0 >= 8; m0 += 8) q4_row8(x, wr, scales + n * G, biases + n * G, y, m0, n, N, K, G);
#endif
        for (; m0 < M; m0 += MR)
            q4_row(x, wr, scales + n * G, biases + n * G, y, m0, M - m0 < MR ? (int)(M - m0) : MR, n, N, K, G);
    }
    phi3_barrier();
}

void phi3_q8_rows(const float *x, const int8_t *w, const uint16_t *scales, float *y,
                  int64_t M, int64_t N, int64_t K, int64_t G) {
    const phi3_range share = phi3_share(N);
    for (int64_t n = share.begin; n < share.end; n++) {
        const int8_t *wr = w + n * K;
        int64_t m0 = 0;
#ifdef ROW8
        for (; M - m0 >= 8; m0 += 8) q8_row8(x, wr, scales + n * G, y, m0, n, N, K, G);
#endif
        for (; m0 < M; m0 += MR)
            q8_row(x, wr, scales + n * G, y, m0, M - m0 < MR ? (int)(M - m0) : MR, n, N, K, G);
    }
    phi3_barrier();
}

void phi3_f32_rows(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K) {
    int64_t n0 = 0; /* weight rows before n0 go in groups of six, the rest one at a time */
#ifdef F32_NW
    /* one row of x takes the groups too when the rows are long (16 KiB and more: six streams of
     * weights beat one), else f32_dot1 */
    if ((M >= 2 || K >= 4096) && K % 8 == 0) {
        n0 = N - N % F32_NW;
        const phi3_range share = phi3_share(n0 / F32_NW); /* no barrier: the one below ends both loops */
        for (int64_t n = share.begin * F32_NW; n < share.end * F32_NW; n += F32_NW)
            for (int64_t m0 = 0; m0 < M; m0 += 8) f32_block6(x, w + n * K, y, m0, M - m0 < 8 ? (int)(M - m0) : 8, n, N, K);
    }
#endif
    const phi3_range share = phi3_share(N - n0);
    for (int64_t n = n0 + share.begin; n < n0 + share.end; n++)
        for (int64_t m0 = 0; m0 < M; m0 += MR) f32_row(x, w + n * K, y, m0, M - m0 < MR ? (int)(M - m0) : MR, n, N, K);
    phi3_barrier();
}

/* int16 activations: each thread rounds all M rows of x into its own part of `work` (M x K values,
 * cheap next to the N x K weights), then takes its share of the weight rows; no barrier in between. */
int64_t phi3_a16_work_floats(int64_t M, int64_t K) { return M * (K / 2 + 3 * (K / 32)) + 16; } /* per thread */

/* y = x @ W^T with x rounded to int16 (above); int4 weights when `biases` is given, else int8.
 * `work`: phi3_a16_work_floats(M, K) floats for each thread. */
void phi3_a16_rows(const float *x, const void *w, const uint16_t *scales, const uint16_t *biases, float *y,
                   int64_t M, int64_t N, int64_t K, int64_t G, float *work) {
    const int64_t nb = K / 32, row_bytes = biases ? K / 2 : K;
    float *mine = work + phi3_thread() * phi3_a16_work_floats(M, K);
    int16_t *q = (int16_t *)mine;
    float *d = mine + M * K / 2, *bsum = d + M * nb, *gsum = bsum + M * nb;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t j = 0; j < nb; j++)
            act16_quantize_block(x + m * K + j * 32, q + m * K + j * 32, d + m * nb + j, bsum + m * nb + j);
        for (int64_t g = 0; g < G; g++) { /* group sums of x, from the blocks' in order */
            float t = 0.0f;
            for (int64_t j = g * (nb / G); j < (g + 1) * (nb / G); j++) t += bsum[m * nb + j];
            gsum[m * G + g] = t;
        }
    }
    const phi3_range share = phi3_share(N);
    for (int64_t n = share.begin; n < share.end; n++)
        for (int64_t m0 = 0; m0 < M; m0 += A16_MR)
            a16_row(q + m0 * K, d + m0 * nb, gsum + m0 * G, (const uint8_t *)w + n * row_bytes, scales + n * G,
                    biases ? biases + n * G : NULL, y + m0 * N + n, M - m0 < A16_MR ? (int)(M - m0) : A16_MR, N, K, G);
    phi3_barrier();
}

/* The entry points kernels.py calls: one parallel region of `threads` threads around a loop. */
typedef struct {
    int kind; /* which loop: one of the enum below */
    const float *x;
    const void *w;
    const uint16_t *scales, *biases;
    float *y, *work;
    int64_t M, N, K, G;
} call_t;

enum { Q4, Q8, F32, A16, Q4_DEQUANTIZE, Q8_DEQUANTIZE };

static void q8_dequant_row(const int8_t *wr, const uint16_t *sr, float *out, int64_t K, int64_t G) {
    const int64_t gs = K / G;
    for (int64_t g = 0; g < G; g++) { /* one scale per group: the inner loop vectorizes */
        const float s = half_to_float(sr[g]);
        for (int64_t k = 0; k < gs; k++) out[g * gs + k] = (float)wr[g * gs + k] * s;
    }
}

static void run(void *p) {
    const call_t *c = p;
    const phi3_range share = phi3_share(c->N); /* the dequantizations: weight rows */
    switch (c->kind) {
    case Q4: phi3_q4_rows(c->x, c->w, c->scales, c->biases, c->y, c->M, c->N, c->K, c->G); break;
    case Q8: phi3_q8_rows(c->x, c->w, c->scales, c->y, c->M, c->N, c->K, c->G); break;
    case F32: phi3_f32_rows(c->x, c->w, c->y, c->M, c->N, c->K); break;
    case A16: phi3_a16_rows(c->x, c->w, c->scales, c->biases, c->y, c->M, c->N, c->K, c->G, c->work); break;
    case Q4_DEQUANTIZE:
        for (int64_t n = share.begin; n < share.end; n++)
            q4_dequant_row((const uint8_t *)c->w + n * (c->K / 2), c->scales + n * c->G, c->biases + n * c->G,
                           c->y + n * c->K, c->K, c->G);
        break;
    case Q8_DEQUANTIZE:
        for (int64_t n = share.begin; n < share.end; n++)
            q8_dequant_row((const int8_t *)c->w + n * c->K, c->scales + n * c->G, c->y + n * c->K, c->K, c->G);
        break;
    }
}

void phi3_a16_linear(const float *x, const void *w, const uint16_t *scales, const uint16_t *biases, float *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, float *work, int threads) {
    call_t c = {A16, x, w, scales, biases, y, work, M, N, K, G};
    phi3_parallel(threads, run, &c);
}

void phi3_q4_linear(const float *x, const uint8_t *w, const uint16_t *scales, const uint16_t *biases, float *y,
                    int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    call_t c = {Q4, x, w, scales, biases, y, NULL, M, N, K, G};
    phi3_parallel(threads, run, &c);
}

void phi3_q8_linear(const float *x, const int8_t *w, const uint16_t *scales, float *y,
                    int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    call_t c = {Q8, x, w, scales, NULL, y, NULL, M, N, K, G};
    phi3_parallel(threads, run, &c);
}

void phi3_f32_linear(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    call_t c = {F32, x, w, NULL, NULL, y, NULL, M, N, K, 1};
    phi3_parallel(threads, run, &c);
}

/* out (N, K) fp32 = the dequantized weight, for calls with many rows of x (prefill), where a dense
 * fp32 matmul on a transient copy is faster than passing over the packed blocks once per MR rows. */
void phi3_q4_dequantize(const uint8_t *w, const uint16_t *scales, const uint16_t *biases, float *out,
                        int64_t N, int64_t K, int64_t G, int threads) {
    call_t c = {Q4_DEQUANTIZE, NULL, w, scales, biases, out, NULL, 0, N, K, G};
    phi3_parallel(threads, run, &c);
}

void phi3_q8_dequantize(const int8_t *w, const uint16_t *scales, float *out, int64_t N, int64_t K, int64_t G,
                        int threads) {
    call_t c = {Q8_DEQUANTIZE, NULL, w, scales, NULL, out, NULL, 0, N, K, G};
    phi3_parallel(threads, run, &c);
}
