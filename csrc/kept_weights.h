/* Kept weights: in the bf16 mode, a convolution's weights rounded to bf16 once and kept
 * for every later call, instead of converted from the engine's f16 on every call (the
 * engine stores convolution weights as f16 whatever the model's type). The copy holds
 * every block of k as the convolution packs one into its work buffer, one after another,
 * so the products read it exactly as they read a fresh packing.
 *
 * Only a graph's leaf in a buffer the engine marks as weights (ggml's
 * GGML_BACKEND_BUFFER_USAGE_WEIGHTS: the model's parameters) is kept, by its data
 * address. A kept copy is dropped and made again
 *   - when a graph writes to that address (csrc/graph_compute.cpp: a LoRA applied into
 *     the weights), and
 *   - when the tensor no longer matches the copy's guard: its type, shape, and a sample
 *     of 64 of its 8-byte words across the whole tensor (other weights loaded where
 *     freed ones were).
 * The copies are anonymous mappings of their own (not malloc's heap), and those of one
 * process stay under KEPT_MAX_BYTES; past that, a convolution packs its weights on each
 * call as before. SFUMATO_KEEP_WEIGHTS=0 (read once) keeps none.
 *
 * Every thread of an operation calls kept_copy once. The first call for a tensor (or the
 * first after its copy was dropped) returns fill = true to all the operation's threads:
 * each then packs its share into it, as it would pack its work buffer, and they meet at a
 * barrier. */
#pragma once

#include "ggml.h"

#include <cstddef>
#include <cstdint>

namespace sfumato {

constexpr size_t KEPT_MAX_BYTES = size_t(8) << 30;

struct Kept {
    void * data = nullptr;  // `bytes` bytes laid out as the caller packs them; nullptr: not kept
    bool fill = false;      // this operation's threads fill it, each a share, then meet at a barrier
};

// The kept copy of `w`: `bytes` bytes in the caller's layout `layout` (a copy in another
// layout is dropped), for one of the operation's nth threads.
Kept kept_copy(const ggml_tensor * w, size_t bytes, int64_t layout, int nth);

// Drops the copies of whatever the graph's nodes write (views and reshapes write nothing).
void forget_written(const ggml_cgraph * graph);

}  // namespace sfumato
