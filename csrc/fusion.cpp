/* Folds (csrc/fusion.h): finding the chains, and the records their first nodes carry. */
#include "fusion.h"

#include "gemm_tile.h"
#include "kernels.h"

#include "ggml.h"
#include "ggml-impl.h"

#include <atomic>
#include <cstring>

namespace {

std::atomic<int> g_folds{1};
std::atomic<int> g_last{0};  // nodes the last graph passed

// The record's place: the last 8 of op_params' 16 int32 (CONV_2D uses 6, GROUP_NORM 2).
constexpr int SLOT = 8;
constexpr uint32_t CONV = 0x53463143;  // tags: which record the slot holds
constexpr uint32_t NORM = 0x5346314e;

struct Record {
    uint32_t kind;
    uint32_t flags;  // NORM: 1 = silu
    const void * p[2];
};
static_assert(sizeof(Record) <= sizeof(int32_t) * (GGML_MAX_OP_PARAMS / sizeof(int32_t) - SLOT), "op_params' tail");

bool read_record(const ggml_tensor * node, uint32_t kind, Record * record) {
    std::memcpy(record, node->op_params + SLOT, sizeof(Record));
    return record->kind == kind;
}

bool is_f32_contiguous(const ggml_tensor * t) { return t->type == GGML_TYPE_F32 && ggml_is_contiguous(t); }

// The next node after i that computes anything; -1 at the end or past one not computed.
int next_op(const ggml_cgraph * graph, int i) {
    for (int j = i + 1; j < graph->n_nodes; ++j) {
        const ggml_tensor * node = graph->nodes[j];
        if (ggml_op_is_empty(node->op)) {
            continue;
        }
        return (node->flags & GGML_TENSOR_FLAG_COMPUTE) != 0 ? j : -1;
    }
    return -1;
}

bool overlaps(const ggml_tensor * a, const ggml_tensor * b) {
    const char * a0 = (const char *) a->data;
    const char * b0 = (const char *) b->data;
    return a0 < b0 + ggml_nbytes(b) && b0 < a0 + ggml_nbytes(a);
}

// The node at j, when it is `op` applied in place of `first`'s memory to `prev` (as its
// src[0], or either source when `either`), with the same shape; its other source in *other.
ggml_tensor * in_place(const ggml_cgraph * graph, int j, ggml_op op, const ggml_tensor * first, const ggml_tensor * prev,
                       bool either, const ggml_tensor ** other) {
    if (j < 0) {
        return nullptr;
    }
    ggml_tensor * node = graph->nodes[j];
    if (node->op != op || node->data != first->data || !ggml_are_same_shape(node, first) || !is_f32_contiguous(node)) {
        return nullptr;
    }
    if (node->src[0] == prev) {
        *other = node->src[1];
    } else if (either && node->src[1] == prev) {
        *other = node->src[0];
    } else {
        return nullptr;
    }
    return node;
}

// A per-channel vector [1, 1, C, 1] of f32 apart from `out`'s memory.
bool per_channel(const ggml_tensor * t, int64_t channels, const ggml_tensor * out) {
    return t != nullptr && is_f32_contiguous(t) && t->ne[0] == 1 && t->ne[1] == 1 && t->ne[2] == channels &&
           t->ne[3] == 1 && !overlaps(t, out);
}

}  // namespace

namespace sfumato {

ConvEpilogue conv_epilogue(const ggml_tensor * conv) {
    Record r{};
    if (!read_record(conv, CONV, &r)) {
        return {};
    }
    return {(const float *) r.p[0], (const float *) r.p[1]};
}

NormEpilogue norm_epilogue(const ggml_tensor * norm) {
    Record r{};
    if (!read_record(norm, NORM, &r)) {
        return {};
    }
    return {(const float *) r.p[0], (const float *) r.p[1], (r.flags & 1) != 0};
}

void Folds::carry(ggml_tensor * node, uint32_t kind, uint32_t flags, const void * p0, const void * p1) {
    Carrier c{node, {}};
    std::memcpy(c.saved, node->op_params + SLOT, sizeof(c.saved));
    carriers_.push_back(c);
    const Record r{kind, flags, {p0, p1}};
    std::memcpy(node->op_params + SLOT, &r, sizeof(r));
}

void Folds::pass(ggml_tensor * node) {
    node->flags &= ~GGML_TENSOR_FLAG_COMPUTE;
    passed_.push_back(node);
}

Folds::Folds(ggml_cgraph * graph) {
    g_last.store(0, std::memory_order_relaxed);
    if (!SFUMATO_GEMM_TILE || !sfumato_kernels_enabled() || !sfumato_folds_enabled()) {
        return;
    }
    for (int i = 0; i < graph->n_nodes; ++i) {
        ggml_tensor * first = graph->nodes[i];
        if ((first->flags & GGML_TENSOR_FLAG_COMPUTE) == 0) {
            continue;
        }
        if (first->op == GGML_OP_CONV_2D && is_f32_contiguous(first)) {
            const ggml_tensor * bias = nullptr;
            const int j = next_op(graph, i);
            ggml_tensor * add = in_place(graph, j, GGML_OP_ADD, first, first, false, &bias);
            if (add == nullptr || !per_channel(bias, first->ne[2], first)) {
                continue;
            }
            const ggml_tensor * residual = nullptr;
            ggml_tensor * skip = in_place(graph, next_op(graph, j), GGML_OP_ADD, first, add, true, &residual);
            if (skip != nullptr && (!is_f32_contiguous(residual) || !ggml_are_same_shape(residual, first) ||
                                    overlaps(residual, first))) {
                skip = nullptr;
            }
            carry(first, CONV, 0, bias->data, skip != nullptr ? residual->data : nullptr);
            pass(add);
            if (skip != nullptr) {
                pass(skip);
            }
        } else if (first->op == GGML_OP_GROUP_NORM && group_norm_takes(first)) {
            const int64_t channels = first->ne[2];
            const ggml_tensor * gamma = nullptr;
            const ggml_tensor * beta = nullptr;
            const ggml_tensor * none = nullptr;
            const int j = next_op(graph, i);
            int after = j;  // the node after the affine part (if any)
            ggml_tensor * mul = in_place(graph, j, GGML_OP_MUL, first, first, false, &gamma);
            ggml_tensor * add = nullptr;
            if (mul != nullptr && per_channel(gamma, channels, first)) {
                const int k = next_op(graph, j);
                add = in_place(graph, k, GGML_OP_ADD, first, mul, false, &beta);
                if (add != nullptr && per_channel(beta, channels, first)) {
                    after = next_op(graph, k);
                } else {
                    add = nullptr;
                }
            }
            ggml_tensor * silu = in_place(graph, after, GGML_OP_UNARY, first, add != nullptr ? add : first, false, &none);
            if (silu != nullptr && ggml_get_unary_op(silu) != GGML_UNARY_OP_SILU) {
                silu = nullptr;
            }
            if (add == nullptr && silu == nullptr) {
                continue;
            }
            carry(first, NORM, silu != nullptr ? 1u : 0u, add != nullptr ? gamma->data : nullptr,
                  add != nullptr ? beta->data : nullptr);
            if (add != nullptr) {
                pass(mul);
                pass(add);
            }
            if (silu != nullptr) {
                pass(silu);
            }
        }
    }
}

Folds::~Folds() {
    g_last.store((int) passed_.size(), std::memory_order_relaxed);
    for (const Carrier & c : carriers_) {
        std::memcpy(c.node->op_params + SLOT, c.saved, sizeof(c.saved));
    }
    for (ggml_tensor * node : passed_) {
        node->flags |= GGML_TENSOR_FLAG_COMPUTE;
    }
}

}  // namespace sfumato

extern "C" int sfumato_folds_enabled(void) { return g_folds.load(std::memory_order_relaxed); }

extern "C" void sfumato_folds_set_enabled(int enabled) { g_folds.store(enabled ? 1 : 0, std::memory_order_relaxed); }

extern "C" int sfumato_folds_last(void) { return g_last.load(std::memory_order_relaxed); }
