/* sfumato's own CPU kernels, compiled into each of ggml's CPU variant modules.
 *
 * Each kernel file defines a ggml-cpu op function under its original name (the build
 * renames ggml's own definition to <name>_ggml with a compile definition on the ggml
 * source file that holds it) and hands every case it does not take to that renamed
 * original. The switch below turns every kernel off at once (SFUMATO_KERNELS=ggml). */
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Whether sfumato's kernels run (1) or ggml's own (0). Read once from SFUMATO_KERNELS
 * ("ggml" turns them off), then settable for tests and benchmarks. */
int sfumato_kernels_enabled(void);
void sfumato_kernels_set_enabled(int enabled);

/* Whether the bf16 mode is on (1): products of bf16-rounded operands, summed in f32, in
 * the modules whose kernels carry it (SFUMATO_BF16_TILE). Read once from
 * SFUMATO_PRECISION ("bf16" turns it on; "exact", the default, off), then settable. */
int sfumato_bf16_enabled(void);
void sfumato_bf16_set_enabled(int enabled);

/* Whether this module's bf16 mode runs its products on AMX-BF16's tiles here (1): the
 * module carries them ("+amx"), the CPU has AMX-BF16 and the kernel granted the tile
 * state (asked on the first call). 0 elsewhere: the AVX512-BF16 tile runs then. */
int sfumato_amx_ready(void);
/* Allows the tiles (1, the default) or not (0: the AVX512-BF16 tile runs instead), for tests. */
void sfumato_amx_set_enabled(int enabled);

/* The bytes of bf16 weights kept across calls in the bf16 mode (csrc/kept_weights.h). */
size_t sfumato_kept_bytes(void);

/* A process-wide request to stop: every graph this module runs stops at its next
 * operation while it is set (csrc/graph_compute.cpp). */
void sfumato_cancel_set(int requested);

/* The kernels this module carries, as "op:isa" items separated by commas ("+bf16" after
 * the isa where the op has the bf16 mode too) (a static
 * string: safe to read on any CPU, without running the module's vector code). */
const char * sfumato_kernels(void);

#ifdef __cplusplus
}
#endif

/* The instruction set the kernels of this module are compiled for (the variant's flags). */
#if defined(__AVX512F__)
#define SFUMATO_KERNEL_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SFUMATO_KERNEL_ISA "avx2"
#else
#define SFUMATO_KERNEL_ISA ""
#endif
