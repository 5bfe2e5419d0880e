/* Batch-invariant fp32 linear for the few rows of a decode or verify step (AVX2 + FMA).
 *
 * y[m, n] = x[m, :] . w[n, :] (+ bias[n]). Each output is reduced in the same order whatever
 * the number of rows, so verifying k tokens gives bit-identical results to decoding them one
 * by one. W streams from memory once for up to 8 rows: a step with a few rows costs about
 * what one row costs, where a BLAS GEMM packs W and goes compute-bound.
 *
 * With two rows or more the FMAs keep the core busy long enough that the hardware prefetcher
 * falls behind and weight lines arrive late, so those passes also prefetch W into L2
 * PREFETCH_AHEAD floats ahead (bench/RESULTS.md: an 8-token SmolLM2 forward went from 2.5x to
 * 1.8x a 1-token one on Zen 4). One row is a pure stream the hardware prefetcher keeps up with.
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
