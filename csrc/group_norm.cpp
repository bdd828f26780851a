/* GROUP_NORM (ggml_group_norm), with what the graph applies after it folded in
 * (csrc/fusion.h): gamma and beta per channel, then silu.
 *
 * Takes: input and output F32, contiguous (so a group of one image, its channels one
 * after another, is one run of memory). Everything else goes to ggml's own function,
 * renamed ggml_compute_forward_group_norm_ggml by the build.
 *
 * Each thread takes (image, group) pairs in turn, as ggml's own takes groups. Per pair:
 * the mean, then the variance as the mean of squared deviations from it (f32 vector sums
 * of blocks, added up in double), then one pass that writes
 *   y = (x - mean) * scale [* gamma[c] + beta[c]],  scale = 1 / sqrt(variance + eps),
 * the steps in the order ggml's norm, MUL and ADD take them, and silu over each block of y
 * while it is in cache (ggml's own vector silu). ggml's own makes three passes, writing
 * twice; the folded MUL, ADD and SILU would each make one more. */
#include "kernels.h"

#include "ggml.h"
#include "ggml-cpu-impl.h"
#include "ops.h"
#include "vec.h"

#include "fusion.h"
#include "gemm_tile.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

extern "C" void ggml_compute_forward_group_norm_ggml(const struct ggml_compute_params * params, struct ggml_tensor * dst);

namespace sfumato {

bool group_norm_takes(const ggml_tensor * norm) {
#if SFUMATO_GEMM_TILE
    const ggml_tensor * src = norm->src[0];
    return src->type == GGML_TYPE_F32 && ggml_is_contiguous(src) && norm->type == GGML_TYPE_F32 &&
           ggml_is_contiguous(norm) && ggml_are_same_shape(src, norm);
#else
    (void) norm;
    return false;
#endif
}

}  // namespace sfumato

#if SFUMATO_GEMM_TILE

namespace {

using namespace sfumato;

constexpr int64_t BLOCK = 1024;  // values per partial sum, and per silu pass

// The sum of x[i] (centred: of (x[i] - mean)^2).
double block_sums(const float * x, int64_t n, bool centred, float mean) {
    double total = 0.0;
    const vf m = vset1(mean);
    for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
        const int64_t len = std::min(BLOCK, n - b0);
        vf acc = vzero();
        int64_t i = 0;
        for (; i + VL <= len; i += VL) {
            const vf v = vload(x + b0 + i);
            if (centred) {
                const vf d = vsub(v, m);
                acc = vfma(d, d, acc);
            } else {
                acc = vadd(acc, v);
            }
        }
        alignas(64) float lanes[VL];
        vstore(lanes, acc);
        double part = 0.0;
        for (int l = 0; l < VL; ++l) {
            part += lanes[l];
        }
        for (; i < len; ++i) {
            const float v = centred ? x[b0 + i] - mean : x[b0 + i];
            part += centred ? (double) (v * v) : (double) v;
        }
        total += part;
    }
    return total;
}

// y = (x - mean) * scale, then * g + b when affine, then silu; n values of one channel.
void normalize(const float * x, float * y, int64_t n, float mean, float scale, bool affine, float g, float b,
               bool silu) {
    const vf m = vset1(mean), s = vset1(scale), vg = vset1(g), vb = vset1(b);
    for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
        const int64_t len = std::min(BLOCK, n - b0);
        int64_t i = b0;
        for (; i + VL <= b0 + len; i += VL) {
            vf v = vmul(vsub(vload(x + i), m), s);
            if (affine) {
                v = vadd(vmul(v, vg), vb);
            }
            vstore(y + i, v);
        }
        for (; i < b0 + len; ++i) {
            float v = (x[i] - mean) * scale;
            y[i] = affine ? v * g + b : v;
        }
        if (silu) {
            ggml_vec_silu_f32((int) len, y + b0, y + b0);
        }
    }
}

void group_norm(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * src = dst->src[0];
    const NormEpilogue fold = norm_epilogue(dst);
    float eps;
    std::memcpy(&eps, dst->op_params + 1, sizeof(float));
    const int64_t plane = src->ne[0] * src->ne[1], channels = src->ne[2], images = src->ne[3];
    const int64_t groups = dst->op_params[0];
    const int64_t per_group = (channels + groups - 1) / groups;
    for (int64_t task = params->ith; task < images * groups; task += params->nth) {
        const int64_t image = task / groups, c0 = (task % groups) * per_group;
        const int64_t c1 = std::min(channels, c0 + per_group);
        if (c0 >= c1) {
            continue;
        }
        const int64_t offset = (image * channels + c0) * plane, n = (c1 - c0) * plane;
        const float * x = (const float *) src->data + offset;
        float * y = (float *) dst->data + offset;
        const float mean = (float) (block_sums(x, n, false, 0.0f) / (double) n);
        const float variance = (float) (block_sums(x, n, true, mean) / (double) n);
        const float scale = 1.0f / std::sqrt(variance + eps);
        const bool affine = fold.gamma != nullptr;
        for (int64_t c = c0; c < c1; ++c) {
            const int64_t at = (c - c0) * plane;
            normalize(x + at, y + at, plane, mean, scale, affine, affine ? fold.gamma[c] : 1.0f,
                      affine ? fold.beta[c] : 0.0f, fold.silu);
        }
    }
}

}  // namespace

#endif  // SFUMATO_GEMM_TILE

extern "C" void ggml_compute_forward_group_norm(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
#if SFUMATO_GEMM_TILE
    if (!params->use_ref && sfumato_kernels_enabled() && sfumato::group_norm_takes(dst)) {
        group_norm(params, dst);
        return;
    }
#endif
    ggml_compute_forward_group_norm_ggml(params, dst);
}
