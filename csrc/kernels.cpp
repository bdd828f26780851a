/* The switch between sfumato's kernels and ggml's own, and the list `sfumato info`
 * prints (csrc/kernels.h). */
#include "kernels.h"

#include "gemm_tile.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if SFUMATO_AMX_TILE
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {
std::atomic<int> g_enabled{-1};  // -1: SFUMATO_KERNELS not read yet
std::atomic<int> g_bf16{-1};     // -1: SFUMATO_PRECISION not read yet

// 1 when the variable `name` is set to `value`.
int env_is(const char * name, const char * value) {
    const char * set = std::getenv(name);
    return set != nullptr && std::strcmp(set, value) == 0 ? 1 : 0;
}
}  // namespace

#if SFUMATO_AMX_TILE
namespace {
std::atomic<int> g_amx{1};  // the tiles allowed (tests turn them off to run the other tile)
}  // namespace

bool sfumato::amx_ready() {
    static const bool granted = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0 || (d & (1u << 22)) == 0 || (d & (1u << 24)) == 0) {
            return false;  // no AMX-BF16 or no AMX-TILE
        }
        constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }();
    return granted && g_amx.load(std::memory_order_relaxed) != 0;
}
#endif

extern "C" void sfumato_amx_set_enabled(int enabled) {
#if SFUMATO_AMX_TILE
    g_amx.store(enabled ? 1 : 0, std::memory_order_relaxed);
#else
    (void) enabled;
#endif
}

extern "C" int sfumato_amx_ready(void) {
#if SFUMATO_AMX_TILE
    return sfumato::amx_ready() ? 1 : 0;
#else
    return 0;
#endif
}

extern "C" int sfumato_kernels_enabled(void) {
    int enabled = g_enabled.load(std::memory_order_relaxed);
    if (enabled < 0) {
        enabled = 1 - env_is("SFUMATO_KERNELS", "ggml");
        g_enabled.store(enabled, std::memory_order_relaxed);
    }
    return enabled;
}

extern "C" void sfumato_kernels_set_enabled(int enabled) {
    g_enabled.store(enabled ? 1 : 0, std::memory_order_relaxed);
}

extern "C" int sfumato_bf16_enabled(void) {
    int enabled = g_bf16.load(std::memory_order_relaxed);
    if (enabled < 0) {
        enabled = env_is("SFUMATO_PRECISION", "bf16");
        g_bf16.store(enabled, std::memory_order_relaxed);
    }
    return enabled;
}

extern "C" void sfumato_bf16_set_enabled(int enabled) {
    g_bf16.store(enabled ? 1 : 0, std::memory_order_relaxed);
}

extern "C" const char * sfumato_kernels(void) {
#if SFUMATO_AMX_TILE
    return "conv_2d:" SFUMATO_KERNEL_ISA "+bf16+amx,mul_mat:" SFUMATO_KERNEL_ISA "+bf16+amx,flash_attn_ext:" SFUMATO_KERNEL_ISA
           "+bf16+amx,group_norm:" SFUMATO_KERNEL_ISA;
#elif SFUMATO_BF16_TILE
    return "conv_2d:" SFUMATO_KERNEL_ISA "+bf16,mul_mat:" SFUMATO_KERNEL_ISA "+bf16,flash_attn_ext:" SFUMATO_KERNEL_ISA
           "+bf16,group_norm:" SFUMATO_KERNEL_ISA;
#elif SFUMATO_GEMM_TILE
    return "conv_2d:" SFUMATO_KERNEL_ISA ",mul_mat:" SFUMATO_KERNEL_ISA ",flash_attn_ext:" SFUMATO_KERNEL_ISA
           ",group_norm:" SFUMATO_KERNEL_ISA;
#else
    return "";
#endif
}
