/* Folds: the element-wise operations that follow a convolution or a group norm in the
 * engine's graphs, applied by that operation's kernel while its output is in cache
 * instead of as passes of their own over the whole tensor.
 *
 * Before a graph runs (csrc/graph_compute.cpp), `Folds` looks for these chains of nodes,
 * each node the next one that computes anything (only views and reshapes between):
 *   CONV_2D -> ADD in place of a bias [1, 1, OC, 1] -> ADD in place of a residual of the
 *   output's shape (optional): the engine's convolution with its bias (ggml_ext_conv_2d),
 *   and a ResNet block's second convolution with its skip;
 *   GROUP_NORM -> MUL in place by gamma [1, 1, C, 1] -> ADD in place of beta (optional,
 *   both or neither) -> SILU in place (optional): ggml_ext_group_norm, and the norm with
 *   its activation that opens each ResNet block.
 * Each node of a chain writes the memory the first one wrote, and nothing between reads
 * it, so running the chain's arithmetic inside the first node, in the same order, leaves
 * the same values there. The first node carries what to apply in the spare tail of its
 * op_params; the others lose their COMPUTE flag, which makes ggml's graph loop pass them.
 * Both are put back when the graph has run. Only where sfumato's kernels run. */
#pragma once

#include "ggml.h"

#include <cstdint>
#include <vector>

namespace sfumato {

// What a CONV_2D adds to each output value after its last sum: bias[oc], then the
// residual at the value's own index (either may be absent).
struct ConvEpilogue {
    const float * bias = nullptr;
    const float * residual = nullptr;
    bool any() const { return bias != nullptr || residual != nullptr; }
};

// What a GROUP_NORM applies to each normalized value of channel c: * gamma[c] + beta[c]
// (both or neither), then silu.
struct NormEpilogue {
    const float * gamma = nullptr;
    const float * beta = nullptr;
    bool silu = false;
};

ConvEpilogue conv_epilogue(const ggml_tensor * conv);
NormEpilogue norm_epilogue(const ggml_tensor * norm);

// Whether sfumato's GROUP_NORM runs this node (csrc/group_norm.cpp); a norm is folded
// into only then.
bool group_norm_takes(const ggml_tensor * norm);

// The folds of one graph while it runs: set up by the constructor, undone by the destructor.
class Folds {
  public:
    explicit Folds(ggml_cgraph * graph);
    ~Folds();
    Folds(const Folds &) = delete;
    Folds & operator=(const Folds &) = delete;

  private:
    struct Carrier {
        ggml_tensor * node;
        int32_t saved[8];
    };
    std::vector<Carrier> carriers_;
    std::vector<ggml_tensor *> passed_;
    void carry(ggml_tensor * node, uint32_t kind, uint32_t flags, const void * p0, const void * p1);
    void pass(ggml_tensor * node);
};

}  // namespace sfumato

extern "C" {
/* Whether folds are planned (1, the default) or every node runs on its own (0): for
 * tests, which compare the two. */
int sfumato_folds_enabled(void);
void sfumato_folds_set_enabled(int enabled);
/* How many nodes the last graph this module ran passed as folded into another. */
int sfumato_folds_last(void);
}
