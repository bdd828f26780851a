"""cffi declarations of the engine's C API (stable-diffusion.cpp as built by
``stable-diffusion-cpp-python==0.4.7``) and of the ggml device registry.

This module holds declarations only; logic lives in :mod:`sfumato.engine.library`.
Each block mirrors one area of ``stable-diffusion.h``.  Places that deliberately
differ from the engine header carry a ``DIFFERS:`` comment.
"""

from __future__ import annotations

ENUMS = """
enum rng_type_t { STD_DEFAULT_RNG, CUDA_RNG, CPU_RNG, RNG_TYPE_COUNT };

enum sample_method_t {
    EULER_SAMPLE_METHOD, EULER_A_SAMPLE_METHOD, HEUN_SAMPLE_METHOD, DPM2_SAMPLE_METHOD,
    DPMPP2S_A_SAMPLE_METHOD, DPMPP2M_SAMPLE_METHOD, DPMPP2Mv2_SAMPLE_METHOD,
    IPNDM_SAMPLE_METHOD, IPNDM_V_SAMPLE_METHOD, LCM_SAMPLE_METHOD,
    DDIM_TRAILING_SAMPLE_METHOD, TCD_SAMPLE_METHOD, RES_MULTISTEP_SAMPLE_METHOD,
    RES_2S_SAMPLE_METHOD, ER_SDE_SAMPLE_METHOD, SAMPLE_METHOD_COUNT
};

enum scheduler_t {
    DISCRETE_SCHEDULER, KARRAS_SCHEDULER, EXPONENTIAL_SCHEDULER, AYS_SCHEDULER,
    GITS_SCHEDULER, SGM_UNIFORM_SCHEDULER, SIMPLE_SCHEDULER, SMOOTHSTEP_SCHEDULER,
    KL_OPTIMAL_SCHEDULER, LCM_SCHEDULER, BONG_TANGENT_SCHEDULER, SCHEDULER_COUNT
};

enum prediction_t {
    EPS_PRED, V_PRED, EDM_V_PRED, FLOW_PRED, FLUX_FLOW_PRED, FLUX2_FLOW_PRED, PREDICTION_COUNT
};

/* DIFFERS: only the weight types sfumato offers are named; the C enum is an int
   either way, and the engine validates the value. */
enum sd_type_t {
    SD_TYPE_F32 = 0, SD_TYPE_F16 = 1, SD_TYPE_Q4_0 = 2, SD_TYPE_Q4_1 = 3,
    SD_TYPE_Q5_0 = 6, SD_TYPE_Q5_1 = 7, SD_TYPE_Q8_0 = 8, SD_TYPE_Q2_K = 10,
    SD_TYPE_Q3_K = 11, SD_TYPE_Q4_K = 12, SD_TYPE_Q5_K = 13, SD_TYPE_Q6_K = 14,
    SD_TYPE_BF16 = 30, SD_TYPE_COUNT = 41
};

enum sd_log_level_t { SD_LOG_DEBUG, SD_LOG_INFO, SD_LOG_WARN, SD_LOG_ERROR };
enum preview_t { PREVIEW_NONE, PREVIEW_PROJ, PREVIEW_TAE, PREVIEW_VAE, PREVIEW_COUNT };
enum lora_apply_mode_t {
    LORA_APPLY_AUTO, LORA_APPLY_IMMEDIATELY, LORA_APPLY_AT_RUNTIME, LORA_APPLY_MODE_COUNT
};
enum sd_cache_mode_t {
    SD_CACHE_DISABLED = 0, SD_CACHE_EASYCACHE, SD_CACHE_UCACHE, SD_CACHE_DBCACHE,
    SD_CACHE_TAYLORSEER, SD_CACHE_CACHE_DIT, SD_CACHE_SPECTRUM
};
enum sd_hires_upscaler_t {
    SD_HIRES_UPSCALER_NONE, SD_HIRES_UPSCALER_LATENT, SD_HIRES_UPSCALER_LATENT_NEAREST,
    SD_HIRES_UPSCALER_LATENT_NEAREST_EXACT, SD_HIRES_UPSCALER_LATENT_ANTIALIASED,
    SD_HIRES_UPSCALER_LATENT_BICUBIC, SD_HIRES_UPSCALER_LATENT_BICUBIC_ANTIALIASED,
    SD_HIRES_UPSCALER_LANCZOS, SD_HIRES_UPSCALER_NEAREST, SD_HIRES_UPSCALER_MODEL,
    SD_HIRES_UPSCALER_COUNT
};
"""

CONTEXT_PARAMS = """
typedef struct { const char* name; const char* path; } sd_embedding_t;

typedef struct {
    const char* model_path;
    const char* clip_l_path;
    const char* clip_g_path;
    const char* clip_vision_path;
    const char* t5xxl_path;
    const char* llm_path;
    const char* llm_vision_path;
    const char* diffusion_model_path;
    const char* high_noise_diffusion_model_path;
    const char* vae_path;
    const char* taesd_path;
    const char* control_net_path;
    const sd_embedding_t* embeddings;
    uint32_t embedding_count;
    const char* photo_maker_path;
    const char* tensor_type_rules;
    bool vae_decode_only;
    bool free_params_immediately;
    int n_threads;
    enum sd_type_t wtype;
    enum rng_type_t rng_type;
    enum rng_type_t sampler_rng_type;
    enum prediction_t prediction;
    enum lora_apply_mode_t lora_apply_mode;
    bool offload_params_to_cpu;
    bool enable_mmap;
    bool keep_clip_on_cpu;
    bool keep_control_net_on_cpu;
    bool keep_vae_on_cpu;
    bool flash_attn;
    bool diffusion_flash_attn;
    bool tae_preview_only;
    bool diffusion_conv_direct;
    bool vae_conv_direct;
    bool circular_x;
    bool circular_y;
    bool force_sdxl_vae_conv_scale;
    bool chroma_use_dit_mask;
    bool chroma_use_t5_mask;
    int chroma_t5_mask_pad;
    bool qwen_image_zero_cond_t;
    float max_vram;
} sd_ctx_params_t;

typedef struct sd_ctx_t sd_ctx_t;

void sd_ctx_params_init(sd_ctx_params_t* sd_ctx_params);
char* sd_ctx_params_to_str(const sd_ctx_params_t* sd_ctx_params);
sd_ctx_t* new_sd_ctx(const sd_ctx_params_t* sd_ctx_params);
void free_sd_ctx(sd_ctx_t* sd_ctx);
bool sd_ctx_supports_image_generation(const sd_ctx_t* sd_ctx);
"""

GENERATION_PARAMS = """
typedef struct {
    uint32_t width;
    uint32_t height;
    uint32_t channel;
    uint8_t* data;
} sd_image_t;

typedef struct {
    bool enabled;
    int tile_size_x;
    int tile_size_y;
    float target_overlap;
    float rel_size_x;
    float rel_size_y;
} sd_tiling_params_t;

typedef struct {
    int* layers;
    size_t layer_count;
    float layer_start;
    float layer_end;
    float scale;
} sd_slg_params_t;

typedef struct {
    float txt_cfg;
    float img_cfg;
    float distilled_guidance;
    sd_slg_params_t slg;
} sd_guidance_params_t;

typedef struct {
    sd_guidance_params_t guidance;
    enum scheduler_t scheduler;
    enum sample_method_t sample_method;
    int sample_steps;
    float eta;
    int shifted_timestep;
    float* custom_sigmas;
    int custom_sigmas_count;
    float flow_shift;
} sd_sample_params_t;

typedef struct {
    sd_image_t* id_images;
    int id_images_count;
    const char* id_embed_path;
    float style_strength;
} sd_pm_params_t;

typedef struct {
    enum sd_cache_mode_t mode;
    float reuse_threshold;
    float start_percent;
    float end_percent;
    float error_decay_rate;
    bool use_relative_threshold;
    bool reset_error_on_compute;
    int Fn_compute_blocks;
    int Bn_compute_blocks;
    float residual_diff_threshold;
    int max_warmup_steps;
    int max_cached_steps;
    int max_continuous_cached_steps;
    int taylorseer_n_derivatives;
    int taylorseer_skip_interval;
    const char* scm_mask;
    bool scm_policy_dynamic;
    float spectrum_w;
    int spectrum_m;
    float spectrum_lam;
    int spectrum_window_size;
    float spectrum_flex_window;
    int spectrum_warmup_steps;
    float spectrum_stop_percent;
} sd_cache_params_t;

typedef struct {
    bool is_high_noise;
    float multiplier;
    const char* path;
} sd_lora_t;

typedef struct {
    bool enabled;
    enum sd_hires_upscaler_t upscaler;
    const char* model_path;
    float scale;
    int target_width;
    int target_height;
    int steps;
    float denoising_strength;
    int upscale_tile_size;
} sd_hires_params_t;

typedef struct {
    const sd_lora_t* loras;
    uint32_t lora_count;
    const char* prompt;
    const char* negative_prompt;
    int clip_skip;
    sd_image_t init_image;
    sd_image_t* ref_images;
    int ref_images_count;
    bool auto_resize_ref_image;
    bool increase_ref_index;
    sd_image_t mask_image;
    int width;
    int height;
    sd_sample_params_t sample_params;
    float strength;
    int64_t seed;
    int batch_count;
    sd_image_t control_image;
    float control_strength;
    sd_pm_params_t pm_params;
    sd_tiling_params_t vae_tiling_params;
    sd_cache_params_t cache;
    sd_hires_params_t hires;
} sd_img_gen_params_t;

void sd_sample_params_init(sd_sample_params_t* sample_params);
char* sd_sample_params_to_str(const sd_sample_params_t* sample_params);
void sd_img_gen_params_init(sd_img_gen_params_t* sd_img_gen_params);
char* sd_img_gen_params_to_str(const sd_img_gen_params_t* sd_img_gen_params);
sd_image_t* generate_image(sd_ctx_t* sd_ctx, const sd_img_gen_params_t* sd_img_gen_params);
enum sample_method_t sd_get_default_sample_method(const sd_ctx_t* sd_ctx);
enum scheduler_t sd_get_default_scheduler(const sd_ctx_t* sd_ctx, enum sample_method_t sample_method);
/* DIFFERS: the video API (sd_vid_gen_params_t, generate_video) is not declared:
   sfumato generates still images only. */
"""

UPSCALER = """
typedef struct upscaler_ctx_t upscaler_ctx_t;

upscaler_ctx_t* new_upscaler_ctx(const char* esrgan_path, bool offload_params_to_cpu,
                                 bool direct, int n_threads, int tile_size);
void free_upscaler_ctx(upscaler_ctx_t* upscaler_ctx);
sd_image_t upscale(upscaler_ctx_t* upscaler_ctx, sd_image_t input_image, uint32_t upscale_factor);
int get_upscale_factor(upscaler_ctx_t* upscaler_ctx);
"""

CALLBACKS = """
typedef void (*sd_log_cb_t)(enum sd_log_level_t level, const char* text, void* data);
typedef void (*sd_progress_cb_t)(int step, int steps, float time, void* data);
typedef void (*sd_preview_cb_t)(int step, int frame_count, sd_image_t* frames, bool is_noisy, void* data);

void sd_set_log_callback(sd_log_cb_t sd_log_cb, void* data);
void sd_set_progress_callback(sd_progress_cb_t cb, void* data);
void sd_set_preview_callback(sd_preview_cb_t cb, enum preview_t mode, int interval,
                             bool denoised, bool noisy, void* data);
"""

NAMES_AND_SYSTEM = """
int32_t sd_get_num_physical_cores();
const char* sd_get_system_info();
const char* sd_type_name(enum sd_type_t type);
const char* sd_sample_method_name(enum sample_method_t sample_method);
enum sample_method_t str_to_sample_method(const char* str);
const char* sd_scheduler_name(enum scheduler_t scheduler);
enum scheduler_t str_to_scheduler(const char* str);
const char* sd_prediction_name(enum prediction_t prediction);
const char* sd_hires_upscaler_name(enum sd_hires_upscaler_t upscaler);
const char* sd_commit(void);
const char* sd_version(void);
void free(void* ptr);  /* DIFFERS: from libc, to release the engine's malloc'd buffers. */
"""

GGML_DEVICES = """
/* From ggml-backend.h: the device registry, to list devices. */
typedef struct ggml_backend_device* ggml_backend_dev_t;
enum ggml_backend_dev_type {
    GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU,
    GGML_BACKEND_DEVICE_TYPE_IGPU, GGML_BACKEND_DEVICE_TYPE_ACCEL
};
size_t ggml_backend_dev_count(void);
ggml_backend_dev_t ggml_backend_dev_get(size_t index);
const char* ggml_backend_dev_name(ggml_backend_dev_t device);
const char* ggml_backend_dev_description(ggml_backend_dev_t device);
void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t* free, size_t* total);
enum ggml_backend_dev_type ggml_backend_dev_type(ggml_backend_dev_t device);
"""

GGML_REGISTRY = """
/* From ggml-backend.h: the backend registry, to read what each backend was built
   with (the CPU backend's instruction sets, LLAMAFILE, OPENMP) through the
   "ggml_backend_get_features" entry every backend offers. */
typedef struct ggml_backend_reg* ggml_backend_reg_t;
struct ggml_backend_feature { const char* name; const char* value; };
typedef struct ggml_backend_feature* (*ggml_backend_get_features_t)(ggml_backend_reg_t reg);
size_t ggml_backend_reg_count(void);
ggml_backend_reg_t ggml_backend_reg_get(size_t index);
const char* ggml_backend_reg_name(ggml_backend_reg_t reg);
void* ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char* name);
size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg);
/* A backend module (a GGML_BACKEND_DL build) loaded by its path; NULL when it cannot load. */
ggml_backend_reg_t ggml_backend_load(const char* path);
/* From ggml.h: ggml's own log (module loading, device discovery) until the engine sets
   its own; the level is enum ggml_log_level (1 debug, 2 info, 3 warn, 4 error, 5 cont). */
typedef void (*ggml_log_callback)(int level, const char* text, void* user_data);
void ggml_log_set(ggml_log_callback log_callback, void* user_data);
"""

GGML_GRAPH = """
/* From ggml.h, ggml-alloc.h and ggml-backend.h: enough of ggml's graph API to time a few
   operations on one backend (the CPU variants' probe). Types are enum ggml_type's numbers
   (0 f32, 1 f16); ggml_backend_graph_compute returns enum ggml_status (0 success). */
struct ggml_init_params { size_t mem_size; void* mem_buffer; bool no_alloc; };
struct ggml_context;
struct ggml_tensor;
struct ggml_cgraph;
typedef struct ggml_backend* ggml_backend_t;
typedef struct ggml_backend_buffer* ggml_backend_buffer_t;
typedef void (*ggml_backend_set_n_threads_t)(ggml_backend_t backend, int n_threads);
struct ggml_context* ggml_init(struct ggml_init_params params);
void ggml_free(struct ggml_context* ctx);
size_t ggml_tensor_overhead(void);
size_t ggml_graph_overhead(void);
size_t ggml_nbytes(const struct ggml_tensor* tensor);
struct ggml_tensor* ggml_new_tensor_4d(struct ggml_context* ctx, int type, int64_t ne0, int64_t ne1,
                                       int64_t ne2, int64_t ne3);
struct ggml_tensor* ggml_mul_mat(struct ggml_context* ctx, struct ggml_tensor* a, struct ggml_tensor* b);
struct ggml_tensor* ggml_soft_max_ext(struct ggml_context* ctx, struct ggml_tensor* a, struct ggml_tensor* mask,
                                      float scale, float max_bias);
struct ggml_tensor* ggml_flash_attn_ext(struct ggml_context* ctx, struct ggml_tensor* q, struct ggml_tensor* k,
                                       struct ggml_tensor* v, struct ggml_tensor* mask, float scale, float max_bias,
                                       float logit_softcap);
void ggml_flash_attn_ext_set_prec(struct ggml_tensor* a, int prec);
struct ggml_tensor* ggml_conv_2d(struct ggml_context* ctx, struct ggml_tensor* a, struct ggml_tensor* b,
                                 int s0, int s1, int p0, int p1, int d0, int d1);
struct ggml_tensor* ggml_conv_2d_direct(struct ggml_context* ctx, struct ggml_tensor* a, struct ggml_tensor* b,
                                        int s0, int s1, int p0, int p1, int d0, int d1);
struct ggml_tensor* ggml_group_norm(struct ggml_context* ctx, struct ggml_tensor* a, int n_groups, float eps);
struct ggml_tensor* ggml_reshape_4d(struct ggml_context* ctx, struct ggml_tensor* a, int64_t ne0, int64_t ne1,
                                    int64_t ne2, int64_t ne3);
struct ggml_tensor* ggml_add_inplace(struct ggml_context* ctx, struct ggml_tensor* a, struct ggml_tensor* b);
struct ggml_tensor* ggml_mul_inplace(struct ggml_context* ctx, struct ggml_tensor* a, struct ggml_tensor* b);
struct ggml_tensor* ggml_silu_inplace(struct ggml_context* ctx, struct ggml_tensor* a);
struct ggml_cgraph* ggml_new_graph(struct ggml_context* ctx);
void ggml_build_forward_expand(struct ggml_cgraph* cgraph, struct ggml_tensor* tensor);
ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index);
ggml_backend_t ggml_backend_dev_init(ggml_backend_dev_t device, const char* params);
ggml_backend_buffer_t ggml_backend_alloc_ctx_tensors(struct ggml_context* ctx, ggml_backend_t backend);
void ggml_backend_tensor_set(struct ggml_tensor* tensor, const void* data, size_t offset, size_t size);
void ggml_backend_tensor_get(const struct ggml_tensor* tensor, void* data, size_t offset, size_t size);
int ggml_backend_graph_compute(ggml_backend_t backend, struct ggml_cgraph* cgraph);
void ggml_backend_buffer_free(ggml_backend_buffer_t buffer);
void ggml_backend_buffer_set_usage(ggml_backend_buffer_t buffer, int usage);
void ggml_backend_free(ggml_backend_t backend);
"""

SFUMATO_KERNELS = """
/* sfumato's own (csrc/kernels.h), exported by each CPU module sfumato builds: which of
   its kernels the module carries ("conv_2d:avx512,..."), and the switch between them and
   ggml's own (SFUMATO_KERNELS=ggml at start, or set at run time). */
const char* sfumato_kernels(void);
int sfumato_kernels_enabled(void);
void sfumato_kernels_set_enabled(int enabled);
/* The bf16 mode of the modules whose kernels carry it ("+bf16"): SFUMATO_PRECISION=bf16 at
   start, or set at run time. */
int sfumato_bf16_enabled(void);
void sfumato_bf16_set_enabled(int enabled);
/* Whether the bf16 mode's products run on AMX-BF16's tiles here ("+amx": the CPU has
   AMX-BF16 and the kernel granted the tile state). */
int sfumato_amx_ready(void);
void sfumato_amx_set_enabled(int enabled);
/* A process-wide request that stops every graph the module runs at its next operation,
   until it is cleared (a cancel that keeps the model loaded). */
void sfumato_cancel_set(int requested);
/* Folds (csrc/fusion.h): the element-wise nodes after a convolution or a group norm run
   inside it (1, the default) or on their own (0); how many nodes the last graph folded. */
int sfumato_folds_enabled(void);
void sfumato_folds_set_enabled(int enabled);
int sfumato_folds_last(void);
/* The bytes of bf16 weights the bf16 mode keeps across calls (csrc/kept_weights.h). */
size_t sfumato_kept_bytes(void);
"""

ALL = "\n".join(
    [ENUMS, CONTEXT_PARAMS, GENERATION_PARAMS, UPSCALER, CALLBACKS, NAMES_AND_SYSTEM, GGML_DEVICES, GGML_REGISTRY]
)
