/* Linear layers on GGUF's Q4_K, Q6_K, Q5_0 and Q8_0 weights with 8-bit activations and integer dot products.
 *
 * The weights stay quantised in memory, repacked once at load time (quant_repack) so that one 512-bit
 * vector holds 4 consecutive codes of each of 16 outputs: a VNNI dot product (vpdpbusd) then adds 4 code x
 * activation products into each output's lane, and the activations are broadcast 4 bytes at a time. Each
 * call quantises its input rows to int8 in blocks of 32 (one fp32 scale a block, as llama.cpp's Q8_0), once,
 * for every output. A block's integer dot is exact; it is scaled into an fp32 accumulator per output lane,
 * block after block, in one fixed order:
 *
 *     acc = fma(float(dot(codes, q)), s * d_a, acc);  acc = fma(o, d_a * sum(q), acc)
 *
 * where the weight is w = s * code + o for the block (or half-block of 16 for Q6_K). Every row is computed
 * alone by the same operations whatever shares its pass, and every thread split gives the same bits. The
 * integer part is exact and the float part uses the same fused operations on every path, so the portable
 * path (CPUs without AVX-512 VNNI) gives the very bits of the VNNI one.
 *
 * The codes are unsigned (a signed format's code is q + 2^(bits-1), and o carries the offset), so one
 * layout serves every format:
 *   codes  Q4_K, Q6_K, Q5_0: [groups][blocks][4][16 outputs][4 bytes]: low nibble codes 8p..8p+3, high
 *          nibble 8p+4..8p+7 of the block's 32 for p = 0..3 (the low 4 bits of each code);
 *          Q8_0: [groups][blocks][8][16][4] whole bytes.
 *   high   Q6_K: [groups][blocks][2][16][4]: bits 2t, 2t+1 hold code bits 4-5 of codes 16h + 4t .. + 3;
 *          Q5_0: [groups][blocks][16][4]: bit t holds code bit 4 of codes 4t .. 4t + 3.
 *   scales Q4_K: sub-block scale u8 [groups][blocks][16], mins u8 likewise; Q6_K: s8 [groups][blocks][2][16].
 *   d      fp16: Q4_K (and dmin), Q6_K: [groups][blocks / 8][16]; Q5_0, Q8_0: [groups][blocks][16].
 * Outputs past n_out in the last group of 16 hold zeros. quant_dequantize rebuilds fp32 weights from this
 * layout exactly as gguf-py's dequantize does (built with -ffp-contract=off).
 */
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_pool.h"

enum { QUANT_Q4_K = 1, QUANT_Q6_K = 2, QUANT_Q5_0 = 3, QUANT_Q8_0 = 4 };

#define LANES 16
#define BLOCK 32
#define SUPER 256     /* weights per Q4_K or Q6_K super-block */
#define MAX_ROWS_PER_PASS 8

typedef struct {
    int32_t format;
    const uint8_t *codes, *high, *scales, *mins;
    const uint16_t *d, *dmin;
} quant_weight;

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

static inline int64_t code_plane_bytes(int format) { return format == QUANT_Q8_0 ? 512 : 256; }

/* Where code k (0..31) of lane i of a block's code plane lives, and its nibble. */
static inline int64_t nibble_byte(int i, int k) { return 64 * (k / 8) + 4 * i + k % 4; }
static inline int nibble_shift(int k) { return (k % 8) < 4 ? 0 : 4; }

/* ---- Repacking GGUF rows -------------------------------------------------------------------------- */

static inline void q4_k_scale_min(const uint8_t *q, int j, uint8_t *scale, uint8_t *min) {
    if (j < 4) {
        *scale = q[j] & 63;
        *min = q[j + 4] & 63;
    } else {
        *scale = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* The unsigned code of weight k of one GGUF block (Q4_K, Q6_K: of a super-block of 256; else of 32). */
static inline uint8_t raw_code(int format, const uint8_t *block, int k) {
    switch (format) {
    case QUANT_Q4_K: {
        const uint8_t *qs = block + 16;
        return (qs[32 * (k / 64) + k % 32] >> (k % 64 < 32 ? 0 : 4)) & 0x0F;
    }
    case QUANT_Q6_K: {
        const uint8_t *ql = block, *qh = block + 128;
        const int h = k / 128, r = k % 128;
        const uint8_t low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
        const uint8_t high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        return low | (uint8_t)(high << 4);
    }
    case QUANT_Q5_0: {
        const uint8_t *qh = block + 2, *qs = block + 6;
        const uint32_t bits = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
        return ((qs[k % 16] >> (k < 16 ? 0 : 4)) & 0x0F) | (uint8_t)(((bits >> k) & 1) << 4);
    }
    default:
        return (uint8_t)((int8_t)block[2 + k] + 128);
    }
}

static inline int64_t raw_block_bytes(int format) {
    return format == QUANT_Q4_K ? 144 : format == QUANT_Q6_K ? 210 : format == QUANT_Q5_0 ? 22 : 34;
}
static inline int raw_block_weights(int format) { return format == QUANT_Q4_K || format == QUANT_Q6_K ? SUPER : BLOCK; }

/* raw: n rows of k weights in GGUF blocks; out's planes zeroed by the caller, sized for ceil(n / 16) groups.
 * Returns 0, or -1 where k is not a whole number of the format's blocks. */
int quant_repack(int format, const uint8_t *raw, int64_t n, int64_t k, const quant_weight *out) {
    const int per_raw = raw_block_weights(format);
    if (k <= 0 || k % per_raw || n < 0) return -1;
    const int64_t blocks = k / BLOCK, raw_per_row = k / per_raw, plane = code_plane_bytes(format);
    uint8_t *codes = (uint8_t *)out->codes, *high = (uint8_t *)out->high, *scales = (uint8_t *)out->scales;
    uint8_t *mins = (uint8_t *)out->mins;
    uint16_t *d = (uint16_t *)out->d, *dmin = (uint16_t *)out->dmin;
    for (int64_t row = 0; row < n; row++) {
        const int64_t g = row / LANES, i = row % LANES;
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t gb = g * blocks + b, in_raw = (b * BLOCK) % per_raw;
            const uint8_t *block = raw + (row * raw_per_row + b * BLOCK / per_raw) * raw_block_bytes(format);
            for (int c = 0; c < BLOCK; c++) {
                const uint8_t code = raw_code(format, block, (int)in_raw + c);
                if (format == QUANT_Q8_0) {
                    codes[gb * plane + 64 * (c / 4) + 4 * i + c % 4] = code;
                    continue;
                }
                codes[gb * plane + nibble_byte((int)i, c)] |= (uint8_t)((code & 0x0F) << nibble_shift(c));
                if (format == QUANT_Q6_K)
                    high[gb * 128 + 64 * (c / 16) + 4 * i + c % 4] |= (uint8_t)((code >> 4) << (2 * ((c % 16) / 4)));
                else if (format == QUANT_Q5_0)
                    high[gb * 64 + 4 * i + c % 4] |= (uint8_t)((code >> 4) << (c / 4));
            }
            if (format == QUANT_Q4_K) {
                q4_k_scale_min(block + 4, (int)(in_raw / BLOCK), &scales[gb * LANES + i], &mins[gb * LANES + i]);
            } else if (format == QUANT_Q6_K) {
                const int8_t *sc = (const int8_t *)(block + 192);
                scales[(gb * 2) * LANES + i] = (uint8_t)sc[in_raw / 16];
                scales[(gb * 2 + 1) * LANES + i] = (uint8_t)sc[in_raw / 16 + 1];
            }
            if (format == QUANT_Q4_K || format == QUANT_Q6_K) {
                if (in_raw) continue;  /* one d per super-block */
                const int64_t at = (g * (blocks / 8) + b / 8) * LANES + i;
                memcpy(&d[at], format == QUANT_Q4_K ? block : block + 208, 2);
                if (format == QUANT_Q4_K) memcpy(&dmin[at], block + 2, 2);
            } else {
                memcpy(&d[gb * LANES + i], block, 2);
            }
        }
    }
    return 0;
}

/* ---- Dequantising, as gguf-py does ---------------------------------------------------------------- */

static inline uint8_t packed_code(const quant_weight *w, int64_t blocks, int64_t g, int64_t b, int i, int c) {
    const int64_t gb = g * blocks + b;
    if (w->format == QUANT_Q8_0) return w->codes[gb * 512 + 64 * (c / 4) + 4 * i + c % 4];
    uint8_t code = (w->codes[gb * 256 + nibble_byte(i, c)] >> nibble_shift(c)) & 0x0F;
    if (w->format == QUANT_Q6_K) code |= (uint8_t)(((w->high[gb * 128 + 64 * (c / 16) + 4 * i + c % 4] >> (2 * ((c % 16) / 4))) & 3) << 4);
    if (w->format == QUANT_Q5_0) code |= (uint8_t)(((w->high[gb * 64 + 4 * i + c % 4] >> (c / 4)) & 1) << 4);
    return code;
}

/* The fp32 weights of outputs rows[0 .. count) into out [count, k]. */
void quant_dequantize(const quant_weight *w, int64_t k, const int64_t *rows, int64_t count, float *out) {
    const int64_t blocks = k / BLOCK;
    for (int64_t r = 0; r < count; r++) {
        const int64_t g = rows[r] / LANES;
        const int i = (int)(rows[r] % LANES);
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t gb = g * blocks + b, super = (g * (blocks / 8) + b / 8) * LANES + i;
            float *y = out + r * k + b * BLOCK;
            for (int c = 0; c < BLOCK; c++) {
                const uint8_t code = packed_code(w, blocks, g, b, i, c);
                switch (w->format) {
                case QUANT_Q4_K: {
                    const float scale = half_to_float(w->d[super]) * (float)w->scales[gb * LANES + i];
                    const float min = half_to_float(w->dmin[super]) * (float)w->mins[gb * LANES + i];
                    y[c] = scale * (float)code - min;
                    break;
                }
                case QUANT_Q6_K: {
                    const float scale = half_to_float(w->d[super]) * (float)(int8_t)w->scales[(gb * 2 + c / 16) * LANES + i];
                    y[c] = scale * (float)((int)code - 32);
                    break;
                }
                case QUANT_Q5_0:
                    y[c] = half_to_float(w->d[gb * LANES + i]) * (float)((int)code - 16);
                    break;
                default:
                    y[c] = half_to_float(w->d[gb * LANES + i]) * (float)((int)code - 128);
                }
            }
        }
    }
}

/* ---- Activations ---------------------------------------------------------------------------------- */

typedef struct {
    int8_t *q;           /* [rows, k] */
    float *d;            /* [rows, blocks]: q * d is the activation */
    float *d_sum;        /* [rows, blocks]: d * (sum of the block's q) */
    float *d_sum_half;   /* [rows, 2 * blocks]: d * (sum of each half-block's q) */
} quant_rows;

/* Each row's blocks of 32 as int8 with one scale: q = round(x * 127 / max |x|). */
static void quantize_rows(const float *x, int64_t rows, int64_t k, quant_rows *a) {
    const int64_t blocks = k / BLOCK;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < blocks; b++) {
            const float *v = x + r * k + b * BLOCK;
            float max = 0.0f;
            for (int c = 0; c < BLOCK; c++) max = fabsf(v[c]) > max ? fabsf(v[c]) : max;
            const float inverse = max > 0.0f ? 127.0f / max : 0.0f, d = max / 127.0f;
            int8_t *q = a->q + r * k + b * BLOCK;
            int32_t halves[2] = {0, 0};
            for (int c = 0; c < BLOCK; c++) {
                q[c] = (int8_t)nearbyintf(v[c] * inverse);
                halves[c / 16] += q[c];
            }
            a->d[r * blocks + b] = d;
            a->d_sum[r * blocks + b] = d * (float)(halves[0] + halves[1]);
            a->d_sum_half[(r * blocks + b) * 2] = d * (float)halves[0];
            a->d_sum_half[(r * blocks + b) * 2 + 1] = d * (float)halves[1];
        }
    }
}

/* ---- The dot products ----------------------------------------------------------------------------- */

typedef struct {
    quant_weight w;
    quant_rows a;
    const float *bias;
    float *y;
    int64_t rows, n_out, k;
} quant_args;

/* The block's per-lane scale and offset (Q6_K: of each half): w = s * code + o. */
static inline void lane_scales(const quant_weight *w, int64_t blocks, int64_t g, int64_t b, int i, float s[2], float o[2]) {
    const int64_t gb = g * blocks + b, super = (g * (blocks / 8) + b / 8) * LANES + i;
    switch (w->format) {
    case QUANT_Q4_K:
        s[0] = half_to_float(w->d[super]) * (float)w->scales[gb * LANES + i];
        o[0] = -(half_to_float(w->dmin[super]) * (float)w->mins[gb * LANES + i]);
        break;
    case QUANT_Q6_K:
        for (int h = 0; h < 2; h++) {
            s[h] = half_to_float(w->d[super]) * (float)(int8_t)w->scales[(gb * 2 + h) * LANES + i];
            o[h] = -32.0f * s[h];
        }
        break;
    default: {
        s[0] = half_to_float(w->d[gb * LANES + i]);
        o[0] = (w->format == QUANT_Q5_0 ? -16.0f : -128.0f) * s[0];
    }
    }
}

/* Portable: one output at a time, the same operations as the vector path below. */
static void quant_chunk_portable(const quant_args *j, int64_t n0, int64_t n1) {
    const int64_t blocks = j->k / BLOCK;
    for (int64_t n = n0; n < n1 && n < j->n_out; n++) {
        const int64_t g = n / LANES;
        const int i = (int)(n % LANES);
        for (int64_t r = 0; r < j->rows; r++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                float s[2], o[2];
                lane_scales(&j->w, blocks, g, b, i, s, o);
                const int8_t *q = j->a.q + r * j->k + b * BLOCK;
                const float d = j->a.d[r * blocks + b];
                if (j->w.format == QUANT_Q6_K) {
                    int32_t dots[2] = {0, 0};
                    for (int c = 0; c < BLOCK; c++) dots[c / 16] += (int32_t)packed_code(&j->w, blocks, g, b, i, c) * q[c];
                    acc = fmaf((float)dots[0], s[0] * d, acc);
                    acc = fmaf((float)dots[1], s[1] * d, acc);
                    acc = fmaf(o[0], j->a.d_sum_half[(r * blocks + b) * 2], acc);
                    acc = fmaf(o[1], j->a.d_sum_half[(r * blocks + b) * 2 + 1], acc);
                } else {
                    int32_t dot = 0;
                    for (int c = 0; c < BLOCK; c++) dot += (int32_t)packed_code(&j->w, blocks, g, b, i, c) * q[c];
                    acc = fmaf((float)dot, s[0] * d, acc);
                    acc = fmaf(o[0], j->a.d_sum[r * blocks + b], acc);
                }
            }
            j->y[r * j->n_out + n] = j->bias ? acc + j->bias[n] : acc;
        }
    }
}

/* The vector path is compiled into every build (an AVX2 image's too) and taken where the CPU has AVX-512
 * VNNI (quant_gemm_vectorised). */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))

/* The block's 8 vectors of codes: vector v holds codes 4v .. 4v+3 of each lane's output. */
static inline VNNI __attribute__((always_inline)) void block_codes(const quant_weight *w, int64_t gb, const int format,
                                                              __m512i v[8]) {
    if (format == QUANT_Q8_0) {
        const uint8_t *plane = w->codes + gb * 512;
        _Pragma("GCC unroll 8") for (int t = 0; t < 8; t++) v[t] = _mm512_loadu_si512(plane + 64 * t);
        return;
    }
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const uint8_t *plane = w->codes + gb * 256;
    _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) {
        const __m512i packed = _mm512_loadu_si512(plane + 64 * p);
        v[2 * p] = _mm512_and_si512(packed, low4);
        v[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
    }
    if (format == QUANT_Q6_K) {
        const __m512i two = _mm512_set1_epi8(0x03);
        _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
            const __m512i packed = _mm512_loadu_si512(w->high + gb * 128 + 64 * h);
            _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++)
                v[4 * h + t] = _mm512_or_si512(v[4 * h + t],
                                               _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(packed, 2 * t), two), 4));
        }
    } else if (format == QUANT_Q5_0) {
        const __m512i packed = _mm512_loadu_si512(w->high + gb * 64), sixteen = _mm512_set1_epi8(16);
        _Pragma("GCC unroll 8") for (int t = 0; t < 8; t++)
            v[t] = _mm512_mask_add_epi8(v[t], _mm512_test_epi8_mask(packed, _mm512_set1_epi8((char)(1 << t))), v[t], sixteen);
    }
}

/* Activations 4t .. 4t+3 of a block in every lane: a broadcast load, which takes no vector ALU. */
static inline VNNI __m512i quads(const int8_t *q, int t) { return _mm512_broadcastd_epi32(_mm_loadu_si32(q + 4 * t)); }

static inline VNNI __m512 halves_to_floats(const uint16_t *h) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h)); }
static inline VNNI __m512 bytes_to_floats(const uint8_t *b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b))); }
static inline VNNI __m512 signed_bytes_to_floats(const uint8_t *b) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b)));
}

/* 16 outputs of group g for rows r0 .. r0 + rows - 1. */
static inline VNNI __attribute__((always_inline)) void group_rows(const quant_args *j, int64_t g, int64_t r0, const int rows,
                                                             const int format) {
    const quant_weight *w = &j->w;
    const int64_t blocks = j->k / BLOCK;
    __m512 acc[MAX_ROWS_PER_PASS];
    _Pragma("GCC unroll 8") for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t gb = g * blocks + b, super = (g * (blocks / 8) + b / 8) * LANES;
        __m512i v[8];
        block_codes(w, gb, format, v);
        __m512 s0, s1 = _mm512_setzero_ps(), o0, o1 = _mm512_setzero_ps();
        if (format == QUANT_Q4_K) {
            s0 = _mm512_mul_ps(halves_to_floats(w->d + super), bytes_to_floats(w->scales + gb * LANES));
            o0 = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(halves_to_floats(w->dmin + super), bytes_to_floats(w->mins + gb * LANES)));
        } else if (format == QUANT_Q6_K) {
            const __m512 d = halves_to_floats(w->d + super);
            s0 = _mm512_mul_ps(d, signed_bytes_to_floats(w->scales + gb * 2 * LANES));
            s1 = _mm512_mul_ps(d, signed_bytes_to_floats(w->scales + (gb * 2 + 1) * LANES));
            o0 = _mm512_mul_ps(_mm512_set1_ps(-32.0f), s0);
            o1 = _mm512_mul_ps(_mm512_set1_ps(-32.0f), s1);
        } else {
            s0 = halves_to_floats(w->d + gb * LANES);
            o0 = _mm512_mul_ps(_mm512_set1_ps(format == QUANT_Q5_0 ? -16.0f : -128.0f), s0);
        }
        _Pragma("GCC unroll 8") for (int r = 0; r < rows; r++) {
            const int64_t row = r0 + r;
            const int8_t *q = j->a.q + row * j->k + b * BLOCK;
            const __m512 d = _mm512_set1_ps(j->a.d[row * blocks + b]);
            if (format == QUANT_Q6_K) {
                __m512i dot0 = _mm512_setzero_si512(), dot1 = _mm512_setzero_si512();
                _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) dot0 = _mm512_dpbusd_epi32(dot0, v[t], quads(q, t));
                _Pragma("GCC unroll 4") for (int t = 4; t < 8; t++) dot1 = _mm512_dpbusd_epi32(dot1, v[t], quads(q, t));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot0), _mm512_mul_ps(s0, d), acc[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot1), _mm512_mul_ps(s1, d), acc[r]);
                acc[r] = _mm512_fmadd_ps(o0, _mm512_set1_ps(j->a.d_sum_half[(row * blocks + b) * 2]), acc[r]);
                acc[r] = _mm512_fmadd_ps(o1, _mm512_set1_ps(j->a.d_sum_half[(row * blocks + b) * 2 + 1]), acc[r]);
            } else {
                __m512i dot = _mm512_setzero_si512();
                _Pragma("GCC unroll 8") for (int t = 0; t < 8; t++) dot = _mm512_dpbusd_epi32(dot, v[t], quads(q, t));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s0, d), acc[r]);
                acc[r] = _mm512_fmadd_ps(o0, _mm512_set1_ps(j->a.d_sum[row * blocks + b]), acc[r]);
            }
        }
    }
    const int64_t n0 = g * LANES, valid = j->n_out - n0 < LANES ? j->n_out - n0 : LANES;
    const __mmask16 keep = (__mmask16)((1u << valid) - 1);
    const __m512 bias = j->bias ? _mm512_maskz_loadu_ps(keep, j->bias + n0) : _mm512_setzero_ps();
    _Pragma("GCC unroll 8") for (int r = 0; r < rows; r++) {
        const __m512 out = j->bias ? _mm512_add_ps(acc[r], bias) : acc[r];
        _mm512_mask_storeu_ps(j->y + (r0 + r) * j->n_out + n0, keep, out);
    }
}

#define GROUP_FN(format, rows)                                                                                        \
    static VNNI __attribute__((noinline)) void group_##format##_##rows(const quant_args *j, int64_t g, int64_t r0) {\
        group_rows(j, g, r0, rows, format);                                                                          \
    }
#define GROUP_FNS(format) GROUP_FN(format, 1) GROUP_FN(format, 2) GROUP_FN(format, 3) GROUP_FN(format, 4)              \
    GROUP_FN(format, 5) GROUP_FN(format, 6) GROUP_FN(format, 7) GROUP_FN(format, 8)
GROUP_FNS(QUANT_Q4_K)
GROUP_FNS(QUANT_Q6_K)
GROUP_FNS(QUANT_Q5_0)
GROUP_FNS(QUANT_Q8_0)

typedef void (*group_fn)(const quant_args *, int64_t, int64_t);
#define GROUP_TABLE(format) {group_##format##_1, group_##format##_2, group_##format##_3, group_##format##_4,              \
                             group_##format##_5, group_##format##_6, group_##format##_7, group_##format##_8}
static const group_fn GROUPS[4][MAX_ROWS_PER_PASS] = {GROUP_TABLE(QUANT_Q4_K), GROUP_TABLE(QUANT_Q6_K),
                                                      GROUP_TABLE(QUANT_Q5_0), GROUP_TABLE(QUANT_Q8_0)};

/* Whether this CPU takes the vector path (the portable one gives the same bits, slowly). */
int quant_gemm_vectorised(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
           && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
}

/* Outputs [n0, n1), whole groups of 16: the rows in passes of up to 8, each pass streaming the group's codes. */
static void quant_chunk(const void *args, int64_t n0, int64_t n1) {
    static atomic_int vectorised = -1;  /* asked once; every thread gets the same answer */
    int path = atomic_load_explicit(&vectorised, memory_order_relaxed);
    if (path < 0) atomic_store_explicit(&vectorised, path = quant_gemm_vectorised(), memory_order_relaxed);
    const quant_args *j = args;
    if (!path) {
        quant_chunk_portable(j, n0, n1);
        return;
    }
    const group_fn *table = GROUPS[j->w.format - 1];
    for (int64_t g = n0 / LANES; g * LANES < n1; g++)
        for (int64_t r0 = 0; r0 < j->rows; r0 += MAX_ROWS_PER_PASS) {
            const int64_t rows = j->rows - r0 < MAX_ROWS_PER_PASS ? j->rows - r0 : MAX_ROWS_PER_PASS;
            table[rows - 1](j, g, r0);
        }
}

static __thread int8_t *scratch;
static __thread int64_t scratch_bytes;

/* The call's quantised rows, in the calling thread's scratch (the pool's threads read it while the caller waits). */
static int rows_scratch(int64_t rows, int64_t k, quant_rows *a) {
    const int64_t blocks = k / BLOCK, q_bytes = (rows * k + 63) & ~(int64_t)63;
    const int64_t bytes = q_bytes + (int64_t)sizeof(float) * rows * blocks * 4;
    if (bytes > scratch_bytes) {
        free(scratch);
        scratch = aligned_alloc(64, (size_t)((bytes + 63) & ~(int64_t)63));
        scratch_bytes = scratch ? bytes : 0;
        if (!scratch) return -1;
    }
    a->q = scratch;
    a->d = (float *)(scratch + q_bytes);
    a->d_sum = a->d + rows * blocks;
    a->d_sum_half = a->d_sum + rows * blocks;
    return 0;
}

static const pool_split QUANT_SPLIT = {.granule = LANES, .min_chunk = 2 * LANES, .min_split = 4 * LANES};

/* x [rows, k], bias [n_out] or NULL, y [rows, n_out]; k a whole number of blocks of 32 (of 256 for Q4_K and
 * Q6_K, as their weights hold). Returns 0, or -1 for a shape the weights cannot hold or no memory. */
int quant_gemm(const quant_weight *w, const float *x, const float *bias, float *y, int64_t rows, int64_t n_out, int64_t k) {
    if (w->format < QUANT_Q4_K || w->format > QUANT_Q8_0 || rows < 0 || n_out < 0 || k <= 0
        || k % raw_block_weights(w->format))
        return -1;
    quant_args args = {.w = *w, .bias = bias, .y = y, .rows = rows, .n_out = n_out, .k = k};
    if (rows_scratch(rows, k, &args.a)) return -1;
    quantize_rows(x, rows, k, &args.a);
    pool_run(quant_chunk, &args, sizeof args, (n_out + LANES - 1) / LANES * LANES, QUANT_SPLIT);
    return 0;
}

/* Outputs [n0, n1) by the portable path: what the tests set the vector path against. */
void quant_gemm_portable_range(const quant_weight *w, const float *x, const float *bias, float *y, int64_t rows,
                               int64_t n_out, int64_t k, int64_t n0, int64_t n1) {
    quant_args args = {.w = *w, .bias = bias, .y = y, .rows = rows, .n_out = n_out, .k = k};
    if (rows_scratch(rows, k, &args.a)) abort();
    quantize_rows(x, rows, k, &args.a);
    quant_chunk_portable(&args, n0, n1);
}
