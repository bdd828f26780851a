/* The body of a ggml CPU variant that sfumato does not ship (CMakeLists.txt,
 * SFUMATO_CPU_VARIANTS): ggml's library depends on every variant target, so each
 * unshipped one is built from this file alone and never installed. */
typedef int sfumato_unbuilt_cpu_variant;
