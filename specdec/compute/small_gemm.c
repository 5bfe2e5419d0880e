/* Batch-invariant fp32 linear for the few rows of a decode or verify step (AVX2 + FMA; AVX-512 where built with it).
 *
 * y[m, n] = x[m, :] . w[n, :] (+ bias[n]). Each output is reduced in the same order whatever
 * the number of rows, so verifying k tokens gives bit-identical results to decoding them one
 * by one. W streams from memory once for up to 8 rows: a step with a few rows costs about
 * what one row costs, where a BLAS GEMM packs W and goes compute-bound.
 *
 * With two rows or more the FMAs keep the core busy long enough that the hardware prefetcher
 * falls behind and weight lines arrive late, so those passes also prefetch W into L2
 * PREFETCH_AHEAD floats ahead (an 8-token SmolLM2 forward went from 2.5x to 1.8x a 1-token one,
 * python -m bench.verify_cost on a 2-core CPU). One row is a pure stream the hardware prefetcher keeps up with.
 *
 * q4_1_gemm and q8_0_gemm read W in GGUF's blocks of 32 (4-bit codes with a scale and a minimum,
 * or 8-bit codes with a scale) and rebuild each weight in registers exactly as gguf-py
 * de-quantises it: d * q + m, one rounding per operation (built with -ffp-contract=off, so no
 * FMA fuses them). The weights are then the same fp32 values the model holds and the FMAs run
 * in small_gemm's order, so all three kernels give the same bits, while a decode step reads
 * 0.75 or 1.125 bytes per weight instead of 4. Their passes read several rows of W at once
 * (several outputs, below), so every pass, one-row ones too, prefetches the codes ahead.
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS_PER_PASS 8
#define PREFETCH_AHEAD 4096  /* floats: 16 KiB, well inside L2 */

static inline float sum_lanes(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
/* AVX-512 (built where the CPU has it): 32 registers, and each output accumulates in 16 lanes, so an
 * FMA does twice the work of an AVX2 one (on CPUs with full-width 512-bit units, about 1.7x the
 * multiply-adds per second). All kernels of a build, at every row count, reduce each output in its
 * build's one order: batch-invariant within a build, other bits than the AVX2 build's. */
#define WIDE 1
typedef __m512 vec;
#define LANES 16
#define vec_zero _mm512_setzero_ps
#define vec_load _mm512_loadu_ps
#define vec_fma _mm512_fmadd_ps
static inline float vec_sum(__m512 v) {
    return sum_lanes(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
#else
typedef __m256 vec;
#define LANES 8
#define vec_zero _mm256_setzero_ps
#define vec_load _mm256_loadu_ps
#define vec_fma _mm256_fmadd_ps
#define vec_sum sum_lanes
#endif

/* rows is a compile-time constant at every call site, so acc[] lives in registers. */
static inline __attribute__((always_inline)) void pass(const float *x, const float *w, const float *bias, float *y,
                                                       int64_t n_out, int64_t k_in, int64_t ldy, const int rows) {
    const int64_t k_vec = k_in & ~(int64_t)(LANES - 1);
    for (int64_t n = 0; n < n_out; n++) {
        const float *w_row = w + n * k_in;
        vec acc[ROWS_PER_PASS];
        for (int m = 0; m < rows; m++) acc[m] = vec_zero();
        for (int64_t k = 0; k < k_vec; k += LANES) {
            if (rows > 1 && (k & 15) == 0) _mm_prefetch((const char *)(w_row + k + PREFETCH_AHEAD), _MM_HINT_T1);
            const vec w_vec = vec_load(w_row + k);
            for (int m = 0; m < rows; m++) acc[m] = vec_fma(w_vec, vec_load(x + m * k_in + k), acc[m]);
        }
        for (int m = 0; m < rows; m++) {
            float s = vec_sum(acc[m]);
            for (int64_t k = k_vec; k < k_in; k++) s += w_row[k] * x[m * k_in + k];
            y[m * ldy + n] = bias ? s + bias[n] : s;
        }
    }
}

#define PASS(r) case r: pass(x + m0 * k_in, w, bias, y + m0 * ldy, n_out, k_in, ldy, r); break;

/* Outputs [0, n_out) of w and bias into the columns of y, whose rows are ldy floats apart. */
static void small_gemm_range(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t n_out,
                             int64_t k_in, int64_t ldy) {
    for (int64_t m0 = 0; m0 < rows; m0 += ROWS_PER_PASS) {
        switch (rows - m0 < ROWS_PER_PASS ? rows - m0 : ROWS_PER_PASS) { PASS(1) PASS(2) PASS(3) PASS(4) PASS(5) PASS(6) PASS(7) PASS(8) }
    }
}

#define BLOCK 32
#define MAX_OUTS 4

#ifdef WIDE
/* Independent FMA chains per pass; with 32 registers two rows can take four outputs and 3-8 rows
 * two without spilling (bench/RESULTS.md times the whole model against the AVX2 build). */
#define OUTPUTS_PER_PASS(rows) ((rows) <= 2 ? 4 : 2)
#else
#define OUTPUTS_PER_PASS(rows) ((rows) == 1 ? 4 : (rows) == 2 ? 2 : 1)
#endif
#define CODES_PREFETCH_AHEAD 4096  /* bytes of codes: 4 KiB */

/* Weights k0..k0+31 of one Q4_1 block, LANES per vector: codes 0-15 in the low nibbles of its 16 bytes, 16-31
 * in the high ones. */
static inline __attribute__((always_inline)) void q4_1_weights(const uint8_t *codes, float scale, float minimum,
                                                               vec w[BLOCK / LANES]) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)codes);
    const __m128i low_nibbles = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low_nibbles), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles);
#ifdef WIDE
    const __m512 d = _mm512_set1_ps(scale), m = _mm512_set1_ps(minimum);
    w[0] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo))), m);
    w[1] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi))), m);
#else
    const __m256 d = _mm256_set1_ps(scale), m = _mm256_set1_ps(minimum);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    _Pragma("GCC unroll 8") for (int j = 0; j < 4; j++)
        w[j] = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]))), m);
#endif
}

static inline __attribute__((always_inline)) void q8_0_weights(const uint8_t *codes, float scale, vec w[BLOCK / LANES]) {
#ifdef WIDE
    const __m512 d = _mm512_set1_ps(scale);
    w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes))), d);
    w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16)))), d);
#else
    const __m256 d = _mm256_set1_ps(scale);
    _Pragma("GCC unroll 8") for (int j = 0; j < 4; j++)
        w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8 * j)))), d);
#endif
}

/* Outputs n..n+outs-1 for rows of x. Each output keeps small_gemm's one accumulator and order;
 * several outputs at once give the FMA chains the independence that rows give (with AVX2's 16 ymm
 * registers, more than two rows with two outputs spill). */
static inline __attribute__((always_inline)) void block_outputs(const float *x, const uint8_t *codes, const float *scale,
                                                                const float *minimum, const float *bias, float *y,
                                                                int64_t ldy, int64_t k_in, int64_t n, const int rows,
                                                                const int outs, const int code_bytes) {
    const int64_t blocks = k_in / BLOCK;
    vec acc[MAX_OUTS][ROWS_PER_PASS];
    _Pragma("GCC unroll 8") for (int u = 0; u < outs; u++)
        _Pragma("GCC unroll 8") for (int m = 0; m < rows; m++) acc[u][m] = vec_zero();
    for (int64_t b = 0; b < blocks; b++) {
        _Pragma("GCC unroll 8") for (int u = 0; u < outs; u++) {
            const int64_t block = (n + u) * blocks + b;
            const uint8_t *block_codes = codes + block * code_bytes;
            if ((block * code_bytes) % 64 < code_bytes) _mm_prefetch((const char *)(block_codes + CODES_PREFETCH_AHEAD), _MM_HINT_T1);
            vec w[BLOCK / LANES];
            if (code_bytes == BLOCK / 2) q4_1_weights(block_codes, scale[block], minimum[block], w);
            else q8_0_weights(block_codes, scale[block], w);
            _Pragma("GCC unroll 8") for (int j = 0; j < BLOCK / LANES; j++)
                _Pragma("GCC unroll 8") for (int m = 0; m < rows; m++)
                    acc[u][m] = vec_fma(w[j], vec_load(x + m * k_in + b * BLOCK + LANES * j), acc[u][m]);
        }
    }
    _Pragma("GCC unroll 8") for (int u = 0; u < outs; u++)
        _Pragma("GCC unroll 8") for (int m = 0; m < rows; m++) {
            float s = vec_sum(acc[u][m]);
            y[m * ldy + n + u] = bias ? s + bias[n + u] : s;
        }
}

/* codes [n_out, k_in / 32, code_bytes], scale and minimum [n_out, k_in / 32]; k_in % 32 == 0. */
static inline __attribute__((always_inline)) void block_pass(const float *x, const uint8_t *codes, const float *scale,
                                                             const float *minimum, const float *bias, float *y,
                                                             int64_t n_out, int64_t k_in, int64_t ldy, const int rows,
                                                             const int code_bytes) {
    const int outs = OUTPUTS_PER_PASS(rows);
    int64_t n = 0;
    for (; n + outs <= n_out; n += outs) block_outputs(x, codes, scale, minimum, bias, y, ldy, k_in, n, rows, outs, code_bytes);
    for (; n < n_out; n++) block_outputs(x, codes, scale, minimum, bias, y, ldy, k_in, n, rows, 1, code_bytes);
}

/* One function per (format, rows): each gets its registers to itself. */
#define BLOCK_PASS_FN(name, r, code_bytes)                                                                              \
    static __attribute__((noinline)) void name##_##r(const float *x, const uint8_t *codes, const float *scale,           \
                                                     const float *minimum, const float *bias, float *y, int64_t n_out,  \
                                                     int64_t k_in, int64_t ldy) {                                       \
        block_pass(x, codes, scale, minimum, bias, y, n_out, k_in, ldy, r, code_bytes);                                \
    }
#define BLOCK_PASS_FNS(name, code_bytes)                                                                               \
    BLOCK_PASS_FN(name, 1, code_bytes) BLOCK_PASS_FN(name, 2, code_bytes) BLOCK_PASS_FN(name, 3, code_bytes)             \
    BLOCK_PASS_FN(name, 4, code_bytes) BLOCK_PASS_FN(name, 5, code_bytes) BLOCK_PASS_FN(name, 6, code_bytes)             \
    BLOCK_PASS_FN(name, 7, code_bytes) BLOCK_PASS_FN(name, 8, code_bytes)
#define BLOCK_PASS(name, r) case r: name##_##r(x + m0 * k_in, codes, scale, minimum, bias, y + m0 * ldy, n_out, k_in, ldy); break;
#define BLOCK_GEMM(name, code_bytes)                                                                                   \
    BLOCK_PASS_FNS(name, code_bytes)                                                                                   \
    static void name##_range(const float *x, const uint8_t *codes, const float *scale, const float *minimum,          \
                             const float *bias, float *y, int64_t rows, int64_t n_out, int64_t k_in, int64_t ldy) {   \
        for (int64_t m0 = 0; m0 < rows; m0 += ROWS_PER_PASS) {                                                         \
            switch (rows - m0 < ROWS_PER_PASS ? rows - m0 : ROWS_PER_PASS) {                                           \
                BLOCK_PASS(name, 1) BLOCK_PASS(name, 2) BLOCK_PASS(name, 3) BLOCK_PASS(name, 4)                         \
                BLOCK_PASS(name, 5) BLOCK_PASS(name, 6) BLOCK_PASS(name, 7) BLOCK_PASS(name, 8)                         \
            }                                                                                                          \
        }                                                                                                              \
    }

BLOCK_GEMM(q4_1_gemm, BLOCK / 2)
BLOCK_GEMM(q8_0_gemm, BLOCK)

/* Attention of packed rows over paged KV: each row is one query position of one session, attending to
 * that session's positions 0 .. row_len-1, whose K and V lie in slots of a shared store, block_size slots
 * per block, found through the session's block table. Every (row, KV head) item is computed by one thread
 * in an order fixed by its own length alone, so a row gets the same bits whatever else shares the pass,
 * and a k-token verify gives each position the bits it gets decoded alone. */
#include <math.h>
#include <stdlib.h>

typedef struct {
    const float *q;                /* [rows, heads, head_dim] */
    float *out;                    /* [rows, heads, head_dim] */
    const float *k_store, *v_store;  /* [slots, kv_heads, head_dim] */
    const int32_t *block_table;    /* every session's blocks, concatenated */
    const int64_t *row_blocks;     /* [rows]: where the row's session starts in block_table */
    const int32_t *row_len;        /* [rows]: positions the row attends to, its own included */
    int64_t heads, kv_heads, head_dim, block_size;
    float scale;
} attention_args;

#define DOT_POSITIONS 4  /* independent FMA chains: scores of 4 positions at once */
#define MAX_HEAD_VECS 32 /* head_dim up to 256 */

/* exp for the lanes of x <= 0 (scores minus their maximum): Cody-Waite reduction and a degree-6
 * polynomial; lanes below -87 give 0. */
static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

static __thread float *scratch;
static __thread int64_t scratch_floats;

static float *scratch_for(int64_t floats) {
    if (floats > scratch_floats) {
        free(scratch);
        scratch = aligned_alloc(32, (size_t)((floats + 7) & ~(int64_t)7) * sizeof(float));
        scratch_floats = scratch ? floats : 0;
    }
    return scratch;
}

/* Where position's K (in k_store) and V (in v_store) of one KV head start. */
static inline int64_t slot_offset(const attention_args *a, const int32_t *blocks, int64_t position, int64_t kv_head) {
    const int64_t slot = (int64_t)blocks[position / a->block_size] * a->block_size + position % a->block_size;
    return (slot * a->kv_heads + kv_head) * a->head_dim;
}

/* One row's query heads that share KV head kv_head (heads / kv_heads of them). */
static inline __attribute__((always_inline)) void attend_heads(const attention_args *a, int64_t row, int64_t kv_head,
                                                               const int64_t head_dim) {
    const int64_t group = a->heads / a->kv_heads, len = a->row_len[row], padded = (len + 7) & ~(int64_t)7;
    const int64_t vecs = head_dim / 8, vec_dims = vecs * 8;
    const int32_t *blocks = a->block_table + a->row_blocks[row];
    float *scores = scratch_for(group * padded);
    if (!scores) abort();  /* out of memory: no answer beats a wrong one */
    /* 1. Scores: each a chain of FMAs over head_dim then a sum of the lanes, the same for any grouping. */
    for (int64_t j0 = 0; j0 < len; j0 += DOT_POSITIONS) {
        const float *k[DOT_POSITIONS];
        for (int i = 0; i < DOT_POSITIONS; i++) k[i] = a->k_store + slot_offset(a, blocks, j0 + i < len ? j0 + i : len - 1, kv_head);
        for (int64_t h = 0; h < group; h++) {
            const float *q = a->q + (row * a->heads + kv_head * group + h) * head_dim;
            __m256 acc[DOT_POSITIONS];
            for (int i = 0; i < DOT_POSITIONS; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t d = 0; d < vec_dims; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
                for (int i = 0; i < DOT_POSITIONS; i++) acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[i] + d), acc[i]);
            }
            for (int i = 0; i < DOT_POSITIONS && j0 + i < len; i++) {
                float s = sum_lanes(acc[i]);
                for (int64_t d = vec_dims; d < head_dim; d++) s += q[d] * k[i][d];
                scores[h * padded + j0 + i] = s * a->scale;
            }
        }
    }
    for (int64_t h = 0; h < group; h++) {
        float *s = scores + h * padded;
        /* 2. Softmax weights, unnormalised: exp(s - max), the padding lanes 0. */
        float max = s[0];
        for (int64_t j = 1; j < len; j++) max = s[j] > max ? s[j] : max;
        for (int64_t j = len; j < padded; j++) s[j] = -INFINITY;
        const __m256 max_v = _mm256_set1_ps(max);
        __m256 total = _mm256_setzero_ps();
        for (int64_t j = 0; j < padded; j += 8) {
            const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), max_v));
            _mm256_storeu_ps(s + j, e);
            total = _mm256_add_ps(total, e);
        }
        const float inverse = 1.0f / sum_lanes(total);
        /* 3. The weighted sum of V, position by position. */
        __m256 acc[MAX_HEAD_VECS];
        float tail[8] = {0};
        for (int64_t v = 0; v < vecs; v++) acc[v] = _mm256_setzero_ps();
        for (int64_t j = 0; j < len; j++) {
            const float *value = a->v_store + slot_offset(a, blocks, j, kv_head);
            const __m256 weight = _mm256_set1_ps(s[j]);
            for (int64_t v = 0; v < vecs; v++) acc[v] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + 8 * v), acc[v]);
            for (int64_t d = vec_dims; d < head_dim; d++) tail[d - vec_dims] += s[j] * value[d];
        }
        float *out = a->out + (row * a->heads + kv_head * group + h) * head_dim;
        const __m256 inverse_v = _mm256_set1_ps(inverse);
        for (int64_t v = 0; v < vecs; v++) _mm256_storeu_ps(out + 8 * v, _mm256_mul_ps(acc[v], inverse_v));
        for (int64_t d = vec_dims; d < head_dim; d++) out[d] = tail[d - vec_dims] * inverse;
    }
}

static __attribute__((noinline)) void attend_64(const attention_args *a, int64_t row, int64_t kv_head) { attend_heads(a, row, kv_head, 64); }
static __attribute__((noinline)) void attend_any(const attention_args *a, int64_t row, int64_t kv_head) {
    attend_heads(a, row, kv_head, a->head_dim);
}

static void attend(const attention_args *a, int64_t row, int64_t kv_head) {
    (a->head_dim == 64 ? attend_64 : attend_any)(a, row, kv_head);
}

/* Each kernel's outputs are split among the pool's threads (kernel_pool.c): its arguments travel in the job. */
#include "kernel_pool.h"

typedef struct {
    const float *x, *w, *scale, *minimum, *bias;
    const uint8_t *codes;
    float *y;
    int64_t rows, n_out, k_in;
} linear_args;

static void fp32_chunk(const void *args, int64_t n0, int64_t n1) {
    const linear_args *j = args;
    const float *bias = j->bias ? j->bias + n0 : NULL;
    small_gemm_range(j->x, j->w + n0 * j->k_in, bias, j->y + n0, j->rows, n1 - n0, j->k_in, j->n_out);
}

#define BLOCK_CHUNK_FN(name, code_bytes)                                                                                \
    static void name##_chunk(const void *args, int64_t n0, int64_t n1) {                                               \
        const linear_args *j = args;                                                                                   \
        const int64_t blocks = j->k_in / BLOCK;                                                                        \
        name##_range(j->x, j->codes + n0 * blocks * (code_bytes), j->scale + n0 * blocks,                              \
                     j->minimum ? j->minimum + n0 * blocks : NULL, j->bias ? j->bias + n0 : NULL, j->y + n0, j->rows,  \
                     n1 - n0, j->k_in, j->n_out);                                                                      \
    }
BLOCK_CHUNK_FN(q4_1_gemm, BLOCK / 2)
BLOCK_CHUNK_FN(q8_0_gemm, BLOCK)

static void attention_chunk(const void *args, int64_t n0, int64_t n1) {
    const attention_args *a = args;
    for (int64_t item = n0; item < n1; item++) attend(a, item / a->kv_heads, item % a->kv_heads);
}

static const pool_split LINEAR_SPLIT = {.granule = 4, .min_chunk = 32, .min_split = 128};  /* whole groups of 4 outputs */
static const pool_split ATTENTION_SPLIT = {.granule = 1, .min_chunk = 1, .min_split = 2};  /* items vary: small chunks balance them */

/* The calling convention of this library's functions; a library of another one is not loaded. */
int small_gemm_abi_version(void) { return 3; }

/* x [rows, k_in], w [n_out, k_in], bias [n_out] or NULL, y [rows, n_out]; all contiguous. */
void small_gemm(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t n_out, int64_t k_in) {
    const linear_args args = {.x = x, .w = w, .bias = bias, .y = y, .rows = rows, .n_out = n_out, .k_in = k_in};
    pool_run(fp32_chunk, &args, sizeof args, n_out, LINEAR_SPLIT);
}

/* x [rows, k_in], codes [n_out, k_in / 32, 16], scale and minimum [n_out, k_in / 32], y [rows, n_out]. */
void q4_1_gemm(const float *x, const uint8_t *codes, const float *scale, const float *minimum, const float *bias,
               float *y, int64_t rows, int64_t n_out, int64_t k_in) {
    const linear_args args = {.x = x, .codes = codes, .scale = scale, .minimum = minimum, .bias = bias, .y = y,
                              .rows = rows, .n_out = n_out, .k_in = k_in};
    pool_run(q4_1_gemm_chunk, &args, sizeof args, n_out, LINEAR_SPLIT);
}

/* As q4_1_gemm with codes [n_out, k_in / 32, 32]; minimum is ignored (NULL). */
void q8_0_gemm(const float *x, const uint8_t *codes, const float *scale, const float *minimum, const float *bias,
               float *y, int64_t rows, int64_t n_out, int64_t k_in) {
    const linear_args args = {.x = x, .codes = codes, .scale = scale, .bias = bias, .y = y, .rows = rows,
                              .n_out = n_out, .k_in = k_in};
    (void)minimum;
    pool_run(q8_0_gemm_chunk, &args, sizeof args, n_out, LINEAR_SPLIT);
}

enum { ATTENTION_OK = 0, ATTENTION_BAD_SHAPE = 1, ATTENTION_BAD_ROW = 2, ATTENTION_BAD_BLOCK = 3 };

/* Every index the rows will follow, checked before any is: the row's blocks lie inside the block table
 * and every block they name inside the store. */
static int check_attention(const attention_args *a, int64_t rows, int64_t slots, int64_t table_len) {
    if (rows < 0 || a->heads < 1 || a->kv_heads < 1 || a->heads % a->kv_heads || a->head_dim < 1
        || a->head_dim > 8 * MAX_HEAD_VECS || a->block_size < 1 || slots < 0 || table_len < 0)
        return ATTENTION_BAD_SHAPE;
    const int64_t store_blocks = slots / a->block_size;
    for (int64_t row = 0; row < rows; row++) {
        const int64_t first = a->row_blocks[row], len = a->row_len[row], blocks = (len + a->block_size - 1) / a->block_size;
        if (len < 1 || first < 0 || blocks > table_len - first) return ATTENTION_BAD_ROW;
        for (int64_t b = first; b < first + blocks; b++)
            if (a->block_table[b] < 0 || a->block_table[b] >= store_blocks) return ATTENTION_BAD_BLOCK;
    }
    return ATTENTION_OK;
}

/* q and out [rows, heads, head_dim]; k_store and v_store [slots, kv_heads, head_dim]; block_table [table_len];
 * head_dim <= 256. Returns ATTENTION_OK, or what check_attention found, having written nothing. */
int paged_attention(const float *q, float *out, const float *k_store, const float *v_store, const int32_t *block_table,
                    const int64_t *row_blocks, const int32_t *row_len, int64_t rows, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, int64_t block_size, int64_t slots, int64_t table_len, float scale) {
    const attention_args args = {q, out, k_store, v_store, block_table, row_blocks, row_len, heads, kv_heads, head_dim,
                                 block_size, scale};
    const int status = check_attention(&args, rows, slots, table_len);
    if (status == ATTENTION_OK) pool_run(attention_chunk, &args, sizeof args, rows * kv_heads, ATTENTION_SPLIT);
    return status;
}
