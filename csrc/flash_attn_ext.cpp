/* FLASH_ATTN_EXT (the engine's flash-attention graph): softmax(scale * Q K^T + mask) V
 * without the score matrix of a whole head ever reaching memory.
 *
 * Takes: q [D, Lq, H, N] F32 (rows contiguous), k [D, Lk, Hk, Nk] and v [Dv, Lk, Hv, Nv]
 * F16, BF16 or F32 (rows contiguous; heads and batches broadcast as ggml's own does),
 * an optional F16 mask [Lk, >= Lq, Hm, Nm] (added to the scaled scores, broadcast over
 * heads and batches), no ALiBi bias, no logit soft-cap, no attention sinks; output
 * [Dv, H, Lq, N] F32, contiguous. Everything else goes to ggml's own function, renamed
 * ggml_compute_forward_flash_attn_ext_ggml by the build.
 *
 * The work is cut into blocks of NR queries of one head. Each thread takes a run of
 * blocks; for each head it meets, it widens K to f32 rows and V to f32 columns (V^T),
 * once. A block then runs as two GEMMs on the register tile of gemm_tile.h, with the
 * scores of its queries against every key (Lk x NR floats, a few hundred KB: in the
 * core's L2) in between:
 *   S^T = K Q^T            (the queries packed as the tile's vector operand, scale folded in)
 *   P^T = exp(S^T - max)   (per query: a column of S^T, NR queries in vector lanes)
 *   O^T = V^T P^T          (S^T is already laid out as the tile's packed operand)
 * and each output row is O^T's column divided by its query's sum. The whole row of
 * scores is at hand, so the softmax needs no running rescale. Products and sums are f32;
 * exp is a degree-6 polynomial after range reduction (relative error about 2e-7). In the
 * bf16 mode (a module with AVX512-BF16, SFUMATO_PRECISION=bf16) both GEMMs run on the bf16
 * tile: K, V, the scaled queries and P rounded to bf16 (P before it is summed, so each
 * query's weights still sum to one), products exact and sums f32; P's exp is 2^x by a
 * degree-4 polynomial there (vexp2_bf16), as its values keep 8-bit mantissas only. */
#include "kernels.h"

#include "ggml.h"
#include "ggml-cpu-impl.h"
#include "ops.h"

#include "gemm_tile.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" void ggml_compute_forward_flash_attn_ext_ggml(const struct ggml_compute_params * params,
                                                         struct ggml_tensor * dst);

#if SFUMATO_GEMM_TILE

namespace {

using namespace sfumato;

constexpr int64_t ROW_PAD = 16;  // floats after each V^T row (rows a power of two apart share cache sets)

#if defined(__AVX512F__)
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
constexpr float EXP_FLOOR = -104.0f;  // e^x is 0 in f32 below this (scalef flushes it)
inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT); }
inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
#else
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
constexpr float EXP_FLOOR = -87.0f;  // 2^n stays a normal float
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vscale2(vf p, vf n) {  // p * 2^n, n a whole number in [-126, 127]
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

// e^x for x <= 0 (scores minus their maximum): x = n ln2 + r with |r| <= ln2/2 (ln2 in
// two parts), e^r by its Taylor polynomial of degree 6, times 2^n.
inline vf vexp(vf x) {
    x = vmax(x, vset1(EXP_FLOOR));
    const vf n = vround(vmul(x, vset1(1.44269504f)));
    vf r = vfma(n, vset1(-0.693145751953125f), x);
    r = vfma(n, vset1(-1.428606765330187e-06f), r);
    vf p = vset1(1.0f / 720);
    for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
        p = vfma(p, r, vset1(c));
    }
    return vscale2(p, n);
}

constexpr int MAX_CHAINS = 4;  // independent running maxima: vmax's latency, not its rate, bounds one

#if SFUMATO_BF16_TILE
constexpr float LOG2E = 1.44269504f;

// 2^t for t <= 0, as the bf16 mode's softmax needs it (its weights are rounded to 8-bit
// mantissas next): t = n + r with |r| <= 1/2, 2^r by a degree-4 polynomial fitted to its
// relative error on [-1/2, 1/2] (2.7e-6 at most), times 2^n. Below -160 it is 0.
inline vf vexp2_bf16(vf t) {
    t = vmax(t, vset1(-160.0f));
    const vf n = vround(t);
    const vf r = vsub(t, n);
    vf p = vset1(0.009570101f);
    for (const float c : {0.05591786f, 0.24024744f, 0.69312179f, 0.99999928f}) {
        p = vfma(p, r, vset1(c));
    }
    return vscale2(p, n);
}
#endif

struct Attention {
    ggml_tensor * dst;
    const ggml_tensor *q, *k, *v, *mask;
    int64_t d, dv, lq, lk, heads, batch;
    float scale;
};

bool takes(const ggml_tensor * dst) {
    const ggml_tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2], *mask = dst->src[3];
    float max_bias = 0.0f, softcap = 0.0f;
    std::memcpy(&max_bias, (const float *) dst->op_params + 1, sizeof(float));
    std::memcpy(&softcap, (const float *) dst->op_params + 2, sizeof(float));
    auto rows_of = [](const ggml_tensor * t) {
        return (t->type == GGML_TYPE_F16 || t->type == GGML_TYPE_BF16 || t->type == GGML_TYPE_F32) &&
               t->nb[0] == ggml_type_size(t->type);
    };
    return dst->src[4] == nullptr && max_bias == 0.0f && softcap == 0.0f && q->type == GGML_TYPE_F32 &&
           q->nb[0] == sizeof(float) && rows_of(k) && rows_of(v) && k->ne[0] == q->ne[0] && v->ne[1] == k->ne[1] &&
           q->ne[2] % k->ne[2] == 0 && q->ne[2] % v->ne[2] == 0 && q->ne[3] % k->ne[3] == 0 &&
           q->ne[3] % v->ne[3] == 0 && (mask == nullptr || (mask->type == GGML_TYPE_F16 && mask->ne[0] >= k->ne[1] &&
                                                          mask->ne[1] >= q->ne[1])) &&
           dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst) && dst->ne[0] == v->ne[0] &&
           dst->ne[1] == q->ne[2] && dst->ne[2] == q->ne[1] && dst->ne[3] == q->ne[3];
}

// One thread's buffers, kept for the next op (ggml's threads live as long as its pool).
struct Scratch {
    std::vector<float> k, vt, qt, st, ot, row;
    std::vector<uint16_t> k16, vt16, qt16, st16;  // the bf16 mode's operands
    int64_t head = -1, batch = -1;                // whose K and V^T the buffers hold
    bool bf16 = false, amx = false;               // the bf16 mode, on AMX's tiles
};
thread_local Scratch t_scratch;

// K of (head h, batch n) as f32 rows [lk][d], and V as f32 columns [dv][lk + ROW_PAD].
void widen_head(const Attention & a, int64_t h, int64_t n, Scratch & s) {
    const int64_t hk = h / (a.heads / a.k->ne[2]), nk = n / (a.batch / a.k->ne[3]);
    const int64_t hv = h / (a.heads / a.v->ne[2]), nv = n / (a.batch / a.v->ne[3]);
    const int64_t ldv = a.lk + ROW_PAD;
    // MR rows more of each: the tile reads whole panels of MR rows (and drops the extra).
    s.k.resize((a.lk + MR) * a.d);
    s.vt.resize((a.dv + MR) * ldv);
    s.row.resize(a.dv);
    for (int64_t j = 0; j < a.lk; ++j) {
        const char * krow = (const char *) a.k->data + j * a.k->nb[1] + hk * a.k->nb[2] + nk * a.k->nb[3];
        widen(a.k->type, krow, s.k.data() + j * a.d, a.d);
        const char * vrow = (const char *) a.v->data + j * a.v->nb[1] + hv * a.v->nb[2] + nv * a.v->nb[3];
        widen(a.v->type, vrow, s.row.data(), a.dv);
        for (int64_t c = 0; c < a.dv; ++c) {
            s.vt[c * ldv + j] = s.row[c];
        }
    }
#if SFUMATO_BF16_TILE
    if (!s.bf16) {
        return;
    }
    // The bf16 mode: the same rows rounded to bf16, each as long as the tile takes k at a
    // time (bf16_k: pairs, or AMX's 32; zeros appended), a block of rows more of zeros.
    const int64_t ldk = bf16_k(a.d, s.amx), ldv16 = bf16_k(a.lk, s.amx) + ROW_PAD;
    s.k16.assign((a.lk + BF16_MR) * ldk, 0);
    s.vt16.assign((a.dv + BF16_MR) * ldv16, 0);
    for (int64_t j = 0; j < a.lk; ++j) {
        f32_to_bf16(s.k.data() + j * a.d, s.k16.data() + j * ldk, a.d);
    }
    for (int64_t c = 0; c < a.dv; ++c) {
        f32_to_bf16(s.vt.data() + c * ldv, s.vt16.data() + c * ldv16, a.lk);
    }
#endif
}

// The mask's row for query q of (head h, batch n).
const ggml_fp16_t * mask_row(const Attention & a, int64_t h, int64_t n, int64_t q) {
    return (const ggml_fp16_t *) ((const char *) a.mask->data + q * a.mask->nb[1] + (h % a.mask->ne[2]) * a.mask->nb[2] +
                                  (n % a.mask->ne[3]) * a.mask->nb[3]);
}

// The NR queries from q0 of (head h, batch n) into their output rows.
void block(const Attention & a, int64_t h, int64_t n, int64_t q0, Scratch & s) {
    const int64_t nq = std::min<int64_t>(NR, a.lq - q0);
    const int64_t ldv = a.lk + ROW_PAD;
    // The keys any of these queries may see: the engine pads keys to a multiple of 256
    // and masks the padding out with -inf (f16 0xFC00), which is skipped here.
    int64_t lk = a.lk;
    if (a.mask != nullptr) {
        lk = 0;
        for (int64_t j = 0; j < nq; ++j) {
            const ggml_fp16_t * m = mask_row(a, h, n, q0 + j);
            int64_t last = a.lk;
            while (last > lk && m[last - 1] == 0xFC00) {
                --last;
            }
            lk = std::max(lk, last);
        }
    }
    // Q^T, scaled: [d][NR], zeros past the last query.
    s.qt.assign(a.d * NR, 0.0f);
    for (int64_t j = 0; j < nq; ++j) {
        const float * qrow = (const float *) ((const char *) a.q->data + (q0 + j) * a.q->nb[1] + h * a.q->nb[2] +
                                              n * a.q->nb[3]);
        for (int64_t c = 0; c < a.d; ++c) {
            s.qt[c * NR + j] = qrow[c] * a.scale;
        }
    }
    // S^T = K Q^T: [lk][NR].
    s.st.resize(a.lk * NR);
    if (!s.bf16) {
        for (int64_t j0 = 0; j0 < lk; j0 += MR) {
            const int rows = (int) std::min<int64_t>(MR, lk - j0);
            micro_kernel(a.d, s.k.data() + j0 * a.d, a.d, s.qt.data(), s.st.data() + j0 * NR, NR, false, rows, NR);
        }
    }
#if SFUMATO_BF16_TILE
    if (s.bf16) {
        const int64_t ldk = bf16_k(a.d, s.amx);
        const int bm = bf16_rows(s.amx);
        s.qt16.resize(ldk * NR);
        pair_rows_bf16(s.qt.data(), a.d, s.qt16.data(), ldk);
        for (int64_t j0 = 0; j0 < lk; j0 += bm) {
            const int rows = (int) std::min<int64_t>(bm, lk - j0);
            bf16_block(s.amx, ldk, s.k16.data() + j0 * ldk, ldk, s.qt16.data(), s.st.data() + j0 * NR, NR, false, rows,
                       NR);
        }
    }
#endif
    if (a.mask != nullptr) {
        for (int64_t j = 0; j < nq; ++j) {
            const ggml_fp16_t * m = mask_row(a, h, n, q0 + j);
            for (int64_t key = 0; key < lk; ++key) {
                s.st[key * NR + j] += _cvtsh_ss(m[key]);
            }
        }
    }
    // Per query: its maximum over the keys (MAX_CHAINS keys at a time, in chains of their
    // own), then e^(s - max) in place, and the sum.
    vf hi[NV], sum[NV];
    {
        vf chain[MAX_CHAINS][NV];
        for (auto & c : chain) {
            for (vf & x : c) {
                x = vset1(-INFINITY);
            }
        }
        int64_t key = 0;
        for (; key + MAX_CHAINS <= lk; key += MAX_CHAINS) {
            for (int u = 0; u < MAX_CHAINS; ++u) {
                for (int v = 0; v < NV; ++v) {
                    chain[u][v] = vmax(chain[u][v], vload(s.st.data() + (key + u) * NR + v * VL));
                }
            }
        }
        for (; key < lk; ++key) {
            for (int v = 0; v < NV; ++v) {
                chain[0][v] = vmax(chain[0][v], vload(s.st.data() + key * NR + v * VL));
            }
        }
        for (int v = 0; v < NV; ++v) {
            hi[v] = chain[0][v];
            for (int u = 1; u < MAX_CHAINS; ++u) {
                hi[v] = vmax(hi[v], chain[u][v]);
            }
            sum[v] = vzero();
        }
    }
    for (int v = 0; v < NV; ++v) {  // a query every key of which is masked out: its row becomes 0
        alignas(64) float lanes[VL];
        vstore(lanes, hi[v]);
        for (float & x : lanes) {
            x = std::isinf(x) ? 0.0f : x;
        }
        hi[v] = vload(lanes);
    }
    if (!s.bf16) {
        for (int64_t key = 0; key < lk; ++key) {
            for (int v = 0; v < NV; ++v) {
                float * p = s.st.data() + key * NR + v * VL;
                const vf e = vexp(vsub(vload(p), hi[v]));
                vstore(p, e);
                sum[v] = vadd(sum[v], e);
            }
        }
    }
#if SFUMATO_BF16_TILE
    // The bf16 mode: each pair of keys' weights, 2^((s - max) log2 e), rounded to bf16
    // straight into P^T's paired layout (pair_rows_bf16's), zeros past lk, and summed as
    // the product sees them.
    const int64_t kp = bf16_k(lk, s.amx);
    if (s.bf16) {
        s.st16.resize(kp * NR);
        vf top[NV];
        for (int v = 0; v < NV; ++v) {
            top[v] = vmul(hi[v], vset1(LOG2E));
        }
        auto weight = [&](int64_t key, int v) {
            return vexp2_bf16(_mm512_fmsub_ps(vload(s.st.data() + key * NR + v * VL), vset1(LOG2E), top[v]));
        };
        int64_t key = 0;
        for (; key + 2 <= lk; key += 2) {
            for (int v = 0; v < NV; ++v) {
                uint16_t * out = s.st16.data() + key * NR + v * 2 * VL;
                sum[v] = add_pairs_bf16(sum[v], store_pair_bf16(weight(key, v), weight(key + 1, v), out));
            }
        }
        if (key < lk) {  // an odd last key, paired with a zero
            for (int v = 0; v < NV; ++v) {
                uint16_t * out = s.st16.data() + key * NR + v * 2 * VL;
                sum[v] = add_pairs_bf16(sum[v], store_pair_bf16(weight(key, v), vzero(), out));
            }
            key += 2;
        }
        std::memset(s.st16.data() + key * NR, 0, sizeof(uint16_t) * (kp - key) * NR);
    }
#endif
    // O^T = V^T P^T: [dv][NR], then each query's column over its sum into its output row.
    s.ot.resize(a.dv * NR);
    if (!s.bf16) {
        for (int64_t c0 = 0; c0 < a.dv; c0 += MR) {
            const int rows = (int) std::min<int64_t>(MR, a.dv - c0);
            micro_kernel(lk, s.vt.data() + c0 * ldv, ldv, s.st.data(), s.ot.data() + c0 * NR, NR, false, rows, NR);
        }
    }
#if SFUMATO_BF16_TILE
    if (s.bf16) {
        const int64_t ldv16 = bf16_k(a.lk, s.amx) + ROW_PAD;
        const int bm = bf16_rows(s.amx);
        for (int64_t c0 = 0; c0 < a.dv; c0 += bm) {
            const int rows = (int) std::min<int64_t>(bm, a.dv - c0);
            bf16_block(s.amx, kp, s.vt16.data() + c0 * ldv16, ldv16, s.st16.data(), s.ot.data() + c0 * NR, NR, false,
                       rows, NR);
        }
    }
#endif
    alignas(64) float total[NR];
    for (int v = 0; v < NV; ++v) {
        vstore(total + v * VL, sum[v]);
    }
    for (int64_t j = 0; j < nq; ++j) {
        const float inv = total[j] > 0.0f ? 1.0f / total[j] : 0.0f;
        float * out = (float *) a.dst->data + ((n * a.lq + q0 + j) * a.heads + h) * a.dv;
        for (int64_t c = 0; c < a.dv; ++c) {
            out[c] = s.ot[c * NR + j] * inv;
        }
    }
}

void flash_attn(const ggml_compute_params * params, ggml_tensor * dst) {
    Attention a{};
    a.dst = dst;
    a.q = dst->src[0];
    a.k = dst->src[1];
    a.v = dst->src[2];
    a.mask = dst->src[3];
    a.d = a.q->ne[0];
    a.dv = a.v->ne[0];
    a.lq = a.q->ne[1];
    a.lk = a.k->ne[1];
    a.heads = a.q->ne[2];
    a.batch = a.q->ne[3];
    std::memcpy(&a.scale, (const float *) dst->op_params + 0, sizeof(float));
    // Blocks of NR queries, head by head; each thread a run of them.
    const int64_t per_head = (a.lq + NR - 1) / NR;
    const int64_t blocks = per_head * a.heads * a.batch;
    const int64_t b0 = blocks * params->ith / params->nth, b1 = blocks * (params->ith + 1) / params->nth;
    Scratch & s = t_scratch;
    s.head = -1;  // a new op: whatever the buffers hold is another op's
#if SFUMATO_BF16_TILE
    s.bf16 = sfumato_bf16_enabled() != 0;
    s.amx = s.bf16 && amx_ready();
#endif
    if (s.amx) {
        amx_configure();
    }
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t hn = b / per_head, h = hn % a.heads, n = hn / a.heads;
        if (h != s.head || n != s.batch) {
            widen_head(a, h, n, s);
            s.head = h;
            s.batch = n;
        }
        block(a, h, n, (b % per_head) * NR, s);
    }
    if (s.amx) {
        amx_release();
    }
}

}  // namespace

#endif  // SFUMATO_GEMM_TILE

extern "C" void ggml_compute_forward_flash_attn_ext(const struct ggml_compute_params * params,
                                                    struct ggml_tensor * dst) {
#if SFUMATO_GEMM_TILE
    if (!params->use_ref && sfumato_kernels_enabled() && takes(dst)) {
        flash_attn(params, dst);
        return;
    }
#endif
    ggml_compute_forward_flash_attn_ext_ggml(params, dst);
}
