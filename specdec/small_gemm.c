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

/* rows is a compile-time constant at every call site, so acc[] lives in registers. */
static inline __attribute__((always_inline)) void pass(const float *x, const float *w, const float *bias, float *y,
                                                       int64_t n_out, int64_t k_in, const int rows) {
    const int64_t k_vec = k_in & ~(int64_t)7;
    for (int64_t n = 0; n < n_out; n++) {
        const float *w_row = w + n * k_in;
        __m256 acc[ROWS_PER_PASS];
        for (int m = 0; m < rows; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t k = 0; k < k_vec; k += 8) {
            if (rows > 1 && (k & 15) == 0) _mm_prefetch((const char *)(w_row + k + PREFETCH_AHEAD), _MM_HINT_T1);
            __m256 w_vec = _mm256_loadu_ps(w_row + k);
            for (int m = 0; m < rows; m++) acc[m] = _mm256_fmadd_ps(w_vec, _mm256_loadu_ps(x + m * k_in + k), acc[m]);
        }
        for (int m = 0; m < rows; m++) {
            float s = sum_lanes(acc[m]);
            for (int64_t k = k_vec; k < k_in; k++) s += w_row[k] * x[m * k_in + k];
            y[m * n_out + n] = bias ? s + bias[n] : s;
        }
    }
}

#define PASS(r) case r: pass(x + m0 * k_in, w, bias, y + m0 * n_out, n_out, k_in, r); break;

/* x [rows, k_in], w [n_out, k_in], bias [n_out] or NULL, y [rows, n_out]; all contiguous. */
void small_gemm(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t n_out, int64_t k_in) {
    for (int64_t m0 = 0; m0 < rows; m0 += ROWS_PER_PASS) {
        switch (rows - m0 < ROWS_PER_PASS ? rows - m0 : ROWS_PER_PASS) { PASS(1) PASS(2) PASS(3) PASS(4) PASS(5) PASS(6) PASS(7) PASS(8) }
    }
}

#define BLOCK 32
#define MAX_OUTS 4

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
/* AVX-512 (built where the CPU has it): 32 vector registers and half the de-quantising instructions.
 * The weights are rebuilt 16 at a time with the same per-lane operations, then split into the four
 * 8-wide vectors the FMAs use, so every output is still reduced in the same order: same bits. */
#define WIDE 1
static inline __attribute__((always_inline)) void split_halves(__m512 v, __m256 out[2]) {
    out[0] = _mm512_castps512_ps256(v);
    out[1] = _mm512_extractf32x8_ps(v, 1);
}
/* Independent FMA chains per pass; with 32 registers two rows can take four outputs and 3-8 rows
 * two without spilling (bench/RESULTS.md times the whole model against the AVX2 build). */
#define OUTPUTS_PER_PASS(rows) ((rows) <= 2 ? 4 : 2)
#else
#define OUTPUTS_PER_PASS(rows) ((rows) == 1 ? 4 : (rows) == 2 ? 2 : 1)
#endif
#define CODES_PREFETCH_AHEAD 4096  /* bytes of codes: 4 KiB */

/* Weights k0..k0+31 of one Q4_1 block: codes 0-15 in the low nibbles of its 16 bytes, 16-31 in the high ones. */
static inline __attribute__((always_inline)) void q4_1_weights(const uint8_t *codes, float scale, float minimum, __m256 w[4]) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)codes);
    const __m128i low_nibbles = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low_nibbles), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles);
#ifdef WIDE
    const __m512 d = _mm512_set1_ps(scale), m = _mm512_set1_ps(minimum);
    split_halves(_mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo))), m), w);
    split_halves(_mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi))), m), w + 2);
#else
    const __m256 d = _mm256_set1_ps(scale), m = _mm256_set1_ps(minimum);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    _Pragma("GCC unroll 8") for (int j = 0; j < 4; j++)
        w[j] = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]))), m);
#endif
}

static inline __attribute__((always_inline)) void q8_0_weights(const uint8_t *codes, float scale, __m256 w[4]) {
#ifdef WIDE
    const __m512 d = _mm512_set1_ps(scale);
    split_halves(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes))), d), w);
    split_halves(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16)))), d), w + 2);
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
                                                                int64_t n_out, int64_t k_in, int64_t n, const int rows,
                                                                const int outs, const int code_bytes) {
    const int64_t blocks = k_in / BLOCK;
    __m256 acc[MAX_OUTS][ROWS_PER_PASS];
    _Pragma("GCC unroll 8") for (int u = 0; u < outs; u++)
        _Pragma("GCC unroll 8") for (int m = 0; m < rows; m++) acc[u][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        _Pragma("GCC unroll 8") for (int u = 0; u < outs; u++) {
            const int64_t block = (n + u) * blocks + b;
            const uint8_t *block_codes = codes + block * code_bytes;
            if ((block * code_bytes) % 64 < code_bytes) _mm_prefetch((const char *)(block_codes + CODES_PREFETCH_AHEAD), _MM_HINT_T1);
            __m256 w[4];
            if (code_bytes == BLOCK / 2) q4_1_weights(block_codes, scale[block], minimum[block], w);
            else q8_0_weights(block_codes, scale[block], w);
            _Pragma("GCC unroll 8") for (int j = 0; j < 4; j++)
                _Pragma("GCC unroll 8") for (int m = 0; m < rows; m++)
                    acc[u][m] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + m * k_in + b * BLOCK + 8 * j), acc[u][m]);
        }
    }
    _Pragma("GCC unroll 8") for (int u = 0; u < outs; u++)
        _Pragma("GCC unroll 8") for (int m = 0; m < rows; m++) {
            float s = sum_lanes(acc[u][m]);
            y[m * n_out + n + u] = bias ? s + bias[n + u] : s;
        }
}

/* codes [n_out, k_in / 32, code_bytes], scale and minimum [n_out, k_in / 32]; k_in % 32 == 0. */
static inline __attribute__((always_inline)) void block_pass(const float *x, const uint8_t *codes, const float *scale,
                                                             const float *minimum, const float *bias, float *y,
                                                             int64_t n_out, int64_t k_in, const int rows, const int code_bytes) {
    const int outs = OUTPUTS_PER_PASS(rows);
    int64_t n = 0;
    for (; n + outs <= n_out; n += outs) block_outputs(x, codes, scale, minimum, bias, y, n_out, k_in, n, rows, outs, code_bytes);
    for (; n < n_out; n++) block_outputs(x, codes, scale, minimum, bias, y, n_out, k_in, n, rows, 1, code_bytes);
}

/* One function per (format, rows): each gets its registers to itself. */
#define BLOCK_PASS_FN(name, r, code_bytes)                                                                              \
    static __attribute__((noinline)) void name##_##r(const float *x, const uint8_t *codes, const float *scale,           \
                                                     const float *minimum, const float *bias, float *y, int64_t n_out,  \
                                                     int64_t k_in) {                                                    \
        block_pass(x, codes, scale, minimum, bias, y, n_out, k_in, r, code_bytes);                                     \
    }
#define BLOCK_PASS_FNS(name, code_bytes)                                                                               \
    BLOCK_PASS_FN(name, 1, code_bytes) BLOCK_PASS_FN(name, 2, code_bytes) BLOCK_PASS_FN(name, 3, code_bytes)             \
    BLOCK_PASS_FN(name, 4, code_bytes) BLOCK_PASS_FN(name, 5, code_bytes) BLOCK_PASS_FN(name, 6, code_bytes)             \
    BLOCK_PASS_FN(name, 7, code_bytes) BLOCK_PASS_FN(name, 8, code_bytes)
#define BLOCK_PASS(name, r) case r: name##_##r(x + m0 * k_in, codes, scale, minimum, bias, y + m0 * n_out, n_out, k_in); break;
#define BLOCK_GEMM(name, code_bytes)                                                                                   \
    BLOCK_PASS_FNS(name, code_bytes)                                                                                   \
    void name(const float *x, const uint8_t *codes, const float *scale, const float *minimum, const float *bias,       \
              float *y, int64_t rows, int64_t n_out, int64_t k_in) {                                                   \
        for (int64_t m0 = 0; m0 < rows; m0 += ROWS_PER_PASS) {                                                         \
            switch (rows - m0 < ROWS_PER_PASS ? rows - m0 : ROWS_PER_PASS) {                                           \
                BLOCK_PASS(name, 1) BLOCK_PASS(name, 2) BLOCK_PASS(name, 3) BLOCK_PASS(name, 4)                         \
                BLOCK_PASS(name, 5) BLOCK_PASS(name, 6) BLOCK_PASS(name, 7) BLOCK_PASS(name, 8)                         \
            }                                                                                                          \
        }                                                                                                              \
    }

/* x [rows, k_in], y [rows, n_out]; minimum is ignored (NULL) for Q8_0. */
BLOCK_GEMM(q4_1_gemm, BLOCK / 2)
BLOCK_GEMM(q8_0_gemm, BLOCK)
