/* The switch between sfumato's kernels and ggml's own, and the list `sfumato info`
 * prints (csrc/kernels.h). */
#include "kernels.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace {
std::atomic<int> g_enabled{-1};  // -1: SFUMATO_KERNELS not read yet
}  // namespace

extern "C" int sfumato_kernels_enabled(void) {
    int enabled = g_enabled.load(std::memory_order_relaxed);
    if (enabled < 0) {
        const char * choice = std::getenv("SFUMATO_KERNELS");
        enabled = (choice != nullptr && std::strcmp(choice, "ggml") == 0) ? 0 : 1;
        g_enabled.store(enabled, std::memory_order_relaxed);
    }
    return enabled;
}

extern "C" void sfumato_kernels_set_enabled(int enabled) {
    g_enabled.store(enabled ? 1 : 0, std::memory_order_relaxed);
}

extern "C" const char * sfumato_kernels(void) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
    return "conv_2d:" SFUMATO_KERNEL_ISA ",mul_mat:" SFUMATO_KERNEL_ISA;
#else
    return "";
#endif
}
