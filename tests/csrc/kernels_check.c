/* A test driver for phi3/csrc/packed.c on machines without Python (arm64 under qemu-user, see
 * tests/test_kernels_c.py): every exported linear and dequantization on random inputs, against a
 * reference computed here in double from the layouts' definitions (phi3/quantize.py), with 1 and 3
 * threads (which must agree to the bit: threads split output columns, never a sum).
 *
 *   kernels_check [OUT]   prints "simd S threads T seen N" (phi3_simd, phi3_threads_kind and
 *                         phi3_threads_seen(4)), then one line per check; exit 1 if one failed.
 *                         OUT: every result, fp32, in order, for comparing two builds' outputs.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void phi3_q4_linear(const float *x, const uint8_t *w, const uint16_t *scales, const uint16_t *biases, float *y,
                    int64_t M, int64_t N, int64_t K, int64_t G, int threads);
void phi3_q8_linear(const float *x, const int8_t *w, const uint16_t *scales, float *y, int64_t M, int64_t N, int64_t K,
                    int64_t G, int threads);
void phi3_f32_linear(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads);
void phi3_a16_linear(const float *x, const void *w, const uint16_t *scales, const uint16_t *biases, float *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, float *work, int threads);
int64_t phi3_a16_work_floats(int64_t M, int64_t K);
void phi3_q4_dequantize(const uint8_t *w, const uint16_t *scales, const uint16_t *biases, float *out, int64_t N,
                        int64_t K, int64_t G, int threads);
void phi3_q8_dequantize(const int8_t *w, const uint16_t *scales, float *out, int64_t N, int64_t K, int64_t G,
                        int threads);
int phi3_simd(void);
int phi3_threads_kind(void);
int phi3_threads_seen(int threads);

static uint64_t state = 0x9E3779B97F4A7C15u;
static uint32_t next(void) { /* xorshift64* */
    state ^= state >> 12, state ^= state << 25, state ^= state >> 27;
    return (uint32_t)((state * 0x2545F4914F6CDD1Du) >> 32);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next() >> 8) / 16777216.0f; }

/* a normal fp16 value nearest below f (truncated mantissa) and its exact value */
static uint16_t to_half(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000, exp = (u >> 23) & 0xFF, man = u & 0x7FFFFF;
    return (uint16_t)(sign | ((exp - 112) << 10) | (man >> 13));
}
static double from_half(uint16_t h) {
    const int exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    const double v = exp == 0 ? ldexp(man, -24) : ldexp(1024 + man, exp - 25);
    return h & 0x8000 ? -v : v;
}

static FILE *out;
static int failed;

static void save(const float *y, int64_t n) {
    if (out) fwrite(y, sizeof(float), (size_t)n, out);
}

/* |y - ref| <= bound[i] (or tol * max|ref| where bound is NULL), and y with 3 threads == y with 1 */
static void check(const char *what, const float *y, const float *y3, const double *ref, const double *bound, int64_t n,
                  double tol) {
    double top = 0.0, worst = 0.0;
    int bad = 0;
    for (int64_t i = 0; i < n; i++) top = fabs(ref[i]) > top ? fabs(ref[i]) : top;
    for (int64_t i = 0; i < n; i++) {
        const double err = fabs(y[i] - ref[i]), limit = (bound ? bound[i] : 0.0) + tol * top;
        worst = err / (top > 0 ? top : 1) > worst ? err / (top > 0 ? top : 1) : worst;
        if (!(err <= limit)) bad = 1;
    }
    const int same = memcmp(y, y3, (size_t)n * sizeof(float)) == 0;
    printf("%-40s n %lld max error %.2e of max|ref| %s%s\n", what, (long long)n, worst, bad ? "FAILED" : "ok",
           same ? "" : ", 3 threads DIFFER from 1");
    failed |= bad || !same;
    save(y, n);
}

/* the largest error of rounding a block of 32 activations to int16 (packed.c: steps of max|x| / 32767) */
static double act16_error(const float *x) {
    float top = 0.0f;
    for (int i = 0; i < 32; i++) top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
    return top / 32767.0 / 2 * 1.0001;
}

/* G = 0: fp32 weights alone (K need not be a multiple of 16 there) */
static void run_case(int64_t M, int64_t N, int64_t K, int64_t G) {
    char name[96];
    const int packed = G > 0;
    G = packed ? G : 1;
    const int64_t gs = K / G;
    float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N), *y3 = malloc(sizeof(float) * M * N);
    float *wf = malloc(sizeof(float) * N * K), *deq = malloc(sizeof(float) * N * K), *deq3 = malloc(sizeof(float) * N * K);
    uint8_t *w4 = malloc(N * K / 2);
    int8_t *w8 = malloc(N * K);
    uint16_t *s = malloc(2 * N * G), *b = malloc(2 * N * G);
    double *ref = malloc(sizeof(double) * (M * N > N * K ? M * N : N * K)), *bound = malloc(sizeof(double) * M * N);
    double *w4d = malloc(sizeof(double) * N * K), *w8d = malloc(sizeof(double) * N * K);
    float *work = malloc(sizeof(float) * 3 * phi3_a16_work_floats(M, K));
    for (int64_t i = 0; i < M * K; i++) x[i] = uniform(-1, 1) * (i % 29 == 0 ? 8.0f : 1.0f); /* some outliers */
    for (int64_t i = 0; i < N * K; i++) wf[i] = uniform(-1, 1);
    for (int64_t i = 0; i < N * K / 2; i++) w4[i] = (uint8_t)next();
    for (int64_t i = 0; i < N * K; i++) w8[i] = (int8_t)(next() % 255 - 127);
    for (int64_t i = 0; i < N * G; i++) s[i] = to_half(uniform(0.005f, 0.1f)), b[i] = to_half(uniform(-0.8f, -0.01f));
    for (int64_t n = 0; n < N; n++) /* the dequantized weights in double: int4 bytes hold columns j and j + 16 */
        for (int64_t k = 0; k < K; k++) {
            const int64_t g = k / gs, blk = k / 32, c = k % 32;
            const uint8_t byte = w4[n * K / 2 + blk * 16 + c % 16];
            const int q = c < 16 ? byte & 15 : byte >> 4;
            w4d[n * K + k] = q * from_half(s[n * G + g]) + from_half(b[n * G + g]);
            w8d[n * K + k] = w8[n * K + k] * from_half(s[n * G + g]);
        }

    for (int bits = 4; packed && bits <= 8; bits += 4) {
        if (bits == 4 && gs % 32) continue; /* int4 groups are whole blocks of 32 */
        const double *wd = bits == 4 ? w4d : w8d;
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) {
                double acc = 0.0;
                for (int64_t k = 0; k < K; k++) acc += (double)x[m * K + k] * wd[n * K + k];
                ref[m * N + n] = acc;
            }
        for (int t = 1; t <= 3; t += 2) {
            float *dst = t == 1 ? y : y3;
            if (bits == 4) phi3_q4_linear(x, w4, s, b, dst, M, N, K, G, t);
            else phi3_q8_linear(x, w8, s, dst, M, N, K, G, t);
        }
        snprintf(name, sizeof name, "q%d_linear M=%lld N=%lld K=%lld G=%lld", bits, (long long)M, (long long)N,
                 (long long)K, (long long)G);
        check(name, y, y3, ref, NULL, M * N, 1e-5);

        if (K % 32 == 0 && gs % 32 == 0) { /* int16 activations: x's rounding bounds the error */
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = 0; n < N; n++) {
                    double err = 0.0;
                    for (int64_t j = 0; j < K / 32; j++) {
                        const double step = act16_error(x + m * K + j * 32);
                        for (int c = 0; c < 32; c++) err += fabs(wd[n * K + j * 32 + c]) * step;
                    }
                    bound[m * N + n] = err;
                }
            for (int t = 1; t <= 3; t += 2)
                phi3_a16_linear(x, bits == 4 ? (const void *)w4 : (const void *)w8, s, bits == 4 ? b : NULL,
                                t == 1 ? y : y3, M, N, K, G, work, t);
            snprintf(name, sizeof name, "a16 int%d M=%lld N=%lld K=%lld G=%lld", bits, (long long)M, (long long)N,
                     (long long)K, (long long)G);
            check(name, y, y3, ref, bound, M * N, 1e-5);
        }

        for (int t = 1; t <= 3; t += 2) {
            float *dst = t == 1 ? deq : deq3;
            if (bits == 4) phi3_q4_dequantize(w4, s, b, dst, N, K, G, t);
            else phi3_q8_dequantize(w8, s, dst, N, K, G, t);
        }
        snprintf(name, sizeof name, "q%d_dequantize N=%lld K=%lld G=%lld", bits, (long long)N, (long long)K, (long long)G);
        check(name, deq, deq3, wd, NULL, N * K, 1e-7);
    }

    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double acc = 0.0;
            for (int64_t k = 0; k < K; k++) acc += (double)x[m * K + k] * wf[n * K + k];
            ref[m * N + n] = acc;
        }
    phi3_f32_linear(x, wf, y, M, N, K, 1);
    phi3_f32_linear(x, wf, y3, M, N, K, 3);
    snprintf(name, sizeof name, "f32_linear M=%lld N=%lld K=%lld", (long long)M, (long long)N, (long long)K);
    check(name, y, y3, ref, NULL, M * N, 1e-5);

    free(x), free(y), free(y3), free(wf), free(deq), free(deq3), free(w4), free(w8), free(s), free(b), free(ref);
    free(bound), free(w4d), free(w8d), free(work);
}

int main(int argc, char **argv) {
    out = argc > 1 ? fopen(argv[1], "wb") : NULL;
    printf("simd %d threads %d seen %d\n", phi3_simd(), phi3_threads_kind(), phi3_threads_seen(4));
    /* rows: one (decode), 2-3 and 5 (partial blocks of MR = 4), 8-9 (q*_row8 on AVX2), 13; groups of 32 to
     * 256 columns, and of 16 (int8 only: int4 blocks are 32); K not a multiple of 16 (fp32 only, G = 0) */
    static const int64_t cases[][4] = {{1, 37, 256, 8}, {2, 19, 512, 4}, {3, 37, 256, 1}, {5, 40, 1024, 32},
                                       {8, 21, 256, 2}, {9, 37, 512, 16}, {13, 12, 96, 3}, {1, 70, 4096, 32},
                                       {1, 9, 256, 16}, {6, 11, 128, 8}, {1, 7, 100, 0}, {4, 13, 36, 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_case(cases[i][0], cases[i][1], cases[i][2], cases[i][3]);
    /* regions of changing sizes back to back: each on as many distinct threads as asked, all meeting at a barrier */
    int regions_ok = 1;
    for (int i = 0; i < 1200; i++) {
        static const int sizes[] = {2, 3, 1, 4, 2, 5};
        const int n = sizes[i % 6];
        regions_ok &= phi3_threads_seen(n) == n;
    }
    printf("%-40s n 0 %s\n", "1200 regions of 1-5 threads", regions_ok ? "ok" : "FAILED");
    failed |= !regions_ok;
    if (out) fclose(out);
    return failed;
}
