/* Decoder layers of one decode step in C: what `Block.forward` computes for B rows of one token
 * each, in fp32 on the CPU, when every linear is packed (phi3's kernels) or plain fp32
 * (phi3/kernels.py's `decode_layers` checks).
 *
 * Why: with packed weights the linears of a small model take less than half of an eager decode
 * step; the rest is ~25 torch ops per layer, each a few microseconds of dispatch. And at a few
 * rows (up to 23), fp32 weights streamed once for all rows beat oneDNN's small-batch matmul. Here a layer is
 * one pass in one parallel region (OpenMP, or POSIX threads: parallel.h), stages split by barriers:
 *
 *   h = rmsnorm(x) -> qkv = h W^T -> rotate q, k; write k, v at each row's position in its slot ->
 *   attention over the row's visible keys -> x += att Wo^T -> h = rmsnorm(x) -> gu = h W^T ->
 *   a = up * silu(gate) -> x += a Wd^T
 *
 * Same operations in fp32 as the torch path (model.py), so the same result up to fp32 rounding and
 * the order of sums: exp is a polynomial (Cephes' expf, ~1 ulp) the compiler vectorizes, softmax is
 * taken over the visible keys only (the masked ones are exp(-inf) = 0 in torch).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "packed.h"

#include "parallel.h"

typedef struct { /* one linear: packed as phi3.quantize.QuantLinear holds it (kernel "cpu-fp32"), or fp32 */
    const void *weight;       /* int4: uint8 (N, K/2); int8: int8 (N, K); fp32: float (N, K) */
    const uint16_t *scales;   /* fp16 (N, G) (packed only) */
    const uint16_t *biases;   /* fp16 (N, G) (int4 only) */
    const float *input_scale; /* (K,), multiplied into the input first (AWQ), or NULL */
    int64_t groups;           /* G */
    int64_t bits;             /* 4, 8 or 32 */
    int64_t activation_bits;  /* 32, or 16: x rounded to int16 per block of 32 (packed only, opt-in; packed.c) */
} phi3_linear;

typedef struct { /* one decoder layer's tensors */
    phi3_linear qkv, o, gate_up, down;
    const float *input_norm, *post_attention_norm; /* (C,) RMSNorm weights */
    void *k_cache, *v_cache;                       /* (blocks, block_size, Hkv, D), keys after RoPE: fp32, or int8 */
    float *k_scale, *v_scale;                      /* int8 caches: (blocks, block_size, Hkv, D / kv_group); else NULL */
} phi3_layer;

typedef struct { /* what the layers of one decode step share */
    int64_t rows, hidden, heads, kv_heads, head_dim, rotary_dim, intermediate; /* B, C, H, Hkv, D, R, I */
    int64_t block_size; /* positions per block of the cache */
    int64_t columns;    /* the block table's columns */
    int64_t kv_len;     /* keys 0..kv_len-1 of a row may be visible (then masked per row) */
    int64_t window;     /* sliding window (key j visible to position p when j > p - window); 0: none */
    int64_t first_slot; /* row b is the block table's row first_slot + b */
    const int64_t *block_table; /* (rows, columns): position p of row r is in block block_table[r, p / block_size] */
    const int64_t *positions; /* (B,) each row's position */
    const float *cos, *sin;   /* (B, R) each row's rotary factors */
    float *work;              /* phi3_work_floats(step) floats */
    double eps;
    int64_t threads;
    const int64_t *slots; /* (B,) row b's block-table row (several rows may be one sequence's positions), or NULL: first_slot + b */
    int64_t kv_group;     /* an int8 cache: elements per scale (cache.py's kv_group); 0: an fp32 cache */
} phi3_step;

static inline int64_t table_row(const phi3_step *s, int64_t b) { return s->slots ? s->slots[b] : s->first_slot + b; }

/* e^x in fp32, Cephes' expf: range reduction by ln 2 in two parts, a degree-7 polynomial, the
 * exponent put in by hand. Branch-free, so loops over it vectorize (with -fno-trapping-math, which
 * kernels.py passes: the comparisons may then be done on whole vectors). */
static inline float exp_f32(float x) {
    x = x < -87.33654f ? -87.33654f : x > 88.72283f ? 88.72283f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    const float p = ((((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                       1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r + r) + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out = w * (x * rsqrt(mean(x^2) + eps)) [* input_scale]: RMSNorm in model.py's order */
static void rmsnorm_row(const float *x, const float *w, const float *input_scale, float *out, int64_t C, double eps) {
    const float r = 1.0f / sqrtf(dot(x, x, C) / (float)C + (float)eps);
    for (int64_t c = 0; c < C; c++) out[c] = w[c] * (x[c] * r);
    if (input_scale)
        for (int64_t c = 0; c < C; c++) out[c] *= input_scale[c];
}

/* An int8 cache's D values of one position and head from x: per group of n elements, the scale
 * max|x| / 127 and q = x / scale rounded to nearest (ties to even), as cache.py's _int8 computes them. */
static void quantize_kv(const float *x, int8_t *q, float *scale, int64_t D, int64_t n) {
    for (int64_t g = 0; g < D / n; g++) {
        float top = 0.0f;
        for (int64_t i = g * n; i < (g + 1) * n; i++) top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
        const float s = top / 127.0f, d = s > 0.0f ? s : 1.0f;
        scale[g] = s;
        for (int64_t i = g * n; i < (g + 1) * n; i++) {
            const float r = nearbyintf(x[i] / d);
            q[i] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
        }
    }
}

/* a . (q * scale): an int8 key's D values, a scale per group of n */
static inline float dot_q8(const float *a, const int8_t *q, const float *scale, int64_t D, int64_t n) {
    float s = 0.0f;
    for (int64_t g = 0; g < D / n; g++) {
        float acc = 0.0f;
        for (int64_t i = g * n; i < (g + 1) * n; i++) acc += a[i] * (float)q[i];
        s += acc * scale[g];
    }
    return s;
}

/* rotate-half RoPE on the first R dims of one head: out = x * cos + rotate_half(x) * sin */
static void rotate(const float *x, const float *cos, const float *sin, float *out, int64_t D, int64_t R) {
    const int64_t half = R / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < R; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
    for (int64_t i = R; i < D; i++) out[i] = x[i];
}

static int64_t layer_floats(const phi3_step *s) { /* a layer's buffers (`layer` below) */
    const int64_t B = s->rows, C = s->hidden, D = s->head_dim, qkv = (s->heads + 2 * s->kv_heads) * D;
    return B * (C + qkv + s->heads * D + C + 3 * s->intermediate) + s->threads * (s->kv_len + D);
}

static void linear(const phi3_step *s, const phi3_linear *p, const float *x, float *y, int64_t M, int64_t N, int64_t K) {
    if (p->activation_bits == 16) /* its part of `work`: after the layer's buffers */
        phi3_a16_rows(x, p->weight, p->scales, p->bits == 4 ? p->biases : NULL, y, M, N, K, p->groups,
                      s->work + layer_floats(s));
    else if (p->bits == 4) phi3_q4_rows(x, (const uint8_t *)p->weight, p->scales, p->biases, y, M, N, K, p->groups);
    else if (p->bits == 8) phi3_q8_rows(x, (const int8_t *)p->weight, p->scales, y, M, N, K, p->groups);
    else phi3_f32_rows(x, (const float *)p->weight, y, M, N, K);
}

int64_t phi3_work_floats(const phi3_step *s) { /* and the int16 activations' buffers, at the widest input */
    int64_t K = s->hidden > s->heads * s->head_dim ? s->hidden : s->heads * s->head_dim;
    K = K > s->intermediate ? K : s->intermediate;
    return layer_floats(s) + s->threads * phi3_a16_work_floats(s->rows, K);
}

static void layer(const phi3_step *s, const phi3_layer *l, float *x) {
    const int64_t B = s->rows, C = s->hidden, H = s->heads, Hkv = s->kv_heads, D = s->head_dim, R = s->rotary_dim;
    const int64_t I = s->intermediate, BS = s->block_size, NQKV = (H + 2 * Hkv) * D, group = H / Hkv;
    float *h = s->work, *qkv = h + B * C, *att = qkv + B * NQKV, *proj = att + B * H * D, *gu = proj + B * C;
    float *act = gu + B * 2 * I, *thread_work = act + B * I;
    const float scale = 1.0f / sqrtf((float)D);

    phi3_range share = phi3_share(B);
    for (int64_t b = share.begin; b < share.end; b++) rmsnorm_row(x + b * C, l->input_norm, l->qkv.input_scale, h + b * C, C, s->eps);
    phi3_barrier();
    linear(s, &l->qkv, h, qkv, B, NQKV, C);

    share = phi3_share(B * Hkv);
    for (int64_t bg = share.begin; bg < share.end; bg++) { /* keys rotated, then keys and values written at the row's position */
        const int64_t b = bg / Hkv, g = bg % Hkv;
        const int64_t pos = s->positions[b], block = s->block_table[table_row(s, b) * s->columns + pos / BS];
        const int64_t at = ((block * BS + pos % BS) * Hkv + g) * D;
        if (s->kv_group) { /* int8: rotated into this thread's buffer, then rounded per group */
            float *k = thread_work + phi3_thread() * (s->kv_len + D);
            const int64_t n = s->kv_group, sat = at / n;
            rotate(qkv + b * NQKV + (H + g) * D, s->cos + b * R, s->sin + b * R, k, D, R);
            quantize_kv(k, (int8_t *)l->k_cache + at, l->k_scale + sat, D, n);
            quantize_kv(qkv + b * NQKV + (H + Hkv + g) * D, (int8_t *)l->v_cache + at, l->v_scale + sat, D, n);
        } else {
            rotate(qkv + b * NQKV + (H + g) * D, s->cos + b * R, s->sin + b * R, (float *)l->k_cache + at, D, R);
            memcpy((float *)l->v_cache + at, qkv + b * NQKV + (H + Hkv + g) * D, D * sizeof(float));
        }
    }
    phi3_barrier();

    share = phi3_share(B * H);
    for (int64_t bh = share.begin; bh < share.end; bh++) {
        const int64_t b = bh / H, hd = bh % H;
        float *q = thread_work + phi3_thread() * (s->kv_len + D), *p = q + D;
        rotate(qkv + b * NQKV + hd * D, s->cos + b * R, s->sin + b * R, q, D, R);
        const int64_t pos = s->positions[b], hi = pos < s->kv_len - 1 ? pos : s->kv_len - 1; /* keys lo..hi */
        const int64_t lo = s->window > 0 && pos - s->window + 1 > 0 ? pos - s->window + 1 : 0;
        const int64_t *table = s->block_table + table_row(s, b) * s->columns, stride = Hkv * D;
        const int64_t head = (hd / group) * D;
        float *out = att + b * H * D + hd * D, top = -INFINITY, sum = 0.0f;
        for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
        const int64_t n = s->kv_group, sstride = n ? stride / n : 0, shead = n ? head / n : 0; /* int8: scales */
        for (int64_t j0 = lo - lo % BS; j0 <= hi; j0 += BS) { /* a block at a time: keys j0..j0+BS-1 */
            const int64_t first = table[j0 / BS] * BS, a = j0 > lo ? j0 : lo, e = j0 + BS - 1 < hi ? j0 + BS - 1 : hi;
            for (int64_t j = a; j <= e; j++) {
                const int64_t slot = first + j - j0, at = slot * stride + head; /* key j's place in the pool */
                p[j - lo] = (n ? dot_q8(q, (const int8_t *)l->k_cache + at, l->k_scale + slot * sstride + shead, D, n)
                               : dot(q, (const float *)l->k_cache + at, D)) * scale;
                top = p[j - lo] > top ? p[j - lo] : top;
            }
        }
        for (int64_t j = 0; j <= hi - lo; j++) p[j] = exp_f32(p[j] - top); /* vectorized */
        for (int64_t j = 0; j <= hi - lo; j++) sum += p[j];
        for (int64_t j0 = lo - lo % BS; j0 <= hi; j0 += BS) {
            const int64_t first = table[j0 / BS] * BS, a = j0 > lo ? j0 : lo, e = j0 + BS - 1 < hi ? j0 + BS - 1 : hi;
            for (int64_t j = a; j <= e; j++) {
                const float pj = p[j - lo] / sum;
                const int64_t slot = first + j - j0, at = slot * stride + head;
                if (n) { /* int8 values: each group's scale folded into the weight */
                    const int8_t *v = (const int8_t *)l->v_cache + at;
                    const float *vs = l->v_scale + slot * sstride + shead;
                    for (int64_t g = 0; g < D / n; g++) {
                        const float w = pj * vs[g];
                        for (int64_t d = g * n; d < (g + 1) * n; d++) out[d] += w * (float)v[d];
                    }
                } else {
                    const float *v = (const float *)l->v_cache + at;
                    for (int64_t d = 0; d < D; d++) out[d] += pj * v[d];
                }
            }
        }
        if (l->o.input_scale)
            for (int64_t d = 0; d < D; d++) out[d] *= l->o.input_scale[hd * D + d];
    }
    phi3_barrier();
    linear(s, &l->o, att, proj, B, C, H * D);

    share = phi3_share(B);
    for (int64_t b = share.begin; b < share.end; b++) {
        for (int64_t c = 0; c < C; c++) x[b * C + c] += proj[b * C + c];
        rmsnorm_row(x + b * C, l->post_attention_norm, l->gate_up.input_scale, h + b * C, C, s->eps);
    }
    phi3_barrier();
    linear(s, &l->gate_up, h, gu, B, 2 * I, C);

    const int64_t chunks = (I + 255) / 256;
    share = phi3_share(B * chunks);
    for (int64_t bi = share.begin; bi < share.end; bi++) { /* up * silu(gate), silu(g) = g / (1 + e^-g) */
        const int64_t b = bi / chunks, i0 = bi % chunks * 256;
        const float *gate = gu + b * 2 * I, *up = gate + I;
        const int64_t end = i0 + 256 < I ? i0 + 256 : I;
        for (int64_t i = i0; i < end; i++) act[b * I + i] = up[i] * (gate[i] / (1.0f + exp_f32(-gate[i])));
        if (l->down.input_scale)
            for (int64_t i = i0; i < end; i++) act[b * I + i] *= l->down.input_scale[i];
    }
    phi3_barrier();
    linear(s, &l->down, act, proj, B, C, I);

    share = phi3_share(B);
    for (int64_t b = share.begin; b < share.end; b++)
        for (int64_t c = 0; c < C; c++) x[b * C + c] += proj[b * C + c];
    phi3_barrier();
}

typedef struct {
    const phi3_step *s;
    const phi3_layer *layers;
    int64_t n;
    float *x;
} decode_t;

static void decode(void *p) {
    const decode_t *d = p;
    for (int64_t i = 0; i < d->n; i++) layer(d->s, &d->layers[i], d->x);
}

/* x (B, C) in place through n layers, all threads in one parallel region. */
void phi3_decode_layers(const phi3_step *s, const phi3_layer *layers, int64_t n, float *x) {
    decode_t d = {s, layers, n, x};
    phi3_parallel((int)s->threads, decode, &d);
}
