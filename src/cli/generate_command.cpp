// `zimage generate`: prompts in, image files out. Flags follow SGLang's `sglang generate` where it
// has one. Bad input exits with code 2 before anything is written.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/component_flags.h"
#include "cli/engine.h"
#include "cli/output_files.h"
#include "cli/version.h"
#include "core/error.h"
#include "core/log.h"
#include "io/image.h"
#include "io/safetensors.h"
#include "model/lora.h"
#include "parallel/parallel_config.h"
#include "pipeline/request_limits.h"
#include "pipeline/text_to_image.h"

namespace zimage::cli {

namespace fs = std::filesystem;

namespace {

struct GenerateOptions {
  std::string model, generator = "cuda", output_path = "outputs/", save_latents, perf_dump;
  std::vector<std::string> prompts, loras;
  std::string prompt_file;
  std::vector<std::string> negative_prompts;
  int height = 1024, width = 1024, max_sequence_length = 512, num_outputs_per_prompt = 1;
  std::optional<int> steps;
  std::optional<float> guidance;
  float cfg_normalization = 0.0f, cfg_truncation = 1.0f;
  std::string seed = "42";  // parsed by parse_seed: CLI11 clamps 2^63 to 2^63-1 and reads 010 as octal
  bool warmup = false;
  DeviceOptions device;
  std::vector<std::string> images;  // image to image / inpainting
  std::string mask;
  std::optional<double> strength;
  ComponentFiles files;
  ControlNetFlags controlnet;
  QuantizationFlags quantization;
  std::string control_image;
  float controlnet_scale = 0.75f;
};

// One prompt per line. A UTF-8 byte order mark (what Windows editors save) is not part of the first
// prompt, "\r\n" ends a line like "\n", and lines of only whitespace are skipped. A line that is not
// UTF-8 is an error naming its line, with the bad bytes escaped.
std::vector<std::string> read_prompt_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorKind::NotFound, "cannot read the prompt file '" + path + "'");
  std::string text(std::istreambuf_iterator<char>(in), {});
  if (text.starts_with("\xEF\xBB\xBF")) text.erase(0, 3);
  std::vector<std::string> prompts;
  size_t line_no = 0;
  for (size_t begin = 0; begin < text.size();) {
    size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(begin, end - begin);
    begin = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t\r\f\v") == std::string::npos) continue;
    check_prompt_text(line, "line " + std::to_string(line_no) + " of the prompt file '" + path + "'");
    prompts.push_back(std::move(line));
  }
  if (prompts.empty()) throw Error(ErrorKind::InvalidArgument, "the prompt file '" + path + "' has no prompts");
  return prompts;
}

// A one-line progress bar on stderr (only used when stderr is a terminal).
void progress_bar(int step, int total) {
  const int width = 30;
  int filled = total ? step * width / total : width;
  std::fprintf(stderr, "\r  denoising [%s%s] %d/%d", std::string(size_t(filled), '#').c_str(),
               std::string(size_t(width - filled), '.').c_str(), step, total);
  if (step == total) std::fprintf(stderr, "\n");
}

nlohmann::json perf_json(const GenerateResult& r, const GenerateRequest& req, const std::string& device, double load_s) {
  const auto& t = r.times;
  nlohmann::json steps = nlohmann::json::array();
  steps.push_back({{"name", "text_encoder"}, {"duration_ms", t.text_encoder_ms}});
  steps.push_back({{"name", "denoise"}, {"duration_ms", t.denoise_ms}});
  steps.push_back({{"name", "vae_decode"}, {"duration_ms", t.vae_decode_ms}});
  steps.push_back({{"name", "to_uint8"}, {"duration_ms", t.to_u8_ms}});
  nlohmann::json per_step = nlohmann::json::array();
  for (size_t i = 0; i < t.step_ms.size(); ++i) per_step.push_back({{"step", i}, {"duration_ms", t.step_ms[i]}});
  double dit = 0;
  for (double v : t.dit_ms) dit += v;
  return {{"device", device},
          {"resolution", std::to_string(req.width) + "x" + std::to_string(req.height)},
          {"steps", r.steps},
          {"guidance_scale", r.guidance},
          {"batch", r.images.dim(0)},
          {"e2e_ms", t.total_ms},
          {"text_encoder_ms", t.text_encoder_ms},
          {"denoise_ms", t.denoise_ms},
          {"dit_forward_ms", t.dit_ms.empty() ? 0.0 : dit / double(t.dit_ms.size())},
          {"dit_forwards", t.dit_ms.size()},
          {"vae_decode_ms", t.vae_decode_ms},
          {"load_s", load_s},
          {"stages", {{"steps", steps}, {"denoise_steps_ms", per_step}}}};
}

}  // namespace

Command add_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate images from text prompts");
  auto o = std::make_shared<GenerateOptions>();
  // An option that takes one value refuses a second (main.cpp); --prompt and --negative-prompt collect.
  cmd->add_option("--model,--model-path", o->model, "Model folder (diffusers layout) or synthetic:tiny|turbo");
  add_component_flags(cmd, o->files);
  cmd->add_option("--prompt", o->prompts, "Prompt (repeat for a batch)")->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--prompt-file", o->prompt_file, "File with one prompt per line");
  cmd->add_option("--negative-prompt", o->negative_prompts,
                  "Negative prompt for CFG (default \"\"): once for all prompts, or once per prompt in their order")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--height", o->height, "Image height in pixels (multiple of 16)");
  cmd->add_option("--width", o->width, "Image width in pixels (multiple of 16)");
  cmd->add_option("--num-inference-steps", o->steps, "Denoising steps (default: the model's: 8 for Turbo, as diffusers since PR #13730, 50 for the base model)");
  cmd->add_option("--guidance-scale", o->guidance, "CFG scale, 0 = off (default: the model's, 0 for Turbo)");
  cmd->add_option("--cfg-normalization", o->cfg_normalization, "Cap the guided prediction's norm at this multiple of the positive one (0 = off)");
  cmd->add_option("--cfg-truncation", o->cfg_truncation, "Skip CFG on steps whose normalized time exceeds this (1 = never)");
  cmd->add_option("--max-sequence-length", o->max_sequence_length, "Prompt tokens after the chat template (longer prompts are truncated)");
  cmd->add_option("--seed", o->seed, "Seed of the starting noise, 0 to 2^63-1 (torch.randn compatible)")
      ->type_name("INT");
  cmd->add_option("--generator-device", o->generator, "Noise stream to reproduce: torch's cpu or cuda generator")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--num-outputs-per-prompt", o->num_outputs_per_prompt, "Images per prompt");
  cmd->add_option("--output-path", o->output_path,
                  "Output file (.png, .jpg, .jpeg, .webp) or folder (a path without an extension; created if missing)");
  cmd->add_option("--save-latents", o->save_latents, "Also write the final latents (float32 'latents') to this .safetensors file");
  cmd->add_option("--perf-dump-path", o->perf_dump, "Write stage timings as JSON to this file");
  cmd->add_option("--lora", o->loras, "LoRA file merged into the DiT at load, FILE[:SCALE] (default scale 1; repeat to add several)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_flag("--warmup", o->warmup, "Run one untimed generation first");
  cmd->add_option("--image", o->images, "Init image for image-to-image (PNG, JPEG, WebP; repeat for several)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--mask", o->mask, "Inpainting mask for --image: white = repaint (any size: resized like the image)");
  cmd->add_option("--strength", o->strength,
                  "Share of the schedule run from --image, in (0, 1] (default 0.6; 1 with --mask)");
  add_controlnet_flags(cmd, o->controlnet);
  add_quantization_flags(cmd, o->quantization);
  cmd->add_option("--control-image", o->control_image,
                  "Control image for --controlnet (canny, depth, pose, ...; resized to the output size); with "
                  "--image and --mask: ControlNet inpainting");
  cmd->add_option("--controlnet-scale", o->controlnet_scale,
                  "Scale of the ControlNet's outputs (diffusers' controlnet_conditioning_scale)");
  add_device_options(cmd, o->device);
  return {cmd, [o, cmd] {
            if (!o->prompt_file.empty()) {
              auto more = read_prompt_file(o->prompt_file);
              o->prompts.insert(o->prompts.end(), more.begin(), more.end());
            }
            if (o->prompts.empty()) throw Error(ErrorKind::InvalidArgument, "give a prompt with --prompt or --prompt-file");
            const size_t negatives = o->negative_prompts.size();
            if (negatives > 1 && negatives != o->prompts.size())
              throw Error(ErrorKind::InvalidArgument, "--negative-prompt is given " + std::to_string(negatives) +
                                                          " times for " + std::to_string(o->prompts.size()) +
                                                          " prompts: give it once for all prompts or once per prompt");
            GenerateRequest req;
            req.prompts = o->prompts;
            req.negative_prompts = o->negative_prompts;
            req.height = o->height;
            req.width = o->width;
            req.steps = o->steps;
            req.guidance = o->guidance;
            req.cfg_normalization = o->cfg_normalization;
            req.cfg_truncation = o->cfg_truncation;
            req.max_sequence_length = o->max_sequence_length;
            req.seed = parse_seed(o->seed, "--seed");
            req.generator = o->generator == "cpu" ? GeneratorDevice::Cpu : GeneratorDevice::Cuda;
            req.num_images_per_prompt = o->num_outputs_per_prompt;
            for (const std::string& path : o->images) req.images.push_back(read_image(path));  // bad files fail first
            if (!o->mask.empty()) req.masks = {read_image(o->mask)};
            req.strength = o->strength;
            if (!o->control_image.empty()) req.control_image = read_image(o->control_image);
            req.controlnet_scale = o->controlnet_scale;

            // Everything the user asked for is checked against the model's configs before a weight is
            // read: a bad size must not cost a 20 GB load.
            auto t0 = std::chrono::steady_clock::now();
            ModelSource model = open_model(o->model, o->files);
            merge_loras(model, o->loras);
            attach_controlnet(model, o->controlnet);
            apply_quantization(model, o->quantization);
            const ParallelConfig par = check_device_options(o->device, model);
            const PipelineLimits limits;
            // The size defaults to the control image's, else the first init image's, rounded down to the
            // model's multiple (as diffusers' pipelines default to their input image's size).
            const ImageU8* sized = req.control_image ? &*req.control_image : req.images.empty() ? nullptr : &req.images[0];
            if (sized) {
              const int m = size_multiple(model);
              if (!cmd->count("--height")) req.height = std::max(sized->height / m * m, m);
              if (!cmd->count("--width")) req.width = std::max(sized->width / m * m, m);
            }
            req = resolve_request(req, model, limits);
            const int64_t n_images = int64_t(req.prompts.size()) * req.num_images_per_prompt;
            prepare_image_paths(o->output_path, n_images, req.seed);
            if (!o->save_latents.empty()) prepare_output_file(o->save_latents, "--save-latents", /*in_place=*/false);
            if (!o->perf_dump.empty()) prepare_output_file(o->perf_dump, "--perf-dump-path", /*in_place=*/true);

            model.prefetch_weights();  // the files are read while the device initializes
            Engine engine = make_engine(o->device, par, model, limits);
            ImageGenerator& pipe = *engine.generator;
            req = pipe.resolve(req);
            engine.synchronize();  // uploads are asynchronous: the load ends when the last one has landed
            double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            log_info("loaded " + model.name + " on " + engine.device() + " in " + std::to_string(load_s) + " s");

            if (o->warmup) pipe.generate(req);
            GenerateResult res = pipe.generate(req, ::isatty(STDERR_FILENO) ? progress_bar : nullptr);

            // Chosen again now: a default name taken while this run generated gets the next counter.
            const std::vector<std::string> paths = prepare_image_paths(o->output_path, n_images, req.seed);

            for (size_t i = 0; i < paths.size(); ++i) {
              const std::string& prompt = req.prompts[i / size_t(req.num_images_per_prompt)];
              EncodeOptions enc;
              enc.text = {{"prompt", prompt},
                          {"negative_prompt",
                           *req.guidance > 0 ? req.negative_prompts[i / size_t(req.num_images_per_prompt)] : ""},
                          {"seed", std::to_string(req.seed)},
                          {"batch_index", std::to_string(i)},
                          {"steps", std::to_string(res.steps)},
                          {"guidance_scale", std::to_string(res.guidance)},
                          {"model", model.name},
                          {"software", software_name()}};
              Tensor img = res.images.narrow0(int64_t(i), 1).reshape({req.height, req.width, 3});
              write_image(paths[i], tensor_to_image(img), enc);
              std::printf("%s\n", paths[i].c_str());
            }
            if (!o->save_latents.empty()) write_safetensors(o->save_latents, {{"latents", res.latents}});
            if (!o->perf_dump.empty())
              write_text_file(o->perf_dump, perf_json(res, req, engine.device(), load_s).dump(2) + "\n");
            log_info("generated " + std::to_string(paths.size()) + " image(s) in " + std::to_string(res.times.total_ms / 1000) + " s");
            return 0;
          }};
}

}  // namespace zimage::cli
