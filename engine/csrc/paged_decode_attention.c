/* Paged decode attention for the CPU, reading K/V blocks where they are.
 *
 * One new token per sequence attends to its whole paged context. The torch path
 * gathers each sequence's blocks into a contiguous buffer and runs SDPA over it:
 * one extra pass over the context per layer and step, and with grouped-query
 * attention SDPA reads each KV head once per query head. Here each (sequence,
 * KV head) reads its K and V once, straight from the cache, for all the query
 * heads that share it.
 *
 * Layouts (contiguous; q and out float32, the caches float32 or bfloat16):
 *   q, out        [B, H, D]
 *   k/v cache     [num_blocks, BS, Hkv, D]; token t of a sequence lives in block
 *                 table[t / BS] at offset t % BS
 *   block_tables  [B, table_stride] int64
 *   seq_lens      [B] int64: context length in tokens, the new token included
 * window > 0 keeps only the last `window` keys (sliding window); <= 0: all.
 * Exact softmax in two passes (scores, then weighted V), float32 arithmetic throughout: a bfloat16 cache
 * element widens exactly to float32 (its 16 bits become the top half), so the two cache types differ only
 * in the bytes read, which decode attention is bound by.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16 floats: one AVX-512 register, two AVX2 or four SSE/NEON ones (GCC splits it).
 * aligned(4): cache rows are only float-aligned. */
typedef float vf __attribute__((vector_size(64), aligned(4)));
#define VL 16

typedef float vf8 __attribute__((vector_size(32), aligned(4)));
typedef float vf4 __attribute__((vector_size(16), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32), aligned(2))); /* 16 bfloat16 values */

/* 16 cache elements as floats: a float32 row as it is, a bfloat16 row widened (zero-extend, shift into the
 * top half: exact). */
static inline vf load_f32(const float *p) { return *(const vf *)p; }
static inline vf load_bf16(const uint16_t *p) { return (vf)(__builtin_convertvector(*(const vh *)p, vi) << 16); }

/* Pairwise: halves added as vectors (a scalar left-to-right loop stays a chain of 16 dependent adds). */
static inline float hsum(vf v) {
    vf8 a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (const char *)&v + sizeof a, sizeof b);
    a += b;
    vf4 c, d;
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (const char *)&a + sizeof c, sizeof d);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* Lane shuffles with constant indices into the concatenation of a and b (GCC >= 12 and clang have
 * __builtin_shufflevector; older GCC spells it __builtin_shuffle with a mask vector). */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* Sixteen horizontal sums at once: lane i of the result is the sum of the 16 lanes of p[BITREV4[i]].
 * FOLD(a, b, w) adds a and b's runs of 2w lanes folded in half: output run k of w lanes is run k / 2 of
 * a (k even) or of b (k odd), its first w lanes plus its last w. Four levels (w = 8, 4, 2, 1) take 16
 * vectors to one: 15 adds and 30 shuffles do the work of 16 hsum()s (~60 operations). */
#define LANE(w, i) ((((i) / (w)) % 2) * VL + ((i) / (w) / 2) * 2 * (w) + (i) % (w))
#define LANES(w, o)                                                                                      \
    LANE(w, 0) + (o), LANE(w, 1) + (o), LANE(w, 2) + (o), LANE(w, 3) + (o), LANE(w, 4) + (o),           \
        LANE(w, 5) + (o), LANE(w, 6) + (o), LANE(w, 7) + (o), LANE(w, 8) + (o), LANE(w, 9) + (o),       \
        LANE(w, 10) + (o), LANE(w, 11) + (o), LANE(w, 12) + (o), LANE(w, 13) + (o), LANE(w, 14) + (o), \
        LANE(w, 15) + (o)
#define FOLD(a, b, w) (SHUF(a, b, LANES(w, 0)) + SHUF(a, b, LANES(w, w)))
static inline vf hsum16(const vf *p) {
    vf h[8], q[4], e[2];
    for (int i = 0; i < 8; i++) h[i] = FOLD(p[2 * i], p[2 * i + 1], 8);
    for (int i = 0; i < 4; i++) q[i] = FOLD(h[2 * i], h[2 * i + 1], 4);
    for (int i = 0; i < 2; i++) e[i] = FOLD(q[2 * i], q[2 * i + 1], 2);
    return FOLD(e[0], e[1], 1);
}
/* hsum16's input order: the dot product of the j-th token of a group of 16 goes to slot BITREV4[j],
 * so that lane j of the result is token j's score. */
static const int BITREV4[VL] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

/* exp(x) for x <= 0, 16 lanes at once (libm's expf is one call per score). Cephes' reduction and
 * degree-6 polynomial: relative error ~2e-7. x below -87 gives exp(-87) ~ 1.6e-38 instead of a
 * denormal, which no softmax sum notices. */
static inline vf exp_nonpositive(vf x) {
    const vf lo = (vf){0} - 87.0f;
    x = (vf)((vi)(x < lo) & (vi)lo) + (vf)(~(vi)(x < lo) & (vi)x); /* max(x, -87) without fast-math */
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to the nearest integer */
    vf n = (x * 1.44269504088896341f + round_magic) - round_magic;
    vf r = x - n * 0.693359375f - n * -2.12194440e-4f; /* ln 2 in two parts keeps r exact */
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi scale = (__builtin_convertvector(n, vi) + 127) << 23; /* 2^n as float bits */
    return p * (vf)scale;
}

/* The rows of one sequence are visited block by block: block i holds tokens
 * [i * BS, (i + 1) * BS), each token a contiguous [Hkv, D] row; `first` may start
 * inside a block. `ahead` points at the same row of the next block (of this block
 * in the last one), which the body prefetches: blocks sit anywhere in the cache, and
 * the hardware prefetcher neither jumps to the next block nor crosses the 4 KiB pages
 * inside one, so without it every block starts with a wait on memory. Pointers and
 * strides are in bytes, so one loop serves both cache types. */
#define FOR_EACH_TOKEN(cache, row, ahead, index)                                                        \
    for (int64_t blk = first / block_size, index = first; index < seq_len; blk++)                       \
        for (const char *row = cache + table[blk] * block_stride + (index % block_size) * token_stride, \
                        *ahead = cache + table[blk + (blk + 1 < last_blk)] * block_stride +             \
                                 (index % block_size) * token_stride,                                   \
                        *blk_end = row + (block_size - index % block_size) * token_stride;             \
             row < blk_end && index < seq_len; row += token_stride, ahead += token_stride, index++)

/* Every 64-byte line of one token's [Hkv, D] row (`bytes` long). */
static inline void prefetch_row(const char *row, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(row + i);
}

/* 16 elements of a cache row at element index i, as floats. */
#define LOAD(row, i) (bf16 ? load_bf16((const uint16_t *)(row) + (i)) : load_f32((const float *)(row) + (i)))

/* One sequence, every head: q and out [H, D], scores [H, n], acc [H, D / VL], parts [H, VL]. `bf16` is a
 * constant at each call site (attend_seq_f32, attend_seq_bf16), so each gets its own loads compiled in. */
static inline __attribute__((always_inline)) void attend_seq(
    const float *q, const char *k_cache, const char *v_cache, const int64_t *table, int64_t seq_len, float *out,
    int num_heads, int num_kv_heads, int head_dim, int block_size, float scale, int64_t window, float *scores,
    vf *acc, vf *parts, const int bf16) {
    const int64_t first = (window > 0 && seq_len > window) ? seq_len - window : 0;
    const int64_t n = seq_len - first;
    const int64_t last_blk = (seq_len + block_size - 1) / block_size;
    const int64_t elem = bf16 ? 2 : 4;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim * elem; /* bytes */
    const int64_t block_stride = token_stride * block_size;
    const int group = num_heads / num_kv_heads;
    const int nv = head_dim / VL; /* head_dim % VL == 0 is checked by the caller */

    /* pass 1: scores[h][t] = scale * q_h . k_t[h / group]. Each dot product is left as 16 lane sums in
     * parts[h][BITREV4[j]] for the j-th token of a group of 16, and each full group (and the last,
     * partial one) is reduced at once; slots past the last token hold stale sums, which only reach
     * lanes not stored. */
    int in_group = 0;
    int64_t group_start = 0; /* score index of the group's first token */
    FOR_EACH_TOKEN(k_cache, k, k_ahead, t) {
        prefetch_row(k_ahead, token_stride);
        for (int h = 0; h < num_heads; h++) {
            const float *qh = q + (int64_t)h * head_dim;
            const char *kh = k + (int64_t)(h / group) * head_dim * elem;
            vf even = *(const vf *)qh * LOAD(kh, 0), odd = {0};
            for (int c = 1; c + 1 < nv; c += 2) { /* two chains: the adds of one hide the other's latency */
                odd += *(const vf *)(qh + c * VL) * LOAD(kh, c * VL);
                even += *(const vf *)(qh + (c + 1) * VL) * LOAD(kh, (c + 1) * VL);
            }
            if (nv % 2 == 0) odd += *(const vf *)(qh + (nv - 1) * VL) * LOAD(kh, (nv - 1) * VL);
            parts[h * VL + BITREV4[in_group]] = even + odd;
        }
        if (++in_group == VL || t + 1 == seq_len) {
            for (int h = 0; h < num_heads; h++) {
                const vf sums = hsum16(parts + h * VL) * scale;
                float *dst = scores + (int64_t)h * n + group_start;
                if (in_group == VL) *(vf *)dst = sums;
                else memcpy(dst, &sums, sizeof(float) * (size_t)in_group);
            }
            group_start += in_group;
            in_group = 0;
        }
    }
    /* softmax per head, kept unnormalised; the sum divides at the end */
    float inv_sum[num_heads];
    for (int h = 0; h < num_heads; h++) {
        float *s = scores + (int64_t)h * n;
        float mx = -INFINITY;
        for (int64_t i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
        vf sum_v = {0};
        int64_t i = 0;
        for (; i + VL <= n; i += VL) {
            vf e = exp_nonpositive(*(vf *)(s + i) - mx);
            *(vf *)(s + i) = e;
            sum_v += e;
        }
        float sum = hsum(sum_v);
        if (i < n) { /* the tail through a zero-padded vector: same exp as the rest */
            vf tail = {0};
            memcpy(&tail, s + i, sizeof(float) * (size_t)(n - i));
            vf e = exp_nonpositive(tail - mx);
            for (int64_t j = 0; j < n - i; j++) {
                s[i + j] = e[j];
                sum += e[j];
            }
        }
        inv_sum[h] = 1.0f / sum;
    }
    /* pass 2: acc_h = sum_t p[h][t] v_t[h / group] */
    memset(acc, 0, sizeof(vf) * (size_t)num_heads * nv);
    FOR_EACH_TOKEN(v_cache, v, v_ahead, t) {
        prefetch_row(v_ahead, token_stride);
        for (int h = 0; h < num_heads; h++) {
            const float p = scores[(int64_t)h * n + (t - first)];
            const char *vh = v + (int64_t)(h / group) * head_dim * elem;
            vf *a = acc + h * nv;
            for (int c = 0; c < nv; c++) a[c] += p * LOAD(vh, c * VL);
        }
    }
    for (int h = 0; h < num_heads; h++)
        for (int c = 0; c < nv; c++)
            for (int i = 0; i < VL; i++) out[(int64_t)h * head_dim + c * VL + i] = acc[h * nv + c][i] * inv_sum[h];
}

#define ATTEND_SEQ_PARAMS                                                                                    \
    const float *q, const char *k_cache, const char *v_cache, const int64_t *table, int64_t seq_len, float *out, \
        int num_heads, int num_kv_heads, int head_dim, int block_size, float scale, int64_t window, float *scores, \
        vf *acc, vf *parts
#define ATTEND_SEQ_ARGS                                                                                     \
    q, k_cache, v_cache, table, seq_len, out, num_heads, num_kv_heads, head_dim, block_size, scale, window, \
        scores, acc, parts
static void attend_seq_f32(ATTEND_SEQ_PARAMS) { attend_seq(ATTEND_SEQ_ARGS, 0); }
static void attend_seq_bf16(ATTEND_SEQ_PARAMS) { attend_seq(ATTEND_SEQ_ARGS, 1); }

/* kv_bf16: the caches hold bfloat16 (else float32). Returns 0 on success, -1 when a work buffer could not
 * be allocated, -2 when head_dim is not a multiple of 16. */
int pdserve_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                                   const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens,
                                   float *out, int batch, int num_heads, int num_kv_heads, int head_dim,
                                   int block_size, float scale, int64_t window, int num_threads, int kv_bf16) {
    if (head_dim % VL != 0) return -2;
    int64_t max_len = 0;
    for (int b = 0; b < batch; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        float *scores = malloc(sizeof(float) * (size_t)num_heads * (size_t)(max_len > 0 ? max_len : 1));
        vf *acc = aligned_alloc(64, sizeof(vf) * (size_t)num_heads * (head_dim / VL));
        vf *parts = aligned_alloc(64, sizeof(vf) * (size_t)num_heads * VL);
        if (parts != NULL) memset(parts, 0, sizeof(vf) * (size_t)num_heads * VL); /* unused slots stay finite */
        if (scores == NULL || acc == NULL || parts == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        /* longest first (callers pass them sorted ascending): the dynamic schedule then balances */
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < batch; i++) {
            const int b = batch - 1 - i;
            if (scores == NULL || acc == NULL || parts == NULL) continue;
            const int64_t offset = (int64_t)b * num_heads * head_dim;
            (kv_bf16 ? attend_seq_bf16 : attend_seq_f32)(
                q + offset, k_cache, v_cache, block_tables + (int64_t)b * table_stride, seq_lens[b], out + offset,
                num_heads, num_kv_heads, head_dim, block_size, scale, window, scores, acc, parts);
        }
        free(scores);
        free(acc);
        free(parts);
    }
    return failed ? -1 : 0;
}
