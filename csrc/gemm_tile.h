/* The register tile both of sfumato's GEMM-shaped kernels run (conv_2d.cpp, mul_mat.cpp):
 * an MR x NR block of C kept in vector registers while k runs over packed panels of A
 * (MR values a row of k, broadcast) and B (NR values a row of k, loaded as vectors).
 * Compiled with each CPU variant's flags: AVX-512 where the variant has it, else
 * AVX2 + FMA + F16C; a module with neither defines SFUMATO_GEMM_TILE 0 and carries no
 * kernel. */
#pragma once

#include "ggml.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define SFUMATO_GEMM_TILE 1
#include <immintrin.h>
#else
#define SFUMATO_GEMM_TILE 0
#endif

#if !SFUMATO_GEMM_TILE
#define SFUMATO_BF16_TILE 0
#define SFUMATO_AMX_TILE 0
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
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
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
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
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

// bf16 to f32, exactly (bf16 is the upper half of an f32).
inline void bf16_to_f32(const ggml_bf16_t * src, float * dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t bits = (uint32_t) src[i].bits << 16;
        std::memcpy(dst + i, &bits, sizeof(float));
    }
}

// n values of a row of an F16, BF16 or F32 tensor as f32 (exact).
inline void widen(ggml_type type, const void * src, float * dst, int64_t n) {
    if (type == GGML_TYPE_F16) {
        f16_to_f32((const ggml_fp16_t *) src, dst, n);
    } else if (type == GGML_TYPE_BF16) {
        bf16_to_f32((const ggml_bf16_t *) src, dst, n);
    } else {
        std::memcpy(dst, src, sizeof(float) * n);
    }
}

// n floats from src to dst, in vectors (a short copy: no call, no setup).
inline void copy_floats(float * dst, const float * src, int64_t n) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        vstore(dst + i, vload(src + i));
    }
    if (i < n) {
        vstore_first(dst + i, vload_first(src + i, (int) (n - i)), (int) (n - i));
    }
}

// dst[c * ldd + r] = src[r * lds + c] for a VL x VL block: a transpose in registers
// (4x4 blocks within 128-bit lanes, then the lanes themselves).
inline void transpose_block(const float * src, int64_t lds, float * dst, int64_t ldd) {
#if defined(__AVX512F__)
    __m512 u[4][4];
    for (int g = 0; g < 4; ++g) {
        const float * s = src + 4 * g * lds;
        const __m512 r0 = _mm512_loadu_ps(s), r1 = _mm512_loadu_ps(s + lds);
        const __m512 r2 = _mm512_loadu_ps(s + 2 * lds), r3 = _mm512_loadu_ps(s + 3 * lds);
        const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(r0, r1)), t1 = _mm512_castps_pd(_mm512_unpackhi_ps(r0, r1));
        const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(r2, r3)), t3 = _mm512_castps_pd(_mm512_unpackhi_ps(r2, r3));
        u[g][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));  // lane j: column 4j of rows 4g..4g+3
        u[g][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        u[g][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        u[g][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int c = 0; c < 4; ++c) {
        const __m512 a = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0x44), b = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0xEE);
        const __m512 x = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0x44), y = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0xEE);
        _mm512_storeu_ps(dst + c * ldd, _mm512_shuffle_f32x4(a, x, 0x88));
        _mm512_storeu_ps(dst + (4 + c) * ldd, _mm512_shuffle_f32x4(a, x, 0xDD));
        _mm512_storeu_ps(dst + (8 + c) * ldd, _mm512_shuffle_f32x4(b, y, 0x88));
        _mm512_storeu_ps(dst + (12 + c) * ldd, _mm512_shuffle_f32x4(b, y, 0xDD));
    }
#else
    __m256 u[2][4];
    for (int g = 0; g < 2; ++g) {
        const float * s = src + 4 * g * lds;
        const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lds);
        const __m256 r2 = _mm256_loadu_ps(s + 2 * lds), r3 = _mm256_loadu_ps(s + 3 * lds);
        const __m256d t0 = _mm256_castps_pd(_mm256_unpacklo_ps(r0, r1)), t1 = _mm256_castps_pd(_mm256_unpackhi_ps(r0, r1));
        const __m256d t2 = _mm256_castps_pd(_mm256_unpacklo_ps(r2, r3)), t3 = _mm256_castps_pd(_mm256_unpackhi_ps(r2, r3));
        u[g][0] = _mm256_castpd_ps(_mm256_unpacklo_pd(t0, t2));
        u[g][1] = _mm256_castpd_ps(_mm256_unpackhi_pd(t0, t2));
        u[g][2] = _mm256_castpd_ps(_mm256_unpacklo_pd(t1, t3));
        u[g][3] = _mm256_castpd_ps(_mm256_unpackhi_pd(t1, t3));
    }
    for (int c = 0; c < 4; ++c) {
        _mm256_storeu_ps(dst + c * ldd, _mm256_permute2f128_ps(u[0][c], u[1][c], 0x20));
        _mm256_storeu_ps(dst + (4 + c) * ldd, _mm256_permute2f128_ps(u[0][c], u[1][c], 0x31));
    }
#endif
}

// NR rows of `len` 32-bit values (rows len apart) into [len][NR]: VL x VL blocks in
// registers, the rest one value at a time (the bits are moved, never computed on).
inline void transpose_rows(const float * rows, int64_t len, float * panel) {
    const int64_t whole = len - len % VL;
    for (int r0 = 0; r0 < NR; r0 += VL) {
        for (int64_t l0 = 0; l0 < whole; l0 += VL) {
            transpose_block(rows + r0 * len + l0, len, panel + l0 * NR + r0, NR);
        }
        for (int64_t l = whole; l < len; ++l) {
            for (int r = r0; r < r0 + VL; ++r) {
                std::memcpy(panel + l * NR + r, rows + r * len + l, sizeof(float));
            }
        }
    }
}

// The first `rows` x `cols` of an MR x NR tile of sums s into C (rows ldc apart): C = s,
// or C += s when acc.
inline void store_tile(vf (&s)[MR][NV], float * c, int64_t ldc, bool acc, int rows, int cols) {
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

// Asks for the rows of C a tile will add into while its k loop runs, so that the adds at
// its end find them in cache (C's rows are often a power of two apart: a stream the
// hardware's prefetchers do not follow).
inline void prefetch_tile(const float * c, int64_t ldc, int rows, int cols) {
    for (int r = 0; r < rows; ++r) {
        for (int j = 0; j < cols; j += 16) {
            _mm_prefetch((const char *) (c + r * ldc + j), _MM_HINT_T0);
        }
    }
}

// acc ? C += A*B : C = A*B for the first `rows` x `cols` of one MR x NR tile of C (rows
// ldc apart; the rest is computed and dropped): A is MR rows of k (lda apart; each value
// broadcast), B is packed [kc][NR] (vector loads); f32 products and sums, in k order.
inline void micro_kernel(int64_t kc, const float * a, int64_t lda, const float * b, float * c, int64_t ldc, bool acc,
                         int rows = MR, int cols = NR) {
    const float * row[MR];
    for (int r = 0; r < MR; ++r) {
        row[r] = a + r * lda;
    }
    if (acc) {
        prefetch_tile(c, ldc, rows, cols);
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
    store_tile(s, c, ldc, acc, rows, cols);
}

inline size_t aligned(size_t bytes) { return (bytes + 63) & ~(size_t) 63; }

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
/* The bf16 mode (SFUMATO_PRECISION=bf16): the same tile with both operands rounded to
 * bf16 (to nearest, ties to even) and multiplied by pairs with AVX512-BF16's VDPBF16PS,
 * which adds each pair's exact products into f32 sums. A is MR rows of bf16 (lda
 * apart; k and k+1 broadcast together as one 32-bit value), B is packed [kc/2][NR][2]
 * (the pairs of each column side by side); kc is even (packing pads with a zero). */
#define SFUMATO_BF16_TILE 1

inline void micro_kernel_bf16(int64_t kc, const uint16_t * a, int64_t lda, const uint16_t * b, float * c, int64_t ldc,
                              bool acc, int rows = MR, int cols = NR) {
    const uint16_t * row[MR];
    for (int r = 0; r < MR; ++r) {
        row[r] = a + r * lda;
    }
    if (acc) {
        prefetch_tile(c, ldc, rows, cols);
    }
    vf s[MR][NV];
    for (int r = 0; r < MR; ++r) {
        for (int j = 0; j < NV; ++j) {
            s[r][j] = vzero();
        }
    }
    for (int64_t k = 0; k < kc; k += 2) {
        __m512bh x[NV];
        for (int j = 0; j < NV; ++j) {
            x[j] = (__m512bh) _mm512_loadu_si512(b + j * 2 * VL);
        }
        for (int r = 0; r < MR; ++r) {
            int32_t pair;
            std::memcpy(&pair, row[r] + k, sizeof(pair));
            const __m512bh w = (__m512bh) _mm512_set1_epi32(pair);
            for (int j = 0; j < NV; ++j) {
                s[r][j] = _mm512_dpbf16_ps(s[r][j], w, x[j]);
            }
        }
        b += 2 * NR;
    }
    store_tile(s, c, ldc, acc, rows, cols);
}

// n f32 values to bf16, rounded to nearest (ties to even).
inline void f32_to_bf16(const float * src, uint16_t * dst, int64_t n) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        _mm256_storeu_si256((__m256i *) (dst + i), (__m256i) _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
    }
    if (i < n) {
        const __mmask16 m = (__mmask16) ((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(dst + i, m, (__m256i) _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i)));
    }
}

// Two rows of VL values, lo (k) and hi (k + 1), rounded to bf16 and stored as VL pairs
// (lo[i], hi[i]) at out; returns the pairs stored.
inline __m512bh store_pair_bf16(vf lo, vf hi, uint16_t * out) {
    alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i both = (__m512i) _mm512_cvtne2ps_pbh(hi, lo);  // lo's 16 values, then hi's
    const __m512i pairs = _mm512_permutexvar_epi16(_mm512_load_si512(order), both);
    _mm512_storeu_si512(out, pairs);
    return (__m512bh) pairs;
}

// sum + lo[i] + hi[i] for each pair of `pairs`, the bf16 values exactly (a dot product
// with ones: products exact, sums f32).
inline vf add_pairs_bf16(vf sum, __m512bh pairs) {
    return _mm512_dpbf16_ps(sum, pairs, (__m512bh) _mm512_set1_epi16(0x3F80));
}

// n values of a row of an F16, BF16 or F32 tensor rounded to bf16 (to nearest, ties to
// even; f16 widened exactly first).
inline void to_bf16(ggml_type type, const void * src, uint16_t * dst, int64_t n) {
    if (type == GGML_TYPE_BF16) {
        std::memcpy(dst, src, sizeof(uint16_t) * n);
        return;
    }
    if (type == GGML_TYPE_F32) {
        f32_to_bf16((const float *) src, dst, n);
        return;
    }
    const ggml_fp16_t * half = (const ggml_fp16_t *) src;
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        const vf wide = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (half + i)));
        _mm256_storeu_si256((__m256i *) (dst + i), (__m256i) _mm512_cvtneps_pbh(wide));
    }
    if (i < n) {
        alignas(64) float rest[VL];
        f16_to_f32(half + i, rest, n - i);
        f32_to_bf16(rest, dst + i, n - i);
    }
}

// B packed [kc][NR] f32 into [kp/2][NR][2] bf16, rows from kc to kp (at least kc rounded
// up to even) zeros.
inline void pair_rows_bf16(const float * b, int64_t kc, uint16_t * out, int64_t kp = 0) {
    kp = std::max(kp, kc);
    for (int64_t k = 0; k < kp; k += 2, b += 2 * NR, out += 2 * NR) {
        for (int j = 0; j < NV; ++j) {
            const vf lo = k < kc ? vload(b + j * VL) : vzero();
            const vf hi = k + 1 < kc ? vload(b + NR + j * VL) : vzero();
            store_pair_bf16(lo, hi, out + j * 2 * VL);
        }
    }
}
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* AMX-BF16 (the sapphirerapids module): the bf16 mode's products as tile products. A
 * block is BF16_MR = 32 rows of C by NR = 32 columns, four 16 x 16 f32 tiles, and each
 * TDPBF16PS adds 16 x 16 x 32 bf16 products. A is 32 rows of bf16 (lda apart), B packed
 * [kp/2][NR][2] as for the AVX512-BF16 tile; kp is a multiple of BF16_K, both operands
 * padded with zeros. The tiles need the kernel's permission (amx_ready) and each
 * thread's tile configuration (amx_configure). */
#define SFUMATO_AMX_TILE 1
constexpr int BF16_MR = 32;
constexpr int64_t BF16_K = 32;

// Asks the kernel once for the AMX tile state (Linux: arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); false when the CPU lacks AMX-BF16 or the kernel refuses.
bool amx_ready();

struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// This thread's tiles 0-7 as 16 rows of 64 bytes.
inline void amx_configure() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

inline void amx_release() { _tile_release(); }

// The first `rows` x `cols` values of a tile pair's sums `part` (rows NR apart) into C:
// C = part, or C += part when acc.
inline void add_part(const float * part, float * c, int64_t ldc, bool acc, int rows, int cols) {
    for (int r = 0; r < rows; ++r) {
        for (int j = 0; j < cols; j += VL) {
            const int lanes = std::min(VL, cols - j);
            float * p = c + r * ldc + j;
            const vf v = vload(part + r * NR + j);
            if (lanes == VL) {
                vstore(p, acc ? vadd(v, vload(p)) : v);
            } else {
                vstore_first(p, acc ? vadd(v, vload_first(p, lanes)) : v, lanes);
            }
        }
    }
}

// The first `rows` (at most 16) x `cols` of a block: one row of tiles, C's tiles 0 and 1.
inline void amx_half_kernel(int64_t kp, const uint16_t * a, int64_t lda, const uint16_t * b, float * c, int64_t ldc,
                            bool acc, int rows, int cols) {
    _tile_zero(0);
    _tile_zero(1);
    const int64_t lda_bytes = lda * (int64_t) sizeof(uint16_t), ldb_bytes = 2 * NR * (int64_t) sizeof(uint16_t);
    for (int64_t k = 0; k < kp; k += BF16_K) {
        _tile_loadd(4, a + k, lda_bytes);
        _tile_loadd(6, b + k * NR, ldb_bytes);
        _tile_loadd(7, b + k * NR + 32, ldb_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
    }
    alignas(64) float part[16 * NR];
    constexpr int64_t part_bytes = NR * sizeof(float);
    _tile_stored(0, part, part_bytes);
    _tile_stored(1, part + 16, part_bytes);
    add_part(part, c, ldc, acc, rows, cols);
}

// acc ? C += A*B : C = A*B for the first `rows` x `cols` of a BF16_MR x NR block of C.
inline void amx_kernel(int64_t kp, const uint16_t * a, int64_t lda, const uint16_t * b, float * c, int64_t ldc,
                       bool acc, int rows, int cols) {
    static_assert(NR == 32, "two 16-column tiles");
    if (rows <= 16) {  // half a block: the upper two tiles alone
        amx_half_kernel(kp, a, lda, b, c, ldc, acc, rows, cols);
        return;
    }
    const bool whole = rows == BF16_MR && cols == NR;
    const int64_t ldc_bytes = ldc * (int64_t) sizeof(float);
    if (whole && acc) {
        _tile_loadd(0, c, ldc_bytes);
        _tile_loadd(1, c + 16, ldc_bytes);
        _tile_loadd(2, c + 16 * ldc, ldc_bytes);
        _tile_loadd(3, c + 16 * ldc + 16, ldc_bytes);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    const int64_t lda_bytes = lda * (int64_t) sizeof(uint16_t), ldb_bytes = 2 * NR * (int64_t) sizeof(uint16_t);
    for (int64_t k = 0; k < kp; k += BF16_K) {
        _tile_loadd(4, a + k, lda_bytes);
        _tile_loadd(5, a + 16 * lda + k, lda_bytes);
        _tile_loadd(6, b + k * NR, ldb_bytes);
        _tile_loadd(7, b + k * NR + 32, ldb_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    if (whole) {
        _tile_stored(0, c, ldc_bytes);
        _tile_stored(1, c + 16, ldc_bytes);
        _tile_stored(2, c + 16 * ldc, ldc_bytes);
        _tile_stored(3, c + 16 * ldc + 16, ldc_bytes);
        return;
    }
    alignas(64) float part[BF16_MR * NR];
    constexpr int64_t part_bytes = NR * sizeof(float);
    _tile_stored(0, part, part_bytes);
    _tile_stored(1, part + 16, part_bytes);
    _tile_stored(2, part + 16 * NR, part_bytes);
    _tile_stored(3, part + 16 * NR + 16, part_bytes);
    add_part(part, c, ldc, acc, rows, cols);
}
#endif  // AMX-BF16
#else
#define SFUMATO_BF16_TILE 0
#endif  // AVX512-BF16

#if !defined(SFUMATO_AMX_TILE)  // a module without AMX's tiles: the bf16 mode (if any) on its own tile
#define SFUMATO_AMX_TILE 0
constexpr int BF16_MR = MR;
constexpr int64_t BF16_K = 2;
inline bool amx_ready() { return false; }
inline void amx_configure() {}
inline void amx_release() {}
#endif

// The bf16 mode's block of C: BF16_MR rows by NR columns on the AMX tiles when `amx`,
// else MR rows on the AVX512-BF16 tile; k is packed in multiples of bf16_k's step (pairs,
// or AMX's 32), zeros appended.
inline int bf16_rows(bool amx) { return amx ? BF16_MR : MR; }
inline int64_t bf16_k(int64_t kc, bool amx) {
    const int64_t step = amx ? BF16_K : 2;
    return (kc + step - 1) / step * step;
}

#if SFUMATO_BF16_TILE
inline void bf16_block(bool amx, int64_t kp, const uint16_t * a, int64_t lda, const uint16_t * b, float * c,
                       int64_t ldc, bool acc, int rows, int cols) {
    (void) amx;
#if SFUMATO_AMX_TILE
    if (amx) {
        amx_kernel(kp, a, lda, b, c, ldc, acc, rows, cols);
        return;
    }
#endif
    micro_kernel_bf16(kp, a, lda, b, c, ldc, acc, std::min(rows, MR), cols);
}
#endif

}  // namespace sfumato

#endif  // SFUMATO_GEMM_TILE
