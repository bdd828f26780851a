/* The register tile both of sfumato's GEMM-shaped kernels run (conv_2d.cpp, mul_mat.cpp):
 * an MR x NR block of C kept in vector registers while k runs over packed panels of A
 * (MR values a row of k, broadcast) and B (NR values a row of k, loaded as vectors).
 * Compiled with each CPU variant's flags: AVX-512 where the variant has it, else
 * AVX2 + FMA + F16C; a module with neither defines SFUMATO_GEMM_TILE 0 and carries no
 * kernel. */
#pragma once

#include "ggml.h"

#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define SFUMATO_GEMM_TILE 1
#include <immintrin.h>
#else
#define SFUMATO_GEMM_TILE 0
#endif

#if SFUMATO_GEMM_TILE

namespace sfumato {

#if defined(__AVX512F__)
using vf = __m512;
constexpr int VL = 16;
constexpr int MR = 12;  // rows per micro-tile
constexpr int NV = 2;   // vectors of columns per micro-tile: 24 accumulators of 32 registers
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float * p) { return _mm512_loadu_ps(p); }
inline void vstore(float * p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
// The first n (< VL) lanes.
inline vf vload_first(const float * p, int n) { return _mm512_maskz_loadu_ps((__mmask16) ((1u << n) - 1), p); }
inline void vstore_first(float * p, vf v, int n) { _mm512_mask_storeu_ps(p, (__mmask16) ((1u << n) - 1), v); }
inline void f16_to_f32(const ggml_fp16_t * src, float * dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (src + i))));
    }
    for (; i < n; ++i) {
        dst[i] = _cvtsh_ss(src[i]);
    }
}
#else
using vf = __m256;
constexpr int VL = 8;
constexpr int MR = 6;
constexpr int NV = 2;  // 12 accumulators of 16 registers
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float * p) { return _mm256_loadu_ps(p); }
inline void vstore(float * p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline __m256i first_lanes(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
// The first n (< VL) lanes.
inline vf vload_first(const float * p, int n) { return _mm256_maskload_ps(p, first_lanes(n)); }
inline void vstore_first(float * p, vf v, int n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
inline void f16_to_f32(const ggml_fp16_t * src, float * dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (src + i))));
    }
    for (; i < n; ++i) {
        dst[i] = _cvtsh_ss(src[i]);
    }
}
#endif

constexpr int NR = NV * VL;  // columns per micro-tile

// acc ? C += A*B : C = A*B for the first `rows` x `cols` of one MR x NR tile of C (rows
// ldc apart; the rest is computed and dropped): A is MR rows of k (lda apart; each value
// broadcast), B is packed [kc][NR] (vector loads); f32 products and sums, in k order.
inline void micro_kernel(int64_t kc, const float * a, int64_t lda, const float * b, float * c, int64_t ldc, bool acc,
                         int rows = MR, int cols = NR) {
    const float * row[MR];
    for (int r = 0; r < MR; ++r) {
        row[r] = a + r * lda;
    }
    vf s[MR][NV];
    for (int r = 0; r < MR; ++r) {
        for (int j = 0; j < NV; ++j) {
            s[r][j] = vzero();
        }
    }
    for (int64_t k = 0; k < kc; ++k) {
        vf x[NV];
        for (int j = 0; j < NV; ++j) {
            x[j] = vload(b + j * VL);
        }
        for (int r = 0; r < MR; ++r) {
            const vf w = vset1(row[r][k]);
            for (int j = 0; j < NV; ++j) {
                s[r][j] = vfma(w, x[j], s[r][j]);
            }
        }
        b += NR;
    }
    for (int r = 0; r < MR && r < rows; ++r) {
        for (int j = 0; j < NV; ++j) {
            float * p = c + r * ldc + j * VL;
            const int lanes = cols - j * VL;
            if (lanes >= VL) {
                vstore(p, acc ? vadd(s[r][j], vload(p)) : s[r][j]);
            } else if (lanes > 0) {
                vstore_first(p, acc ? vadd(s[r][j], vload_first(p, lanes)) : s[r][j], lanes);
            }
        }
    }
}

inline size_t aligned(size_t bytes) { return (bytes + 63) & ~(size_t) 63; }

}  // namespace sfumato

#endif  // SFUMATO_GEMM_TILE
