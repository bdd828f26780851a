/* ggml_graph_compute, the CPU backend's entry for running a graph: sfumato's function of
 * that name adds a process-wide cancel request to the graph's abort callback, then runs
 * ggml's own (renamed ggml_graph_compute_ggml by the build). ggml checks the callback
 * between two operations of the graph, so a request set from any thread stops the
 * running graph within one operation; the engine then fails the generation (sampling,
 * decoding) and returns, its model still loaded. A model runs in a process of its own,
 * so one flag per process serves. The request stays set until it is cleared: every graph
 * started meanwhile stops at its first operation. It also sets up the graph's folds
 * (csrc/fusion.h) while the graph runs, and drops the kept bf16 weights the graph writes
 * to (csrc/kept_weights.h). */
#include "fusion.h"
#include "kept_weights.h"
#include "kernels.h"

#include "ggml.h"
#include "ggml-cpu.h"

#include <atomic>
#include <optional>

extern "C" enum ggml_status ggml_graph_compute_ggml(struct ggml_cgraph * cgraph, struct ggml_cplan * cplan);

namespace {

std::atomic<int> g_cancel{0};

// The callback the graph ran with before, which still decides too.
struct Chained {
    ggml_abort_callback callback;
    void * data;
};

bool cancel_requested(void * data) {
    const Chained * chained = static_cast<const Chained *>(data);
    if (g_cancel.load(std::memory_order_relaxed) != 0) {
        return true;
    }
    return chained->callback != nullptr && chained->callback(chained->data);
}

}  // namespace

extern "C" void sfumato_cancel_set(int requested) { g_cancel.store(requested ? 1 : 0, std::memory_order_relaxed); }

extern "C" enum ggml_status ggml_graph_compute(struct ggml_cgraph * cgraph, struct ggml_cplan * cplan) {
    std::optional<sfumato::Folds> folds;
    if (!cplan->use_ref) {
        folds.emplace(cgraph);
    }
    sfumato::forget_written(cgraph);
    Chained chained{cplan->abort_callback, cplan->abort_callback_data};
    cplan->abort_callback = cancel_requested;
    cplan->abort_callback_data = &chained;
    const enum ggml_status status = ggml_graph_compute_ggml(cgraph, cplan);
    cplan->abort_callback = chained.callback;
    cplan->abort_callback_data = chained.data;
    return status;
}
