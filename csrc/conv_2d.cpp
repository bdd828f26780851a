/* CONV_2D (ggml_conv_2d_direct, the engine's conv-direct graph) as a tiled implicit GEMM.
 *
 * Takes: kernel [KW, KH, IC, OC] F16, BF16 or F32, contiguous; input [W, H, IC, N] F32 with
 * unit stride along W; output [OW, OH, OC, N] F32, contiguous; any stride, padding and
 * dilation. Everything else (and every case on a module built without AVX2+FMA+F16C)
 * goes to ggml's own function, renamed ggml_compute_forward_conv_2d_ggml by the build.
 *
 * The output is the GEMM  out[oc, p] = sum_k w[oc, k] * x[k, p]  over k = (ic, ky, kx)
 * and p = (n, oh, ow). No patch matrix is ever written whole: each thread packs a block
 * of KC rows of x for NR_BLOCK tiles of NR pixels at a time (a few hundred KB, in the
 * op's own work buffer) and the weights' KC columns for its output channels, converted
 * to f32 (f16 and bf16 -> f32 are exact), then runs a register-tiled MR x NR micro-kernel
 * over them. Products and sums are f32 throughout: ggml's own CONV_2D rounds the input to
 * the kernel's type (f16) first, this kernel does not. In the bf16 mode (a module with
 * AVX512-BF16, SFUMATO_PRECISION=bf16) both operands are packed as bf16 instead, and the
 * bf16 tile (AMX-BF16's tiles in the sapphirerapids module, 32 channels at a time) sums
 * their products in f32.
 *
 * A folded bias and skip (csrc/fusion.h) are added to each tile after its last block of
 * k, while it is in cache, in the order the graph's ADDs would add them.
 *
 * Threads (ggml's ith/nth) take disjoint parts of the output: runs of pixel tiles, or
 * runs of output-channel panels when there are too few pixels to share. Each packs its own
 * input; threads that share the pixels pack the weights once between them, each a slice
 * of the rows, with a barrier after each block of k is packed and before the next. In the
 * bf16 mode the model's weights are packed once, on the first call, and kept
 * (csrc/kept_weights.h): later calls read every block of k from the kept copy. */
#include "kernels.h"

#include "ggml.h"
#include "ggml-cpu-impl.h"
#include "ops.h"

#include "fusion.h"
#include "gemm_tile.h"
#include "kept_weights.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" void ggml_compute_forward_conv_2d_ggml(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#if SFUMATO_GEMM_TILE

namespace {

using namespace sfumato;

constexpr int NR_BLOCK = 8;      // micro-tiles of pixels packed together
constexpr int64_t KC_MAX = 256;  // rows of k packed at a time
constexpr int64_t KC_MAX_AMX = 1024;  // on AMX's tiles: fewer round trips of C through the tiles
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

// x[k0 .. k0+kc, tile's pixels], a row of NR values per k, zeros outside the image and past
// the end: row k is written where row(k) points, and then done(k) is called.
template <typename Row, typename Done>
void pack_input_rows(const Shape & s, const char * src, const Run * runs, int nruns, int64_t k0, int64_t kc,
                     const Row & row_of, const Done & done) {
    const int64_t khw = s.kh * s.kw;
    int64_t ic = k0 / khw, ky = (k0 % khw) / s.kw, kx = k0 % s.kw;
    for (int64_t k = 0; k < kc; ++k) {
        float * b = row_of(k);
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
                    copy_floats(out + lo, row + first + lo, hi - lo);
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
        done(k);
        if (++kx == s.kw) {
            kx = 0;
            if (++ky == s.kh) {
                ky = 0;
                ++ic;
            }
        }
    }
}

// x[k0 .. k0+kc, tile's pixels] into b, [kc][NR].
void pack_input(const Shape & s, const char * src, const Run * runs, int nruns, int64_t k0, int64_t kc, float * b) {
    pack_input_rows(s, src, runs, nruns, k0, kc, [b](int64_t k) { return b + k * NR; }, [](int64_t) {});
}

#if SFUMATO_BF16_TILE
// The bf16 mode: the same rows rounded to bf16, each pair of rows (k, k+1) stored as NR
// pairs side by side ([kp/2][NR][2], pair_rows_bf16's layout) as soon as both are packed,
// zeros from kc to kp.
void pack_input_bf16(const Shape & s, const char * src, const Run * runs, int nruns, int64_t k0, int64_t kc,
                     int64_t kp, uint16_t * out) {
    alignas(64) float two[2][NR];
    const auto store = [&](int64_t k) {  // rows k and k + 1 of `two`
        for (int j = 0; j < NV; ++j) {
            store_pair_bf16(vload(two[0] + j * VL), vload(two[1] + j * VL), out + k * NR + j * 2 * VL);
        }
    };
    pack_input_rows(s, src, runs, nruns, k0, kc, [&two](int64_t k) { return two[k & 1]; }, [&](int64_t k) {
        if (k & 1) {
            store(k - 1);
        }
    });
    int64_t k = kc;
    if (kc & 1) {
        std::memset(two[1], 0, sizeof(two[1]));
        store(kc - 1);
        ++k;
    }
    std::memset(out + k * NR, 0, sizeof(uint16_t) * (kp - k) * NR);
}
#endif

// The arithmetic a convolution runs: f32, or the bf16 mode on the AVX512-BF16 tile or
// on the AMX tiles.
struct Mode {
    bool bf16 = false, amx = false;
    // Rows of k a block of kc packs: kc, or in the bf16 mode kc rounded up to what the
    // tile takes at a time (pairs, or AMX's 32), zeros appended.
    int64_t k_rows(int64_t kc) const { return bf16 ? bf16_k(kc, amx) : kc; }
    // Weight rows packed for `panels` panels of MR output channels (the bf16 tile reads
    // blocks of bf16_rows; the rows past the panels are zeros).
    int64_t weight_rows(int64_t panels) const {
        const int64_t step = bf16 ? bf16_rows(amx) : MR;
        return (panels * MR + step - 1) / step * step;
    }
    size_t esize() const { return bf16 ? sizeof(uint16_t) : sizeof(float); }
};

// Elements per packed weight row: k_rows(kc), then ROW_PAD more (rows a power of two
// apart would share cache sets).
int64_t row_len(int64_t kc, const Mode & mode) { return mode.k_rows(kc) + ROW_PAD; }

// Rows [row0, row1) of w[oc0 .., k0 .. k0+kc] into a (row r at r * row_len(kc)), zeros
// past oc_end: f32 rows (a widening copy), or bf16 rows in the bf16 mode.
void pack_weights(const Shape & s, const ggml_tensor * kernel, int64_t oc0, int64_t oc_end, int64_t row0, int64_t row1,
                  int64_t k0, int64_t kc, const Mode & mode, void * a) {
    const bool bf16 = mode.bf16;
    const int64_t len = row_len(kc, mode);
    const size_t esize = ggml_type_size(kernel->type);
    for (int64_t row = row0; row < row1; ++row) {
        const int64_t oc = oc0 + row;
        const void * src = (const char *) kernel->data + (oc * s.k + k0) * esize;
        if (!bf16) {
            float * out = (float *) a + row * len;
            if (oc >= oc_end) {
                std::memset(out, 0, sizeof(float) * kc);
            } else {
                widen(kernel->type, src, out, kc);
            }
            continue;
        }
#if SFUMATO_BF16_TILE
        uint16_t * out = (uint16_t *) a + row * len;
        if (oc >= oc_end) {
            std::memset(out, 0, sizeof(uint16_t) * (len - ROW_PAD));
            continue;
        }
        to_bf16(kernel->type, src, out, kc);
        std::memset(out + kc, 0, sizeof(uint16_t) * (len - ROW_PAD - kc));
#endif
    }
}

// The epilogue's adds for `rows` x `cols` values of C (rows ld apart) from output
// channel oc on: C += bias[oc + r], then C += R at C's own index (R rows ld apart too).
void add_epilogue(const ConvEpilogue & fold, float * c, const float * res, int64_t ld, int64_t oc, int rows, int cols) {
    for (int r = 0; r < rows; ++r) {
        float * row = c + r * ld;
        const vf bias = vset1(fold.bias != nullptr ? fold.bias[oc + r] : 0.0f);
        for (int j = 0; j < cols; j += VL) {
            const int lanes = std::min(VL, cols - j);
            vf v = lanes == VL ? vload(row + j) : vload_first(row + j, lanes);
            if (fold.bias != nullptr) {
                v = vadd(v, bias);
            }
            if (res != nullptr) {
                const float * rr = res + r * ld + j;
                v = vadd(v, lanes == VL ? vload(rr) : vload_first(rr, lanes));
            }
            if (lanes == VL) {
                vstore(row + j, v);
            } else {
                vstore_first(row + j, v, lanes);
            }
        }
    }
}

// The output tile (TM channels from oc, NR pixels from p0): C += or = A*B, where
// run(c, ldc, acc, rows, cols) computes the tile of A*B into c; then, after the last
// block of k (`last`), the folded epilogue.
template <int TM, typename Tile>
void output_tile(const Shape & s, const Tile & run, float * dst, int64_t oc, int64_t oc_end, int64_t p0, bool acc,
                 const ConvEpilogue & fold, bool last) {
    const int64_t n = p0 / s.ohw, q = p0 % s.ohw;
    const int64_t cols = std::min<int64_t>(NR, s.p - p0);
    const bool epilogue = last && fold.any();
    if (q + cols <= s.ohw) {  // in one image: straight into the output
        const int rows = (int) std::min<int64_t>(TM, oc_end - oc);
        const int64_t at = (n * s.oc + oc) * s.ohw + q;
        const float * res = epilogue && fold.residual != nullptr ? fold.residual + at : nullptr;
        if (res != nullptr) {
            prefetch_tile(res, s.ohw, rows, (int) cols);
        }
        run(dst + at, s.ohw, acc, rows, (int) cols);
        if (epilogue) {
            add_epilogue(fold, dst + at, res, s.ohw, oc, rows, (int) cols);
        }
        return;
    }
    alignas(64) float tile[TM * NR];
    run(tile, NR, false, TM, NR);
    for (int r = 0; r < TM && oc + r < oc_end; ++r) {
        for (int j = 0; j < NR && p0 + j < s.p; ++j) {
            const int64_t p = p0 + j;
            const int64_t at = ((p / s.ohw) * s.oc + oc + r) * s.ohw + p % s.ohw;
            float value = acc ? dst[at] + tile[r * NR + j] : tile[r * NR + j];
            if (epilogue && fold.bias != nullptr) {
                value += fold.bias[oc + r];
            }
            if (epilogue && fold.residual != nullptr) {
                value += fold.residual[at];
            }
            dst[at] = value;
        }
    }
}

bool takes(const ggml_tensor * dst) {
    const ggml_tensor * kernel = dst->src[0];
    const ggml_tensor * src = dst->src[1];
    return (kernel->type == GGML_TYPE_F16 || kernel->type == GGML_TYPE_BF16 || kernel->type == GGML_TYPE_F32) &&
           ggml_is_contiguous(kernel) &&
           src->type == GGML_TYPE_F32 && src->nb[0] == sizeof(float) && dst->type == GGML_TYPE_F32 &&
           ggml_is_contiguous(dst) && kernel->ne[2] == src->ne[2] && dst->ne[2] == kernel->ne[3] &&
           dst->ne[3] == src->ne[3];
}

// The buffers of a thread: its packed weights, then its packed input.
struct Buffers {
    size_t weights, input;
};
Buffers buffer_bytes(int64_t oc_panels, int64_t kc, const Mode & mode) {
    return {aligned(mode.esize() * mode.weight_rows(oc_panels) * row_len(kc, mode)),
            aligned(mode.esize() * NR_BLOCK * NR * mode.k_rows(kc))};
}

// Whether the shape runs here, and the rows of k per block that fit the work buffer (0: it
// does not fit; ggml's own function runs then): a thread's share of it holds its weights
// and its input, or, when the threads share one packing of the weights (`shared`), the
// weights come first, once, and each thread's input after them.
int64_t block_rows(const ggml_compute_params * params, int64_t oc_panels, int64_t k, const Mode & mode, bool shared) {
    const size_t share = (params->wsize / params->nth) & ~(size_t) 63;
    for (int64_t kc = std::min(mode.amx ? KC_MAX_AMX : KC_MAX, k); kc >= std::min(KC_MIN, k); kc /= 2) {
        const Buffers need = buffer_bytes(oc_panels, kc, mode);
        const bool fits = shared ? need.weights + (need.input + 64) * params->nth + 64 <= params->wsize
                                 : need.weights + need.input + 64 <= share;
        if (fits) {
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
    Mode mode;
#if SFUMATO_BF16_TILE
    mode.bf16 = sfumato_bf16_enabled() != 0;
    mode.amx = mode.bf16 && amx_ready();
#endif
    const bool bf16 = mode.bf16;
    // Threads that share the pixels need every output channel's weights: they pack them
    // once, each a slice of the rows, between barriers, instead of each packing all.
    const bool shared = split_pixels && nth > 1;
    const int64_t kc_max = block_rows(params, my_panels, s.k, mode, shared);
    if (kc_max == 0) {
        return false;  // every thread decides the same from the same numbers
    }
    // The bf16 mode reads the weights' kept copy where the engine's are kept
    // (csrc/kept_weights.h): every block of k packed as below, for all output channels
    // (rows from 0), one block after another; made on the first call, by every thread a
    // share of the rows.
    Kept kept;
    const int64_t kept_rows = mode.weight_rows(panels) + bf16_rows(mode.amx);  // whole blocks past any thread's last
    auto kept_offset = [&](int64_t k0) { return k0 / kc_max * kept_rows * row_len(kc_max, mode); };
    auto kept_block = [&](int64_t k0) { return (uint16_t *) kept.data + kept_offset(k0); };
#if SFUMATO_BF16_TILE
    if (bf16) {
        const int64_t last = s.k - (s.k - 1) / kc_max * kc_max;
        const size_t bytes = sizeof(uint16_t) * (size_t) (kept_offset(s.k - last) + kept_rows * row_len(last, mode));
        kept = kept_copy(kernel, bytes, kc_max * 2 + (mode.amx ? 1 : 0), nth);
        if (kept.fill) {
            for (int64_t k0 = 0; k0 < s.k; k0 += kc_max) {
                pack_weights(s, kernel, 0, s.oc, kept_rows * ith / nth, kept_rows * (ith + 1) / nth, k0,
                             std::min(kc_max, s.k - k0), mode, kept_block(k0));
            }
            ggml_barrier(params->threadpool);
        }
    }
#endif
    const bool idle = t0 >= t1 || panel0 >= panel1;
    if (idle && (!shared || kept.data != nullptr)) {
        return true;
    }
    const int64_t oc0 = panel0 * MR, oc_end = std::min(s.oc, panel1 * MR);
    const int64_t n_panels = panel1 - panel0;
    const int64_t weight_rows = mode.weight_rows(n_panels);

    const Buffers bytes = buffer_bytes(n_panels, kc_max, mode);
    char * start = (char *) (((uintptr_t) params->wdata + 63) & ~(uintptr_t) 63);
    void * a = start;
    char * b = start + bytes.weights + bytes.input * ith;
    if (!shared) {
        a = start + ((params->wsize / nth) & ~(size_t) 63) * ith;
        b = (char *) a + bytes.weights;
    }

    const char * src_data = (const char *) src->data;
    float * out = (float *) dst->data;
    const ConvEpilogue fold = conv_epilogue(dst);
    Run runs[NR_BLOCK][NR];
    int nruns[NR_BLOCK];
    if (mode.amx) {
        amx_configure();
    }
    for (int64_t k0 = 0; k0 < s.k; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, s.k - k0);
        const int64_t lda = row_len(kc, mode);
        const bool last = k0 + kc == s.k;
        if (kept.data != nullptr) {
            // packed already
        } else if (!shared) {
            pack_weights(s, kernel, oc0, oc_end, 0, weight_rows, k0, kc, mode, a);
        } else {
            if (k0 > 0) {
                ggml_barrier(params->threadpool);  // every thread is done with the last block's weights
            }
            pack_weights(s, kernel, oc0, oc_end, weight_rows * ith / nth, weight_rows * (ith + 1) / nth, k0, kc, mode,
                         a);
            ggml_barrier(params->threadpool);  // and this block's are all packed
            if (idle) {
                continue;
            }
        }
        for (int64_t tb = t0; tb < t1; tb += NR_BLOCK) {
            const int nt = (int) std::min<int64_t>(NR_BLOCK, t1 - tb);
            for (int t = 0; t < nt; ++t) {
                nruns[t] = tile_runs(s, (tb + t) * NR, runs[t]);
                if (!bf16) {
                    pack_input(s, src_data, runs[t], nruns[t], k0, kc, (float *) b + t * kc * NR);
                    continue;
                }
#if SFUMATO_BF16_TILE
                pack_input_bf16(s, src_data, runs[t], nruns[t], k0, kc, lda - ROW_PAD,
                                (uint16_t *) b + t * (lda - ROW_PAD) * NR);
#endif
            }
            if (!bf16) {
                for (int64_t pi = 0; pi < n_panels; ++pi) {
                    for (int t = 0; t < nt; ++t) {
                        const float * pa = (const float *) a + pi * MR * lda;
                        const float * pb = (const float *) b + t * kc * NR;
                        output_tile<MR>(s, [&](float * c, int64_t ldc, bool acc, int rows, int cols) {
                            micro_kernel(kc, pa, lda, pb, c, ldc, acc, rows, cols);
                        }, out, oc0 + pi * MR, oc_end, (tb + t) * NR, k0 > 0, fold, last);
                    }
                }
                continue;
            }
#if SFUMATO_BF16_TILE
            const int64_t kp = lda - ROW_PAD;
            const int bm = bf16_rows(mode.amx);
            // This block's weights: kept (rows from 0), or packed just now (rows from oc0).
            const uint16_t * wa = kept.data != nullptr ? kept_block(k0) : (const uint16_t *) a;
            const int64_t wrow0 = kept.data != nullptr ? 0 : oc0;
            for (int64_t oc = oc0; oc < oc_end; oc += bm) {
                for (int t = 0; t < nt; ++t) {
                    const uint16_t * pa = wa + (oc - wrow0) * lda;
                    const uint16_t * pb = (const uint16_t *) b + t * kp * NR;
                    output_tile<BF16_MR>(s, [&](float * c, int64_t ldc, bool acc, int rows, int cols) {
                        bf16_block(mode.amx, kp, pa, lda, pb, c, ldc, acc, std::min(rows, bm), cols);
                    }, out, oc, std::min(oc_end, oc + bm), (tb + t) * NR, k0 > 0, fold, last);
                }
            }
#endif
        }
    }
    if (mode.amx) {
        amx_release();
    }
    return true;
}

}  // namespace

#endif  // SFUMATO_GEMM_TILE

namespace {

// The folded epilogue over the whole output, after ggml's own convolution ran: the
// threads take rows (image, channel) in turn.
void epilogue_after(const ggml_compute_params * params, ggml_tensor * dst, const sfumato::ConvEpilogue & fold) {
    const int64_t plane = dst->ne[0] * dst->ne[1], channels = dst->ne[2];
    float * out = (float *) dst->data;
    for (int64_t row = params->ith; row < channels * dst->ne[3]; row += params->nth) {
        for (int64_t i = row * plane; i < (row + 1) * plane; ++i) {
            if (fold.bias != nullptr) {
                out[i] += fold.bias[row % channels];
            }
            if (fold.residual != nullptr) {
                out[i] += fold.residual[i];
            }
        }
    }
}

}  // namespace

extern "C" void ggml_compute_forward_conv_2d(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
#if SFUMATO_GEMM_TILE
    if (!params->use_ref && sfumato_kernels_enabled() && takes(dst) && conv_2d(params, dst)) {
        return;
    }
#endif
    ggml_compute_forward_conv_2d_ggml(params, dst);
    const sfumato::ConvEpilogue fold = sfumato::conv_epilogue(dst);
    if (fold.any()) {
        ggml_barrier(params->threadpool);  // every thread's part of the convolution is written
        epilogue_after(params, dst, fold);
    }
}
