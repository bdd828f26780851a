/* CONV_2D (ggml_conv_2d_direct, the engine's conv-direct graph) as a tiled implicit GEMM.
 *
 * Takes: kernel [KW, KH, IC, OC] F16 or F32, contiguous; input [W, H, IC, N] F32 with
 * unit stride along W; output [OW, OH, OC, N] F32, contiguous; any stride, padding and
 * dilation. Everything else (and every case on a module built without AVX2+FMA+F16C)
 * goes to ggml's own function, renamed ggml_compute_forward_conv_2d_ggml by the build.
 *
 * The output is the GEMM  out[oc, p] = sum_k w[oc, k] * x[k, p]  over k = (ic, ky, kx)
 * and p = (n, oh, ow). No patch matrix is ever written whole: each thread packs a block
 * of KC rows of x for NR_BLOCK tiles of NR pixels at a time (a few hundred KB, in the
 * op's own work buffer) and the weights' KC columns for its output channels, converted
 * to f32 (f16 -> f32 is exact), then runs a register-tiled MR x NR micro-kernel over
 * them. Products and sums are f32 throughout: ggml's own CONV_2D rounds the input to the
 * kernel's type (f16) first, this kernel does not.
 *
 * Threads (ggml's ith/nth) take disjoint parts of the output: runs of pixel tiles, or
 * runs of output-channel panels when there are too few pixels to share; each packs its
 * own operands, so no barrier is needed. */
#include "kernels.h"

#include "ggml.h"
#include "ggml-cpu-impl.h"
#include "ops.h"

#include "gemm_tile.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

extern "C" void ggml_compute_forward_conv_2d_ggml(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#if SFUMATO_GEMM_TILE

namespace {

using namespace sfumato;

constexpr int NR_BLOCK = 8;      // micro-tiles of pixels packed together
constexpr int64_t KC_MAX = 256;  // rows of k packed at a time
constexpr int64_t KC_MIN = 16;
constexpr int64_t ROW_PAD = 16;

struct Shape {
    int64_t ic, oc, iw, ih, kw, kh, ow, oh, n;
    int64_t k;    // ic * kh * kw
    int64_t ohw;  // oh * ow
    int64_t p;    // n * ohw
    int sx, sy, px, py, dx, dy;
    size_t nb1, nb2, nb3;  // the input's strides in bytes
};

// A run of pixels of one tile that share an image and an output row.
struct Run {
    int j0, len;
    int64_t n, oh, ow0;
};

int tile_runs(const Shape & s, int64_t p0, Run * runs) {
    int count = 0;
    for (int j = 0; j < NR && p0 + j < s.p;) {
        const int64_t p = p0 + j;
        const int64_t n = p / s.ohw;
        const int64_t q = p % s.ohw;
        const int64_t oh = q / s.ow;
        const int64_t ow = q % s.ow;
        const int len = (int) std::min<int64_t>({NR - j, s.ow - ow, s.p - p});
        runs[count++] = {j, len, n, oh, ow};
        j += len;
    }
    return count;
}

// x[k0 .. k0+kc, tile's pixels] into b, [kc][NR], zeros outside the image and past the end.
void pack_input(const Shape & s, const char * src, const Run * runs, int nruns, int64_t k0, int64_t kc, float * b) {
    const int64_t khw = s.kh * s.kw;
    int64_t ic = k0 / khw, ky = (k0 % khw) / s.kw, kx = k0 % s.kw;
    for (int64_t k = 0; k < kc; ++k, b += NR) {
        std::memset(b, 0, sizeof(float) * NR);
        const int64_t off_x = kx * s.dx - s.px;
        for (int r = 0; r < nruns; ++r) {
            const Run & run = runs[r];
            const int64_t y = run.oh * s.sy + ky * s.dy - s.py;
            if (y < 0 || y >= s.ih) {
                continue;
            }
            const float * row = (const float *) (src + run.n * s.nb3 + ic * s.nb2 + y * s.nb1);
            float * out = b + run.j0;
            if (s.sx == 1) {
                // x = ow0 + t + off_x must lie in [0, iw)
                const int64_t first = run.ow0 + off_x;
                const int64_t lo = std::max<int64_t>(0, -first);
                const int64_t hi = std::min<int64_t>(run.len, s.iw - first);
                if (hi > lo) {
                    std::memcpy(out + lo, row + first + lo, sizeof(float) * (hi - lo));
                }
            } else {
                for (int t = 0; t < run.len; ++t) {
                    const int64_t x = (run.ow0 + t) * s.sx + off_x;
                    if (x >= 0 && x < s.iw) {
                        out[t] = row[x];
                    }
                }
            }
        }
        if (++kx == s.kw) {
            kx = 0;
            if (++ky == s.kh) {
                ky = 0;
                ++ic;
            }
        }
    }
}

// w[oc0 .. oc0 + panels*MR, k0 .. k0+kc] into a as f32 rows ROW_PAD floats longer than kc
// (rows a power of two apart would share cache sets), zeros past oc_end: a widening copy
// of contiguous rows, which the micro-kernel reads as they are.
void pack_weights(const Shape & s, const ggml_tensor * kernel, int64_t oc0, int64_t oc_end, int64_t panels, int64_t k0,
                  int64_t kc, float * a) {
    for (int64_t row = 0; row < panels * MR; ++row) {
        const int64_t oc = oc0 + row;
        float * out = a + row * (kc + ROW_PAD);
        if (oc >= oc_end) {
            std::memset(out, 0, sizeof(float) * kc);
        } else if (kernel->type == GGML_TYPE_F16) {
            f16_to_f32((const ggml_fp16_t *) kernel->data + oc * s.k + k0, out, kc);
        } else {
            std::memcpy(out, (const float *) kernel->data + oc * s.k + k0, sizeof(float) * kc);
        }
    }
}

// The output tile (panel of MR channels from oc, NR pixels from p0): C += or = A*B.
void output_tile(const Shape & s, const float * a, const float * b, int64_t kc, float * dst, int64_t oc, int64_t oc_end,
                 int64_t p0, bool acc) {
    const int64_t n = p0 / s.ohw, q = p0 % s.ohw;
    const int64_t cols = std::min<int64_t>(NR, s.p - p0);
    if (q + cols <= s.ohw) {  // in one image: straight into the output
        const int rows = (int) std::min<int64_t>(MR, oc_end - oc);
        micro_kernel(kc, a, kc + ROW_PAD, b, dst + (n * s.oc + oc) * s.ohw + q, s.ohw, acc, rows, (int) cols);
        return;
    }
    alignas(64) float tile[MR * NR];
    micro_kernel(kc, a, kc + ROW_PAD, b, tile, NR, false);
    for (int r = 0; r < MR && oc + r < oc_end; ++r) {
        for (int j = 0; j < NR && p0 + j < s.p; ++j) {
            const int64_t p = p0 + j;
            float * out = dst + ((p / s.ohw) * s.oc + oc + r) * s.ohw + p % s.ohw;
            *out = acc ? *out + tile[r * NR + j] : tile[r * NR + j];
        }
    }
}

bool takes(const ggml_tensor * dst) {
    const ggml_tensor * kernel = dst->src[0];
    const ggml_tensor * src = dst->src[1];
    return (kernel->type == GGML_TYPE_F16 || kernel->type == GGML_TYPE_F32) && ggml_is_contiguous(kernel) &&
           src->type == GGML_TYPE_F32 && src->nb[0] == sizeof(float) && dst->type == GGML_TYPE_F32 &&
           ggml_is_contiguous(dst) && kernel->ne[2] == src->ne[2] && dst->ne[2] == kernel->ne[3] &&
           dst->ne[3] == src->ne[3];
}

// Whether the shape runs here, and the rows of k per block that fit a thread's share of
// the work buffer (0: it does not fit; ggml's own function runs then).
int64_t block_rows(const ggml_compute_params * params, int64_t oc_panels, int64_t k) {
    const size_t share = (params->wsize / params->nth) & ~(size_t) 63;
    for (int64_t kc = std::min(KC_MAX, k); kc >= std::min(KC_MIN, k); kc /= 2) {
        const size_t need =
            aligned(sizeof(float) * oc_panels * MR * (kc + ROW_PAD)) + aligned(sizeof(float) * NR_BLOCK * NR * kc) + 64;
        if (need <= share) {
            return kc;
        }
    }
    return 0;
}

bool conv_2d(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * kernel = dst->src[0];
    const ggml_tensor * src = dst->src[1];
    Shape s{};
    s.ic = src->ne[2];
    s.oc = kernel->ne[3];
    s.iw = src->ne[0];
    s.ih = src->ne[1];
    s.kw = kernel->ne[0];
    s.kh = kernel->ne[1];
    s.ow = dst->ne[0];
    s.oh = dst->ne[1];
    s.n = dst->ne[3];
    s.k = s.ic * s.kh * s.kw;
    s.ohw = s.oh * s.ow;
    s.p = s.n * s.ohw;
    s.sx = dst->op_params[0];
    s.sy = dst->op_params[1];
    s.px = dst->op_params[2];
    s.py = dst->op_params[3];
    s.dx = dst->op_params[4];
    s.dy = dst->op_params[5];
    s.nb1 = src->nb[1];
    s.nb2 = src->nb[2];
    s.nb3 = src->nb[3];

    const int ith = params->ith, nth = params->nth;
    const int64_t tiles = (s.p + NR - 1) / NR;
    const int64_t panels = (s.oc + MR - 1) / MR;
    // Pixels are shared when there are enough of them; else output channels are.
    const bool split_pixels = tiles >= 4 * nth || panels < nth;
    int64_t t0 = 0, t1 = tiles, panel0 = 0, panel1 = panels;
    if (split_pixels) {
        t0 = tiles * ith / nth;
        t1 = tiles * (ith + 1) / nth;
    } else {
        panel0 = panels * ith / nth;
        panel1 = panels * (ith + 1) / nth;
    }
    const int64_t my_panels = split_pixels ? panels : (panels + nth - 1) / nth;  // the largest share: same for all
    const int64_t kc_max = block_rows(params, my_panels, s.k);
    if (kc_max == 0) {
        return false;  // every thread decides the same from the same numbers
    }
    if (t0 >= t1 || panel0 >= panel1) {
        return true;
    }
    const int64_t oc0 = panel0 * MR, oc_end = std::min(s.oc, panel1 * MR);
    const int64_t n_panels = panel1 - panel0;

    char * base = (char *) params->wdata + ((params->wsize / nth) & ~(size_t) 63) * ith;
    base = (char *) (((uintptr_t) base + 63) & ~(uintptr_t) 63);
    float * a = (float *) base;
    float * b = (float *) (base + aligned(sizeof(float) * n_panels * MR * (kc_max + ROW_PAD)));

    const char * src_data = (const char *) src->data;
    float * out = (float *) dst->data;
    Run runs[NR_BLOCK][NR];
    int nruns[NR_BLOCK];
    for (int64_t k0 = 0; k0 < s.k; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, s.k - k0);
        pack_weights(s, kernel, oc0, oc_end, n_panels, k0, kc, a);
        for (int64_t tb = t0; tb < t1; tb += NR_BLOCK) {
            const int nt = (int) std::min<int64_t>(NR_BLOCK, t1 - tb);
            for (int t = 0; t < nt; ++t) {
                nruns[t] = tile_runs(s, (tb + t) * NR, runs[t]);
                pack_input(s, src_data, runs[t], nruns[t], k0, kc, b + t * kc * NR);
            }
            for (int64_t pi = 0; pi < n_panels; ++pi) {
                for (int t = 0; t < nt; ++t) {
                    output_tile(s, a + pi * MR * (kc + ROW_PAD), b + t * kc * NR, kc, out, oc0 + pi * MR, oc_end, (tb + t) * NR,
                                k0 > 0);
                }
            }
        }
    }
    return true;
}

}  // namespace

#endif  // SFUMATO_GEMM_TILE

extern "C" void ggml_compute_forward_conv_2d(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
#if SFUMATO_GEMM_TILE
    if (!params->use_ref && sfumato_kernels_enabled() && takes(dst) && conv_2d(params, dst)) {
        return;
    }
#endif
    ggml_compute_forward_conv_2d_ggml(params, dst);
}
