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
                                                       int64_t n_out, int64_t k_in, int64_t ldy, const int rows) {
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
                                                                int64_t ldy, int64_t k_in, int64_t n, const int rows,
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

/* Threads. Each output is reduced by the same code whichever thread computes it, so splitting a layer's
 * outputs among threads keeps the bits. The caller and the workers claim chunks of outputs from one
 * ticket until none are left, so a worker the OS has not scheduled costs nothing: the caller takes its
 * chunks. Workers wait for the next layer spinning for a little while (the layers of one forward pass
 * come microseconds apart), then sleep. */
#include <pthread.h>
#include <stdatomic.h>

#define MAX_THREADS 16
#define SPIN_ROUNDS 2000    /* a few microseconds to tens of them, by how long a pause instruction takes here */
#define CHUNK_BITS 20       /* a ticket is (job << CHUNK_BITS) | next chunk */

enum { FP32, Q4_1, Q8_0 };

typedef struct {
    int kind;
    const float *x, *w, *scale, *minimum, *bias;
    const uint8_t *codes;
    float *y;
    int64_t rows, n_out, k_in;
} gemm_job;

static void run_outputs(const gemm_job *j, int64_t n0, int64_t n1) {
    if (n1 <= n0) return;
    const float *bias = j->bias ? j->bias + n0 : NULL;
    if (j->kind == FP32) {
        small_gemm_range(j->x, j->w + n0 * j->k_in, bias, j->y + n0, j->rows, n1 - n0, j->k_in, j->n_out);
        return;
    }
    const int64_t blocks = j->k_in / BLOCK, code_bytes = j->kind == Q4_1 ? BLOCK / 2 : BLOCK;
    const float *minimum = j->minimum ? j->minimum + n0 * blocks : NULL;
    (j->kind == Q4_1 ? q4_1_gemm_range : q8_0_gemm_range)(j->x, j->codes + n0 * blocks * code_bytes, j->scale + n0 * blocks,
                                                           minimum, bias, j->y + n0, j->rows, n1 - n0, j->k_in, j->n_out);
}

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int workers;                   /* started so far */
    int threads;                   /* threads a layer may be split among, the caller's included */
    gemm_job job;
    int64_t chunk, chunks;         /* outputs per chunk, chunks in the job */
    atomic_ulong ticket;
    atomic_long finished;          /* chunks of the current job done */
    atomic_int busy;               /* a caller holds the pool: another one computes alone */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 1};

/* Claims and runs chunks of the job `ticket` names while any are left; false when there was none to claim. */
static int claim_chunks(unsigned long job_id) {
    int ran = 0;
    for (;;) {
        unsigned long t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
        const int64_t chunk = (int64_t)(t & ((1ul << CHUNK_BITS) - 1));
        if ((t >> CHUNK_BITS) != job_id || chunk >= pool.chunks) return ran;
        if (!atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + 1, memory_order_acq_rel, memory_order_relaxed))
            continue;
        const int64_t n0 = chunk * pool.chunk, n1 = n0 + pool.chunk < pool.job.n_out ? n0 + pool.chunk : pool.job.n_out;
        run_outputs(&pool.job, n0, n1);
        atomic_fetch_add_explicit(&pool.finished, 1, memory_order_release);
        ran = 1;
    }
}

static void *worker(void *arg) {
    (void)arg;
    unsigned long seen = 0;
    for (;;) {
        unsigned long job_id;
        for (int spin = 0; (job_id = atomic_load_explicit(&pool.ticket, memory_order_acquire) >> CHUNK_BITS) == seen;
             spin++) {
            if (spin < SPIN_ROUNDS) { _mm_pause(); continue; }
            pthread_mutex_lock(&pool.lock);
            while ((job_id = atomic_load_explicit(&pool.ticket, memory_order_acquire) >> CHUNK_BITS) == seen)
                pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
            break;
        }
        seen = job_id;
        claim_chunks(job_id);
    }
    return NULL;
}

/* How many threads may split each layer's outputs (1: the caller's alone). Call between forward passes. */
int small_gemm_set_threads(int threads) {
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    for (; pool.workers < threads - 1; pool.workers++) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, worker, NULL) != 0) break;
        pthread_detach(thread);
    }
    pool.threads = threads < pool.workers + 1 ? threads : pool.workers + 1;
    return pool.threads;
}

static void run(const gemm_job *job) {
    const int threads = pool.threads;
    if (threads <= 1 || job->n_out < 128 || atomic_exchange_explicit(&pool.busy, 1, memory_order_acquire)) {
        run_outputs(job, 0, job->n_out);
        return;
    }
    pool.job = *job;
    pool.chunk = ((job->n_out / (4 * threads)) + 3) & ~(int64_t)3;  /* a few chunks per thread, whole groups of 4 */
    if (pool.chunk < 32) pool.chunk = 32;
    pool.chunks = (job->n_out + pool.chunk - 1) / pool.chunk;
    atomic_store_explicit(&pool.finished, 0, memory_order_relaxed);
    const unsigned long job_id = (atomic_load_explicit(&pool.ticket, memory_order_relaxed) >> CHUNK_BITS) + 1;
    pthread_mutex_lock(&pool.lock);
    atomic_store_explicit(&pool.ticket, job_id << CHUNK_BITS, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    claim_chunks(job_id);
    while (atomic_load_explicit(&pool.finished, memory_order_acquire) < pool.chunks) _mm_pause();
    atomic_store_explicit(&pool.busy, 0, memory_order_release);
}

/* x [rows, k_in], w [n_out, k_in], bias [n_out] or NULL, y [rows, n_out]; all contiguous. */
void small_gemm(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t n_out, int64_t k_in) {
    const gemm_job job = {FP32, x, w, NULL, NULL, bias, NULL, y, rows, n_out, k_in};
    run(&job);
}

/* x [rows, k_in], y [rows, n_out]; minimum is ignored (NULL) for Q8_0. */
void q4_1_gemm(const float *x, const uint8_t *codes, const float *scale, const float *minimum, const float *bias,
               float *y, int64_t rows, int64_t n_out, int64_t k_in) {
    const gemm_job job = {Q4_1, x, NULL, scale, minimum, bias, codes, y, rows, n_out, k_in};
    run(&job);
}

void q8_0_gemm(const float *x, const uint8_t *codes, const float *scale, const float *minimum, const float *bias,
               float *y, int64_t rows, int64_t n_out, int64_t k_in) {
    const gemm_job job = {Q8_0, x, NULL, scale, minimum, bias, codes, y, rows, n_out, k_in};
    run(&job);
}
