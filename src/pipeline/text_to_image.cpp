#include "pipeline/text_to_image.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "core/error.h"
#include "core/log.h"
#include "parallel/cfg_parallel.h"
#include "parallel/sequence_parallel_plan.h"
#include "pipeline/flow_match_scheduler.h"
#include "pipeline/image_processor.h"
#include "pipeline/request_limits.h"

namespace zimage {

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

}  // namespace

TextToImagePipeline::TextToImagePipeline(Backend& be, const ModelSource& model, PipelineLimits limits,
                                         RankContext rank)
    : be_(be),
      model_(model),
      limits_(limits),
      rank_(rank),
      tokenizer_(Tokenizer::load(model.tokenizer_dir)),
      text_encoder_(be, model_.text_encoder, *model_.text_encoder_weights, limits.low_memory),
      dit_(be, model.transformer, *model.transformer_weights),
      vae_(be, model.vae, *model.vae_weights),
      graphs_(limits.cuda_graphs && !rank.ulysses && !rank.ring && !rank.cfg) {
  if (model.controlnet)
    controlnet_ = std::make_shared<const ZImageControlNet>(be, dit_.config(), model.controlnet->config_for(dit_.config()),
                                                           *model.controlnet->weights);
  text_encoder_.set_graphs(graphs_);
}

GenerateRequest TextToImagePipeline::resolve(GenerateRequest r) const {
  return resolve_request(std::move(r), model_, limits_);
}

StartLatents TextToImagePipeline::make_start_latents(const GenerateRequest& r, int64_t batch, float sigma) {
  const Shape shape = {batch, latent_channels(), r.height / vae_.downscale(), r.width / vae_.downscale()};
  if (r.images.empty() || r.control_image) {  // ControlNet inpainting starts from noise too
    // torch.randn draws of [count, C, 2*(H/16), 2*(W/16)], one per noise group (by default one group: the
    // whole batch with the request's seed, as diffusers draws it).
    std::vector<NoiseGroup> groups = r.noise_groups;
    if (groups.empty()) groups.push_back({batch, r.seed});
    return noise_start_latents(be_, shape, groups, r.generator);
  }
  const Tensor pixels = resize_images(r.images, r.height, r.width);
  Tensor masks;
  if (!r.masks.empty()) masks = preprocess_masks(r.masks, r.height, r.width);
  TorchGenerator gen(r.seed, r.generator);
  return image_start_latents(be_, vae_, pixels, r.masks.empty() ? nullptr : &masks, batch, sigma, gen);
}

std::vector<Tensor> TextToImagePipeline::encode_prompts(const std::vector<std::string>& prompts, int max_sequence_length,
                                                        std::vector<bool>* truncated) {
  // Each distinct prompt is encoded once (a server batch often repeats one prompt).
  std::vector<std::string> unique;
  std::vector<size_t> which(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto it = std::find(unique.begin(), unique.end(), prompts[i]);
    which[i] = size_t(it - unique.begin());
    if (it == unique.end()) unique.push_back(prompts[i]);
  }
  // One prompt per text encoder call: the encoder runs only a prompt's own tokens, so a prompt's
  // embeddings are the same bits whatever other prompts share the batch (a server batch equals the
  // requests made alone).
  std::vector<Tensor> encoded;
  std::vector<bool> was_truncated;
  for (const auto& prompt : unique) {
    TokenizedBatch tok = tokenize_prompts(tokenizer_, {prompt}, max_sequence_length);
    if (tok.truncated[0])
      log_warn("a prompt is longer than max_sequence_length " + std::to_string(max_sequence_length) +
               " tokens (chat template included) and was truncated");
    encoded.push_back(text_encoder_.encode(tok.input_ids, tok.lengths)[0]);
    was_truncated.push_back(tok.truncated[0]);
  }
  std::vector<Tensor> out;
  if (truncated) truncated->clear();
  for (size_t i = 0; i < prompts.size(); ++i) {
    out.push_back(encoded[which[i]]);
    if (truncated) truncated->push_back(was_truncated[which[i]]);
  }
  return out;
}

Tensor TextToImagePipeline::dit_forward(const Tensor& latents, const std::vector<float>& t,
                                        const std::vector<Tensor>& caps, bool cfg_batch) {
  BatchForward forward = [&](const Tensor& x, const std::vector<float>& tt, const std::vector<Tensor>& cc) {
    // A recorded graph holds the adapters and control of its recording: runs with them run eagerly.
    if (!rank_.ulysses && !rank_.ring)
      return graphs_ && !dit_.has_lora() && !dit_.has_control() ? graphed_forward(x, tt, cc) : dit_.forward(x, tt, cc);
    const DitConfig& c = dit_.config();
    SequenceParallelPlan plan =
        plan_sequence_parallel(x.dim(2) / c.patch, x.dim(3) / c.patch, rank_.ulysses ? rank_.ulysses->size() : 1,
                               c.heads, rank_.ring ? rank_.ring->size() : 1);
    return dit_.forward_sharded(x, tt, cc, plan, rank_.ulysses, rank_.ring);
  };
  if (cfg_batch && rank_.cfg) return cfg_parallel_forward(be_, *rank_.cfg, latents, t, caps, forward);
  return forward(latents, t, caps);
}

Tensor TextToImagePipeline::graphed_forward(const Tensor& latents, const std::vector<float>& t,
                                            const std::vector<Tensor>& caps) {
  std::vector<int64_t> key = {latents.dim(0), latents.dim(2), latents.dim(3)};
  for (const Tensor& c : caps) key.push_back(c.dim(0));
  Backend::Graph& graph = dit_graphs_.get(key, [&] {
    // The graph holds the plan: its replays read the plan's device tensors.
    return be_.make_graph([this, plan = dit_.layout_plan(latents, caps)](const std::vector<Tensor>& in) {
      return dit_.forward(*plan, in[0], in[1], std::vector<Tensor>(in.begin() + 2, in.end()));
    });
  });
  std::vector<Tensor> inputs = {latents, be_.upload(Tensor::from_f32({int64_t(t.size())}, t), DType::F32)};
  inputs.insert(inputs.end(), caps.begin(), caps.end());
  return graph(inputs);
}

void check_finite(const NonFiniteCounts& c) {
  auto values = [](int64_t n) { return std::to_string(n) + (n == 1 ? " NaN/Inf value" : " NaN/Inf values"); };
  if (c.prompt_embeddings)
    throw NonFiniteError("text_encoder", "the text encoder produced " + values(c.prompt_embeddings) +
                                             " in the prompt embeddings; no image was made (are the text "
                                             "encoder's weights intact?)");
  for (size_t i = 0; i < c.latents.size(); ++i)
    if (c.latents[i])
      throw NonFiniteError("denoise", "denoising produced " + values(c.latents[i]) + " in the latents at step " +
                                          std::to_string(i + 1) + " of " + std::to_string(c.latents.size()) +
                                          "; no image was made (too large a guidance_scale, or damaged "
                                          "transformer weights?)");
  // Latents from noise stay within a few units; far beyond, the VAE's bf16/float32 convolutions overflow.
  constexpr float kLatentRange = 1e4f;
  if (c.image && c.latents_max_abs > kLatentRange) {
    char magnitude[32];
    std::snprintf(magnitude, sizeof magnitude, "%.3g", double(c.latents_max_abs));
    throw NonFiniteError("vae_decode", "the VAE decoder produced " + values(c.image) +
                                           " in the image: the final latents are finite but reach " + magnitude +
                                           " in magnitude; no image was made (too large a guidance_scale?)");
  }
  if (c.image)
    throw NonFiniteError("vae_decode", "the VAE decoder produced " + values(c.image) +
                                           " in the image from finite latents; no image was made (are the VAE's "
                                           "weights intact?)");
}

GenerateResult TextToImagePipeline::generate(const GenerateRequest& request, const std::function<void(int, int)>& progress) {
  GenerateResult res = generate_unchecked(request, progress);
  check_finite(res.non_finite);
  return res;
}

GenerateResult TextToImagePipeline::generate_unchecked(const GenerateRequest& request,
                                                       const std::function<void(int, int)>& progress) {
  const GenerateRequest r = resolve(request);
  GenerateResult res;
  const int steps = *r.steps;
  const float guidance = *r.guidance;
  res.steps = steps;
  res.guidance = guidance;
  auto t_start = Clock::now();
  const bool cfg = guidance > 0;
  // Stage times come from marks in the backend's queue: no synchronization inside the loop.
  Backend::Mark m_start = be_.mark();

  // 1. Prompts -> embeddings (positives, then negatives when CFG is on), repeated per image.
  std::vector<Tensor> pos = encode_prompts(r.prompts, r.max_sequence_length, &res.prompt_truncated);
  std::vector<Tensor> neg;
  if (cfg) neg = encode_prompts(r.negative_prompts, r.max_sequence_length);
  DenoiseSpec spec;
  for (size_t i = 0; i < pos.size(); ++i)
    for (int k = 0; k < r.num_images_per_prompt; ++k) {
      spec.caps.push_back(pos[i]);
      if (cfg) spec.neg_caps.push_back(neg[i]);
    }
  const int64_t b = int64_t(spec.caps.size());

  // 2. The schedule and where it starts: image to image runs the last `strength` share of it.
  const int64_t lh = r.height / vae_.downscale(), lw = r.width / vae_.downscale();
  const FlowMatchSchedule sched = flow_match_schedule(model_.scheduler, steps, (lh / 2) * (lw / 2));
  spec.schedule = &sched;
  spec.begin = r.strength && !r.control_image ? strength_begin_index(steps, *r.strength) : 0;
  spec.guidance = guidance;
  spec.cfg_normalization = r.cfg_normalization;
  spec.cfg_truncation = r.cfg_truncation;
  const int run = steps - spec.begin;
  res.steps_run = run;

  // Numerical guards: NaN/Inf counts per stage, read once at the end (slot 0: prompt embeddings,
  // 1..run: latents after each step, run + 1: the decoded image).
  Tensor non_finite = be_.upload(Tensor::zeros({run + 2}, DType::I32), DType::I32);
  for (const auto& e : pos) be_.count_non_finite(e, non_finite, 0);
  for (const auto& e : neg) be_.count_non_finite(e, non_finite, 0);
  Backend::Mark m_text = be_.mark();

  // 3. Start latents: noise, or the init images' latents noised to the first sigma that runs.
  StartLatents start = make_start_latents(r, b, sched.sigmas[size_t(spec.begin)]);
  // The ControlNet's input: the control image's latents (and, inpainting, the mask and masked image's).
  std::optional<ZImageDit::Control> control;
  if (r.control_image) {
    const Tensor pixels = r.images.empty() ? Tensor() : resize_images(r.images, r.height, r.width);
    const Tensor masks = r.masks.empty() ? Tensor() : preprocess_masks(r.masks, r.height, r.width);
    control = ZImageDit::Control{
        controlnet_,
        control_latents(be_, vae_, resize_images({*r.control_image}, r.height, r.width),
                        controlnet_->config().in_channels, pixels.defined() ? &pixels : nullptr,
                        masks.defined() ? &masks : nullptr),
        r.controlnet_scale};
  }
  Backend::Mark m_encode = be_.mark();
  Tensor latents = start.latents;
  if (start.blend) spec.blend = &*start.blend;

  // 4. The denoising loop.
  DitCall dit = [this](const Tensor& x, const std::vector<float>& t, const std::vector<Tensor>& caps, bool cfg_batch) {
    return dit_forward(x, t, caps, cfg_batch);
  };
  dit_.set_lora(r.lora_groups, b);
  dit_.set_control(std::move(control));
  DenoiseMarks marks = denoise(be_, dit, spec, latents, non_finite, 1, progress);
  dit_.set_control(std::nullopt);

  // The other ranks of a multi-GPU generation hold the same latents: rank 0 alone decodes.
  if (rank_.rank != 0) return res;

  // 5. Decode and convert to uint8 as diffusers' postprocess + PIL do.
  Tensor image = vae_.decode(latents);
  be_.count_non_finite(image, non_finite, run + 1);
  Backend::Mark m_vae = be_.mark();
  Tensor u8 = be_.image_to_u8(image);
  Backend::Mark m_u8 = be_.mark();
  res.latents = be_.to_host_f32(latents);
  res.images = be_.to_host_u8(u8);
  const std::vector<float> counts = be_.to_host_f32(non_finite).to_vector();
  res.non_finite.prompt_embeddings = int64_t(counts[0]);
  res.non_finite.latents.assign(counts.begin() + 1, counts.end() - 1);
  res.non_finite.image = int64_t(counts.back());
  if (res.non_finite.image)
    for (int64_t i = 0; i < res.latents.numel(); ++i)
      res.non_finite.latents_max_abs = std::max(res.non_finite.latents_max_abs, std::fabs(res.latents.f32()[i]));

  res.times.text_encoder_ms = be_.elapsed_ms(m_start, m_text);
  res.times.vae_encode_ms = be_.elapsed_ms(m_text, m_encode);
  for (int i = 0; i < run; ++i) {
    const Backend::Mark& begin = i == 0 ? marks.begin : marks.step[size_t(i - 1)];
    res.times.dit_ms.push_back(be_.elapsed_ms(begin, marks.dit[size_t(i)]));
    res.times.step_ms.push_back(be_.elapsed_ms(begin, marks.step[size_t(i)]));
  }
  res.times.denoise_ms = be_.elapsed_ms(marks.begin, marks.step.back());
  res.times.vae_decode_ms = be_.elapsed_ms(marks.step.back(), m_vae);
  res.times.to_u8_ms = be_.elapsed_ms(m_vae, m_u8);
  res.times.total_ms = ms_since(t_start);
  return res;
}

}  // namespace zimage
