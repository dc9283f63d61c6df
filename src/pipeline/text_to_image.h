// Text to image, as diffusers' ZImagePipeline: chat-templated prompts -> Qwen3 hidden_states[-2] ->
// flow-match Euler denoising with the DiT (batched CFG with normalization and truncation) -> VAE
// decode -> uint8 RGB. A request with init images (and masks) is image to image (inpainting) as
// ZImageImg2ImgPipeline (ZImageInpaintPipeline): other start latents (start_latents.h) and another spec
// of the same denoising loop (denoise.h). Validation of a request happens here, at the edge, with
// messages a user understands; the models below assume valid input.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "io/image.h"
#include "model/model_source.h"
#include "model/qwen3.h"
#include "model/vae.h"
#include "model/zimage_controlnet.h"
#include "model/zimage_dit.h"
#include "parallel/communicator.h"
#include "pipeline/denoise.h"
#include "pipeline/start_latents.h"
#include "pipeline/torch_rng.h"
#include "text/tokenizer.h"

namespace zimage {

struct GenerateRequest {
  std::vector<std::string> prompts;           // one image per prompt (times num_images_per_prompt)
  std::vector<std::string> negative_prompts;  // empty: "" for every prompt; else one per prompt
  int height = 1024, width = 1024;
  std::optional<int> steps;       // default: the model's recipe
  std::optional<float> guidance;  // default: the model's recipe; CFG runs when > 0
  float cfg_normalization = 0.0f;  // > 0: cap ‖pred‖ at this multiple of ‖pos‖
  float cfg_truncation = 1.0f;     // steps whose normalized time (1000 - t)/1000 exceeds it run without CFG
  int max_sequence_length = 512;
  uint64_t seed = 0;                    // without noise_groups: one draw for the whole batch (diffusers)
  std::vector<NoiseGroup> noise_groups;  // else: their counts sum to the batch size
  GeneratorDevice generator = GeneratorDevice::Cuda;
  int num_images_per_prompt = 1;
  // Runtime LoRA (model/linear.h): the adapters of images [first, first + count), counts summing to the
  // batch size; empty: none. Base weights never change.
  std::vector<LoraGroup> lora_groups;
  // Image to image (diffusers' ZImageImg2ImgPipeline) when `images` is set, inpainting
  // (ZImageInpaintPipeline) when `masks` is set too. The images (and masks: white = repaint) are resized
  // to height x width as diffusers' VaeImageProcessor does; their counts divide the batch and item b
  // uses image b % n (diffusers repeats the list). strength in (0, 1]: the share of the schedule that runs
  // (default 0.6 for image to image, 1.0 for inpainting). The VAE's draws and the noise come from one
  // generator seeded with `seed`, in diffusers' order.
  std::vector<ImageU8> images;
  std::vector<ImageU8> masks;  // empty, one for all images, or one per image
  std::optional<double> strength;
  // ControlNet (the model's ModelSource::controlnet), as diffusers' ZImageControlNetPipeline: a control
  // image, resized to height x width, conditions every image of the batch, its outputs scaled by
  // controlnet_scale (controlnet_conditioning_scale). With one init image and one mask it is
  // ZImageControlNetInpaintPipeline (v2 ControlNets): the start is noise, and the mask and the masked
  // image are the ControlNet's extra input channels.
  std::optional<ImageU8> control_image;
  float controlnet_scale = 0.75f;
};

// Stage durations of one call, from marks in the backend's queue (text_encoder includes tokenization).
struct StageTimes {
  double text_encoder_ms = 0, vae_encode_ms = 0, denoise_ms = 0, vae_decode_ms = 0, to_u8_ms = 0, total_ms = 0;
  std::vector<double> step_ms;    // per denoising step
  std::vector<double> dit_ms;     // per DiT forward
};

// How many NaN/Inf values each stage produced (counted on the device as the stages ran).
struct NonFiniteCounts {
  int64_t prompt_embeddings = 0;  // the text encoder's output, every prompt of the call
  std::vector<int64_t> latents;   // the latents after each denoising step that ran
  int64_t image = 0;              // the VAE's decoded image
  float latents_max_abs = 0;      // the final latents' largest magnitude, filled when `image` > 0
};

struct GenerateResult {
  Tensor images;   // uint8 [B, H, W, 3] (host)
  Tensor latents;  // float32 [B, 16, H/8, W/8] final latents (host)
  int steps = 0;   // num_inference_steps of the schedule
  int steps_run = 0;  // the steps after the strength cut (all of them for text to image)
  float guidance = 0;
  std::vector<bool> prompt_truncated;
  StageTimes times;
  NonFiniteCounts non_finite;
};

// A stage produced NaN or Inf: the images would be black or noise, so the request fails instead.
// stage() is the stage's name in /metrics: "text_encoder", "denoise" or "vae_decode".
class NonFiniteError : public Error {
 public:
  NonFiniteError(std::string stage, const std::string& message)
      : Error(ErrorKind::Numerical, message), stage_(std::move(stage)) {}
  const std::string& stage() const { return stage_; }

 private:
  std::string stage_;
};

// Throws NonFiniteError naming the first stage whose output holds a NaN or Inf.
void check_finite(const NonFiniteCounts& counts);

struct PipelineLimits {
  int64_t max_pixels = int64_t(2048) * 2048;  // per image
  int max_batch = 16;
  int max_steps = 1000;
  int max_sequence_length = 4096;
  // Low-memory mode: the text encoder's layers stay in host memory (the mapped checkpoint) and are
  // uploaded one at a time while a prompt is encoded, so the DiT, the VAE and the activations are all
  // that stays on the device (H200, 1024^2, weights from files: peak 13.8 GiB instead of 20.6; the text
  // encoder takes 329 ms instead of 4).
  bool low_memory = false;
  // One device alone: every denoising step's DiT forward is recorded as a CUDA graph on the second step
  // of a token layout and replayed after, and the text encoder's layers on the second prompt of a
  // token count (Backend::make_graph; no effect on the CPU or on multi-GPU ranks).
  // Off by default: on the H200 the DiT never waits for the host's launches (512x512: 22.83 -> 22.57 ms
  // per forward; 1024x1024 and 2048x2048 equal) while a graph reserves its forward's activations (peak
  // +1.3 GiB at 1024x1024, over the 21.7 GiB budget); the text encoder, whose ~300 small kernels do wait,
  // goes from 3.9 to 3.3 ms. For hosts slower to launch than the GPU.
  bool cuda_graphs = false;
};

// What `zimage generate`, `bench` and `serve` drive: one pipeline on one device, or several GPUs
// generating together (multi_gpu_pipeline.h).
class ImageGenerator {
 public:
  virtual ~ImageGenerator() = default;
  // Fills defaults and checks everything; throws Error(InvalidArgument) with a clear message.
  virtual GenerateRequest resolve(GenerateRequest r) const = 0;
  // progress(step, total) after every denoising step has finished on the device (a caller that passes
  // no callback lets the device run ahead of the host: no synchronization inside the loop).
  virtual GenerateResult generate(const GenerateRequest& request,
                                  const std::function<void(int, int)>& progress = nullptr) = 0;
  // The backend that returns the images (rank 0): memory statistics and op profiles.
  virtual Backend& backend() = 0;
  // Heights and widths are multiples of this (the VAE's downscale times the DiT's patch: 16).
  virtual int size_multiple() const = 0;
};

// One pipeline's share of a multi-GPU generation; the default is a pipeline alone on its device.
struct RankContext {
  int rank = 0;                     // rank 0 decodes and returns the images; the others return none
  Communicator* ulysses = nullptr;  // the U > 1 ranks that split each image's heads (Ulysses)
  Communicator* ring = nullptr;     // the R > 1 Ulysses groups that pass K/V blocks (ring attention)
  Communicator* cfg = nullptr;      // the pair that splits a CFG batch into its branches (--cfg-parallel)
};

class TextToImagePipeline final : public ImageGenerator {
 public:
  TextToImagePipeline(Backend& be, const ModelSource& model, PipelineLimits limits = {}, RankContext rank = {});

  GenerateRequest resolve(GenerateRequest r) const override;
  GenerateResult generate(const GenerateRequest& request,
                          const std::function<void(int, int)>& progress = nullptr) override;
  // generate() without the final check_finite (the counts are in the result): a multi-GPU generation
  // checks on the caller's thread, where an error does not abort the ranks' communicators.
  GenerateResult generate_unchecked(const GenerateRequest& request,
                                    const std::function<void(int, int)>& progress = nullptr);

  // The start latents of a resolved request: noise, or the init images' latents noised to `sigma` (the
  // schedule's sigma at the strength cut). Public for the tests, which check every draw.
  StartLatents make_start_latents(const GenerateRequest& resolved, int64_t batch, float sigma);

  // Prompt embeddings: one [len_i, hidden] backend tensor per prompt.
  std::vector<Tensor> encode_prompts(const std::vector<std::string>& prompts, int max_sequence_length,
                                     std::vector<bool>* truncated = nullptr);

  Backend& backend() override { return be_; }
  int size_multiple() const override { return vae_.downscale() * int(dit_.config().patch); }
  const ModelSource& model() const { return model_; }
  Vae& vae() { return vae_; }
  int latent_channels() const { return int(dit_.config().in_channels); }

 private:
  // One DiT call of the denoising loop, split as this rank's context says. cfg_batch: latents hold
  // [positives | negatives].
  Tensor dit_forward(const Tensor& latents, const std::vector<float>& t, const std::vector<Tensor>& caps,
                     bool cfg_batch);

  // The single-device forward through the recorded graph of its token layout (made on first use).
  Tensor graphed_forward(const Tensor& latents, const std::vector<float>& t, const std::vector<Tensor>& caps);

  Backend& be_;
  ModelSource model_;
  PipelineLimits limits_;
  RankContext rank_;
  Tokenizer tokenizer_;
  Qwen3TextEncoder text_encoder_;
  ZImageDit dit_;
  Vae vae_;
  std::shared_ptr<const ZImageControlNet> controlnet_;  // the model's, if any
  // limits.cuda_graphs on a device alone (a multi-GPU rank's forward holds collectives).
  bool graphs_;
  // Recorded DiT forwards by token layout (batch, latent size, caption lengths); each reserves one
  // forward's activations on the device, so few are kept.
  GraphCache dit_graphs_{3};
};

}  // namespace zimage
