/* Paged decode attention for the CPU, reading K/V blocks where they are.
 *
 * One new token per sequence attends to its whole paged context. The torch path
 * gathers each sequence's blocks into a contiguous buffer and runs SDPA over it:
 * one extra pass over the context per layer and step, and with grouped-query
 * attention SDPA reads each KV head once per query head. Here each (sequence,
 * KV head) reads its K and V once, straight from the cache, for all the query
 * heads that share it.
 *
 * Layouts (float32, contiguous):
 *   q, out        [B, H, D]
 *   k/v cache     [num_blocks, BS, Hkv, D]; token t of a sequence lives in block
 *                 table[t / BS] at offset t % BS
 *   block_tables  [B, table_stride] int64
 *   seq_lens      [B] int64: context length in tokens, the new token included
 * window > 0 keeps only the last `window` keys (sliding window); <= 0: all.
 * Exact softmax in two passes (scores, then weighted V), float32 throughout.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16 floats: one AVX-512 register, two AVX2 or four SSE/NEON ones (GCC splits it).
 * aligned(4): cache rows are only float-aligned. */
typedef float vf __attribute__((vector_size(64), aligned(4)));
#define VL 16

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

/* The rows of one sequence are visited block by block: block i holds tokens
 * [i * BS, (i + 1) * BS), each token a contiguous [Hkv, D] row, so a block is
 * read front to back (what the hardware prefetcher follows); `first` may start
 * inside a block. The next block is prefetched while this one is read. */
#define FOR_EACH_TOKEN(cache, row, index)                                                               \
    for (int64_t blk = first / block_size, index = first; index < seq_len; blk++)                       \
        for (const float *row = (__builtin_prefetch(cache + table[blk + (blk + 1 < last_blk)] * block_stride), \
                                 cache + table[blk] * block_stride + (index % block_size) * token_stride),  \
                         *blk_end = row + (block_size - index % block_size) * token_stride;            \
             row < blk_end && index < seq_len; row += token_stride, index++)

/* One sequence, every head: q and out [H, D], scores [H, n], acc [H, D / VL]. */
static void attend_seq(const float *q, const float *k_cache, const float *v_cache, const int64_t *table,
                       int64_t seq_len, float *out, int num_heads, int num_kv_heads, int head_dim, int block_size,
                       float scale, int64_t window, float *scores, vf *acc) {
    const int64_t first = (window > 0 && seq_len > window) ? seq_len - window : 0;
    const int64_t n = seq_len - first;
    const int64_t last_blk = (seq_len + block_size - 1) / block_size;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int64_t block_stride = token_stride * block_size;
    const int group = num_heads / num_kv_heads;
    const int nv = head_dim / VL; /* head_dim % VL == 0 is checked by the caller */

    /* pass 1: scores[h][t] = scale * q_h . k_t[h / group] */
    FOR_EACH_TOKEN(k_cache, k, t) {
        for (int h = 0; h < num_heads; h++) {
            const float *qh = q + (int64_t)h * head_dim, *kh = k + (int64_t)(h / group) * head_dim;
            vf dot = *(const vf *)qh * *(const vf *)kh;
            for (int c = 1; c < nv; c++) dot += *(const vf *)(qh + c * VL) * *(const vf *)(kh + c * VL);
            scores[(int64_t)h * n + (t - first)] = hsum(dot) * scale;
        }
    }
    /* softmax per head, kept unnormalised; the sum divides at the end */
    float inv_sum[num_heads];
    for (int h = 0; h < num_heads; h++) {
        float *s = scores + (int64_t)h * n;
        float mx = -INFINITY;
        for (int64_t i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
        float sum = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            s[i] = expf(s[i] - mx);
            sum += s[i];
        }
        inv_sum[h] = 1.0f / sum;
    }
    /* pass 2: acc_h = sum_t p[h][t] v_t[h / group] */
    memset(acc, 0, sizeof(vf) * (size_t)num_heads * nv);
    FOR_EACH_TOKEN(v_cache, v, t) {
        for (int h = 0; h < num_heads; h++) {
            const float p = scores[(int64_t)h * n + (t - first)];
            const float *vh = v + (int64_t)(h / group) * head_dim;
            vf *a = acc + h * nv;
            for (int c = 0; c < nv; c++) a[c] += p * *(const vf *)(vh + c * VL);
        }
    }
    for (int h = 0; h < num_heads; h++)
        for (int c = 0; c < nv; c++)
            for (int i = 0; i < VL; i++) out[(int64_t)h * head_dim + c * VL + i] = acc[h * nv + c][i] * inv_sum[h];
}

/* Returns 0 on success, -1 when a work buffer could not be allocated, -2 when head_dim is not a
 * multiple of 16. */
int pdserve_paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                                       const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens,
                                       float *out, int batch, int num_heads, int num_kv_heads, int head_dim,
                                       int block_size, float scale, int64_t window, int num_threads) {
    if (head_dim % VL != 0) return -2;
    int64_t max_len = 0;
    for (int b = 0; b < batch; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        float *scores = malloc(sizeof(float) * (size_t)num_heads * (size_t)(max_len > 0 ? max_len : 1));
        vf *acc = aligned_alloc(64, sizeof(vf) * (size_t)num_heads * (head_dim / VL));
        if (scores == NULL || acc == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        /* longest first (callers pass them sorted ascending): the dynamic schedule then balances */
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < batch; i++) {
            const int b = batch - 1 - i;
            if (scores == NULL || acc == NULL) continue;
            const int64_t offset = (int64_t)b * num_heads * head_dim;
            attend_seq(q + offset, k_cache, v_cache, block_tables + (int64_t)b * table_stride, seq_lens[b],
                       out + offset, num_heads, num_kv_heads, head_dim, block_size, scale, window, scores, acc);
        }
        free(scores);
        free(acc);
    }
    return failed ? -1 : 0;
}
