/* Kept weights (csrc/kept_weights.h). */
#include "kept_weights.h"
#include "kernels.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include <sys/mman.h>

namespace sfumato {

namespace {

// Kept copies are mappings of their own, outside malloc's heap: hundreds of MB there
// would keep the heap from handing freed compute buffers to the next graph.
void * map_bytes(size_t bytes) {
    void * p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
}

struct Entry {
    Entry() = default;
    Entry(const Entry &) = delete;
    Entry & operator=(const Entry &) = delete;
    ~Entry() {
        if (data != nullptr) {
            munmap(data, bytes);
        }
    }
    void * data = nullptr;
    size_t bytes = 0;
    int64_t layout = 0;
    uint64_t guard = 0;
    int pending = 0;  // threads of the filling operation yet to be told
};

std::mutex g_mutex;
std::unordered_map<const void *, Entry> g_kept;  // by the weights' data address
size_t g_bytes = 0;

uint64_t mix(uint64_t h, uint64_t x) {
    h ^= x + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h;
}

// The tensor's type and shape, and 64 of its 8-byte words spread across it.
uint64_t guard_of(const ggml_tensor * w) {
    uint64_t h = mix(0, (uint64_t) w->type);
    for (int i = 0; i < GGML_MAX_DIMS; ++i) {
        h = mix(h, (uint64_t) w->ne[i]);
    }
    const size_t bytes = ggml_nbytes(w);
    if (bytes < sizeof(uint64_t)) {
        return h;
    }
    constexpr int SAMPLES = 64;
    for (int i = 0; i < SAMPLES; ++i) {
        uint64_t word = 0;
        std::memcpy(&word, (const char *) w->data + (bytes - sizeof(word)) * i / (SAMPLES - 1), sizeof(word));
        h = mix(h, word);
    }
    return h;
}

bool keepable(const ggml_tensor * w) {
    static const bool on = [] {
        const char * v = std::getenv("SFUMATO_KEEP_WEIGHTS");
        return v == nullptr || std::strcmp(v, "0") != 0;
    }();
    return on && w->op == GGML_OP_NONE && w->view_src == nullptr && w->buffer != nullptr && ggml_is_contiguous(w) &&
           ggml_backend_buffer_get_usage(w->buffer) == GGML_BACKEND_BUFFER_USAGE_WEIGHTS;
}

void drop(std::unordered_map<const void *, Entry>::iterator it) {
    g_bytes -= it->second.bytes;
    g_kept.erase(it);
}

}  // namespace

Kept kept_copy(const ggml_tensor * w, size_t bytes, int64_t layout, int nth) {
    if (!keepable(w)) {
        return {};
    }
    const uint64_t guard = guard_of(w);
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_kept.find(w->data);
    if (it != g_kept.end() && it->second.pending == 0 &&
        (it->second.guard != guard || it->second.bytes != bytes || it->second.layout != layout)) {
        drop(it);
        it = g_kept.end();
    }
    if (it == g_kept.end()) {
        if (g_bytes + bytes > KEPT_MAX_BYTES) {
            return {};  // the same answer for every thread of this operation: g_bytes did not move
        }
        // Where the mapping fails the entry stays empty: this operation's threads pack as
        // before, and the next call tries again (its size no longer matches).
        void * data = map_bytes(bytes);
        Entry & e = g_kept[w->data];
        e.data = data;
        e.bytes = data != nullptr ? bytes : 0;
        e.layout = layout;
        e.guard = guard;
        e.pending = nth;
        g_bytes += e.bytes;
        it = g_kept.find(w->data);
    }
    Entry & e = it->second;
    const bool fill = e.pending > 0 && e.data != nullptr;
    if (e.pending > 0) {
        --e.pending;
    }
    return {e.data, fill};
}

void forget_written(const ggml_cgraph * graph) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_kept.empty()) {
        return;
    }
    for (int i = 0; i < ggml_graph_n_nodes(const_cast<ggml_cgraph *>(graph)); ++i) {
        const ggml_tensor * node = ggml_graph_node(const_cast<ggml_cgraph *>(graph), i);
        if (node->op == GGML_OP_NONE || node->op == GGML_OP_VIEW || node->op == GGML_OP_RESHAPE ||
            node->op == GGML_OP_PERMUTE || node->op == GGML_OP_TRANSPOSE) {
            continue;  // these write nothing
        }
        for (const ggml_tensor * t : {node, (const ggml_tensor *) node->view_src}) {
            if (t == nullptr) {
                continue;
            }
            auto it = g_kept.find(t->data);
            if (it != g_kept.end()) {
                drop(it);
            }
        }
    }
}

}  // namespace sfumato

extern "C" size_t sfumato_kept_bytes(void) {
    std::lock_guard<std::mutex> lock(sfumato::g_mutex);
    return sfumato::g_bytes;
}
