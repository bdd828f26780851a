/* MUL_MAT's GEMM: llamafile_sgemm, the entry ggml's mul_mat offers a whole matrix product
 * to before it converts the activations to the weights' type.
 *
 * Takes: A (the weights, src0) F16, BF16 or F32, B (the activations, src1) F32, C F32,
 * rows of each contiguous in k:  C[j*ldc + i] = sum_l A[i*lda + l] * B[j*ldb + l]  for
 * i < m, j < n. Products and sums are f32, f16 and bf16 weights widened exactly: the
 * activations are never rounded to f16 (ggml's own path converts them to the weights'
 * type first). In the bf16 mode (SFUMATO_PRECISION=bf16, a module with AVX512-BF16) both
 * operands are rounded to bf16 as they are packed, and the bf16 tile (AMX-BF16's tiles in
 * the sapphirerapids module) sums in f32. Everything else goes to llamafile's own, renamed llamafile_sgemm_ggml by the
 * build (which then declines f16 x f32, and ggml converts and calls it again).
 *
 * Each thread packs a chunk of IC weight rows at a time as f32 panels of NR into a buffer
 * of its own and runs the register tile (gemm_tile.h) with weight rows along the vector
 * lanes, so each C row is written with full vectors, and MR activation rows at a time
 * as its broadcast operand. Threads take disjoint runs of activation rows, or of
 * weight rows when there are fewer activation rows than weight rows to share. */
#include "kernels.h"

#include "ggml.h"
#include "ggml-cpu-impl.h"
#include "llamafile/sgemm.h"

#include "gemm_tile.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" bool llamafile_sgemm_ggml(const struct ggml_compute_params * params, int64_t m, int64_t n, int64_t k,
                                     const void * A, int64_t lda, const void * B, int64_t ldb, void * C, int64_t ldc,
                                     int Atype, int Btype, int Ctype);

#if SFUMATO_GEMM_TILE

namespace {

using namespace sfumato;

constexpr int64_t KC = 256;           // k per packed block (twice as many in the bf16 mode: the same bytes)
constexpr int64_t IC = 16 * NR;       // weight rows per packed chunk
constexpr int64_t SPLIT_ROWS = 4;     // activation panels per thread, at least, to share them

struct Gemm {
    int64_t m, n, k, lda, ldb, ldc;
    const void * a;
    ggml_type a_type;
    const float * b;
    float * c;
};

// Weight rows [i0, i0 + tiles*NR) x [k0, k0 + kc) into panels [tile][kc][NR], zeros past
// m: each tile's NR rows widened to f32 into `rows` (NR rows of kc), then transposed a
// VL x VL block at a time.
void pack_weights(const Gemm & g, int64_t i0, int64_t tiles, int64_t k0, int64_t kc, float * out, float * rows) {
    const size_t esize = ggml_type_size(g.a_type);
    for (int64_t t = 0; t < tiles; ++t) {
        float * panel = out + t * kc * NR;
        for (int r = 0; r < NR; ++r) {
            const int64_t i = i0 + t * NR + r;
            if (i >= g.m) {
                std::memset(rows + r * kc, 0, sizeof(float) * kc);
            } else {
                widen(g.a_type, (const char *) g.a + (i * g.lda + k0) * esize, rows + r * kc, kc);
            }
        }
        transpose_rows(rows, kc, panel);
    }
}

// Activation rows [j0, j0 + MR) x [k0, k0 + kc) copied as MR rows ROW_PAD floats longer
// than kc (rows a power of two apart in memory would share cache sets), zeros past n.
constexpr int64_t ROW_PAD = 16;
void pack_activations(const Gemm & g, int64_t j0, int64_t k0, int64_t kc, float * out) {
    for (int r = 0; r < MR; ++r) {
        if (j0 + r < g.n) {
            std::memcpy(out + r * (kc + ROW_PAD), g.b + (j0 + r) * g.ldb + k0, sizeof(float) * kc);
        } else {
            std::memset(out + r * (kc + ROW_PAD), 0, sizeof(float) * kc);
        }
    }
}

void output_tile(const Gemm & g, const float * act, int64_t lda, const float * weights, int64_t kc, int64_t j0,
                 int64_t i0, bool acc) {
    const int rows = (int) std::min<int64_t>(MR, g.n - j0), cols = (int) std::min<int64_t>(NR, g.m - i0);
    micro_kernel(kc, act, lda, weights, g.c + j0 * g.ldc + i0, g.ldc, acc, rows, cols);
}

// Buffers of this thread, kept for the next op (ggml's threads live as long as its pool).
struct Scratch {
    std::vector<float> weights, activations, row;
    std::vector<uint16_t> weights_bf16, activations_bf16, rows_bf16;  // the bf16 mode's operands
};
thread_local Scratch t_scratch;

#if SFUMATO_BF16_TILE
// The bf16 mode's weight rows [i0, i0 + tiles*NR) x [k0, k0 + kc) rounded to bf16 into
// panels [tile][kp/2][NR][2] (the pairs of k of each row side by side; zeros past kc and
// past m): each tile's NR rows as bf16 rows of kp values into `rows`, then transposed as
// NR rows of kp/2 32-bit pairs.
void pack_weights_bf16(const Gemm & g, int64_t i0, int64_t tiles, int64_t k0, int64_t kc, int64_t kp, uint16_t * out,
                       uint16_t * rows) {
    const size_t esize = ggml_type_size(g.a_type);
    for (int64_t t = 0; t < tiles; ++t) {
        for (int r = 0; r < NR; ++r) {
            const int64_t i = i0 + t * NR + r;
            uint16_t * row = rows + r * kp;
            if (i >= g.m) {
                std::memset(row, 0, sizeof(uint16_t) * kp);
                continue;
            }
            to_bf16(g.a_type, (const char *) g.a + (i * g.lda + k0) * esize, row, kc);
            std::memset(row + kc, 0, sizeof(uint16_t) * (kp - kc));
        }
        transpose_rows((const float *) rows, kp / 2, (float *) (out + t * kp * NR));
    }
}

// The bf16 mode: activation rows [p0*MR, p1*MR) x [k0, k0 + kc) rounded to bf16 once per
// block of k, rows bf16_k(kc) + ROW_PAD apart, zeros past kc and past n, as many rows as
// whole blocks of the tile's rows (bf16_rows) cover.
void bf16_activations(const Gemm & g, int64_t p0, int64_t p1, int64_t k0, int64_t kc, bool amx, Scratch & s) {
    const int64_t kp = bf16_k(kc, amx), lda = kp + ROW_PAD, bm = bf16_rows(amx);
    const int64_t rows = ((p1 - p0) * MR + bm - 1) / bm * bm;
    s.activations_bf16.resize(rows * lda);
    for (int64_t j = p0 * MR; j < p0 * MR + rows; ++j) {
        uint16_t * out = s.activations_bf16.data() + (j - p0 * MR) * lda;
        if (j < g.n && j < p1 * MR) {
            f32_to_bf16(g.b + j * g.ldb + k0, out, kc);
            std::memset(out + kc, 0, sizeof(uint16_t) * (kp - kc));
        } else {
            std::memset(out, 0, sizeof(uint16_t) * kp);
        }
    }
}

// The bf16 mode's products of those rows with the chunk's nt weight tiles from tb
// (packed in s.weights_bf16).
void bf16_panels(const Gemm & g, int64_t p0, int64_t p1, int64_t tb, int64_t nt, int64_t k0, int64_t kc, bool amx,
                 Scratch & s) {
    const int64_t kp = bf16_k(kc, amx), lda = kp + ROW_PAD;
    const int bm = bf16_rows(amx);
    const int64_t j_end = std::min(g.n, p1 * MR);
    for (int64_t j0 = p0 * MR; j0 < j_end; j0 += bm) {
        const uint16_t * rows = s.activations_bf16.data() + (j0 - p0 * MR) * lda;
        for (int64_t t = 0; t < nt; ++t) {
            const int64_t i0 = (tb + t) * NR;
            const int m = (int) std::min<int64_t>(bm, j_end - j0), cols = (int) std::min<int64_t>(NR, g.m - i0);
            bf16_block(amx, kp, rows, lda, s.weights_bf16.data() + t * kp * NR, g.c + j0 * g.ldc + i0, g.ldc, k0 > 0,
                       m, cols);
        }
    }
}
#endif

void gemm(const ggml_compute_params * params, const Gemm & g) {
    const int ith = params->ith, nth = params->nth;
    const int64_t panels = (g.n + MR - 1) / MR;
    const int64_t tiles = (g.m + NR - 1) / NR;
    // Threads share activation rows when there are many (each then widens all the
    // weights), else weight rows (each widening only its own).
    int64_t p0 = 0, p1 = panels, t0 = 0, t1 = tiles;
    if ((panels >= SPLIT_ROWS * nth && g.n >= g.m) || tiles < nth) {
        p0 = panels * ith / nth;
        p1 = panels * (ith + 1) / nth;
    } else {
        t0 = tiles * ith / nth;
        t1 = tiles * (ith + 1) / nth;
    }
    if (p0 >= p1 || t0 >= t1) {
        return;
    }
#if SFUMATO_BF16_TILE
    const bool bf16 = sfumato_bf16_enabled() != 0;
    const bool amx = bf16 && amx_ready();
#else
    const bool bf16 = false;
#endif
    const int64_t kc_max = std::min(bf16 ? 2 * KC : KC, g.k);
    const int64_t chunk_tiles = IC / NR;
    Scratch & s = t_scratch;
    s.weights.resize(chunk_tiles * kc_max * NR);
    s.activations.resize((kc_max + ROW_PAD) * MR);
    s.row.resize(NR * kc_max);
#if SFUMATO_BF16_TILE
    if (bf16) {
        s.weights_bf16.resize(chunk_tiles * bf16_k(kc_max, amx) * NR);
        s.rows_bf16.resize(NR * bf16_k(kc_max, amx));
    }
    if (amx) {
        amx_configure();
    }
#endif
    for (int64_t k0 = 0; k0 < g.k; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, g.k - k0);
#if SFUMATO_BF16_TILE
        if (bf16) {
            bf16_activations(g, p0, p1, k0, kc, amx, s);
        }
#endif
        for (int64_t tb = t0; tb < t1; tb += chunk_tiles) {
            const int64_t nt = std::min(chunk_tiles, t1 - tb);
            if (bf16) {
#if SFUMATO_BF16_TILE
                pack_weights_bf16(g, tb * NR, nt, k0, kc, bf16_k(kc, amx), s.weights_bf16.data(), s.rows_bf16.data());
                bf16_panels(g, p0, p1, tb, nt, k0, kc, amx, s);
#endif
                continue;
            }
            pack_weights(g, tb * NR, nt, k0, kc, s.weights.data(), s.row.data());
            for (int64_t p = p0; p < p1; ++p) {
                pack_activations(g, p * MR, k0, kc, s.activations.data());
                for (int64_t t = 0; t < nt; ++t) {
                    output_tile(g, s.activations.data(), kc + ROW_PAD, s.weights.data() + t * kc * NR, kc, p * MR,
                                (tb + t) * NR, k0 > 0);
                }
            }
        }
    }
#if SFUMATO_BF16_TILE
    if (amx) {
        amx_release();
    }
#endif
}

}  // namespace

#endif  // SFUMATO_GEMM_TILE

extern "C" bool llamafile_sgemm(const struct ggml_compute_params * params, int64_t m, int64_t n, int64_t k,
                                const void * A, int64_t lda, const void * B, int64_t ldb, void * C, int64_t ldc,
                                int Atype, int Btype, int Ctype) {
#if SFUMATO_GEMM_TILE
    if (!params->use_ref && sfumato_kernels_enabled() &&
        (Atype == GGML_TYPE_F16 || Atype == GGML_TYPE_BF16 || Atype == GGML_TYPE_F32) &&
        Btype == GGML_TYPE_F32 && Ctype == GGML_TYPE_F32 && m > 0 && n > 0 && k > 0) {
        gemm(params, Gemm{m, n, k, lda, ldb, ldc, A, (ggml_type) Atype, (const float *) B, (float *) C});
        return true;
    }
#endif
    return llamafile_sgemm_ggml(params, m, n, k, A, lda, B, ldb, C, ldc, Atype, Btype, Ctype);
}
