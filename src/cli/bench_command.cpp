// `zimage bench`: the benchmark protocol of docs/PERFORMANCE.md. Per resolution: one warm-up
// generation, then >= 5 timed runs; medians of the end-to-end time (prompt in -> uint8 image, host
// clock, synchronized) and of every stage (the backend synchronized at stage boundaries); PNG encoding
// timed separately. Writes bench/results/<device>-<date>-<label>.json.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/component_flags.h"
#include "cli/engine.h"
#include "cli/output_files.h"
#include "cli/version.h"
#include "core/error.h"
#include "core/log.h"
#include "io/image.h"
#include "pipeline/request_limits.h"
#include "pipeline/text_to_image.h"

namespace zimage::cli {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

const Clock::time_point kProcessStart = Clock::now();  // static init: as close to process start as we get

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// "1024x768" -> {1024, 768}: two whole decimal ints around one 'x', nothing else.
std::pair<int, int> parse_resolution(const std::string& s) {
  const Error bad(ErrorKind::InvalidArgument, "resolution '" + s + "' is not WIDTHxHEIGHT (e.g. 1024x768)");
  const size_t x = s.find_first_of("xX");
  if (x == std::string::npos) throw bad;
  int w = 0, h = 0;
  const char *begin = s.data(), *end = s.data() + s.size();
  auto rw = std::from_chars(begin, begin + x, w);
  auto rh = std::from_chars(begin + x + 1, end, h);
  if (rw.ec != std::errc() || rw.ptr != begin + x || rh.ec != std::errc() || rh.ptr != end) throw bad;
  return {w, h};
}

std::string slug(std::string s) {
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '-';
  std::string out;
  for (char c : s)
    if (!(c == '-' && (out.empty() || out.back() == '-'))) out.push_back(char(std::tolower(c)));
  while (!out.empty() && out.back() == '-') out.pop_back();
  return out;
}

// One run's numbers: a `zimage bench` file holds {"results": [...]}, a `generate --perf-dump-path`
// file is one result.
std::vector<nlohmann::json> load_results(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(ErrorKind::NotFound, "cannot read '" + path + "'");
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw Error(ErrorKind::Format, path + ": not a JSON object");
  if (j.contains("results") && j["results"].is_array()) return j["results"].get<std::vector<nlohmann::json>>();
  return {j};
}

// Side by side, stage by stage, as SGLang's compare_perf prints two perf dumps.
void print_comparison(const nlohmann::json& a, const nlohmann::json& b) {
  auto row = [](const std::string& name, const nlohmann::json& va, const nlohmann::json& vb) {
    if (!va.is_number() || !vb.is_number()) return;
    double x = va.get<double>(), y = vb.get<double>();
    std::printf("  %-24s %12.2f %12.2f %+12.2f %+8.1f%%\n", name.c_str(), x, y, y - x, x != 0 ? 100 * (y - x) / x : 0.0);
  };
  std::printf("%s  (A: %s, B: %s)\n", a.value("resolution", std::string("?")).c_str(), a.value("device", std::string("?")).c_str(),
              b.value("device", std::string("?")).c_str());
  std::printf("  %-24s %12s %12s %12s %9s\n", "", "A", "B", "B - A", "");
  for (const char* k : {"e2e_ms", "text_encoder_ms", "vae_encode_ms", "denoise_ms", "dit_forward_ms", "vae_decode_ms",
                        "to_uint8_ms", "png_encode_ms", "peak_gpu_mib", "load_s", "first_image_s"})
    if (a.contains(k) && b.contains(k)) row(k, a[k], b[k]);
  auto steps_of = [](const nlohmann::json& r, const char* list) {
    std::map<std::string, nlohmann::json> out;
    if (!r.contains("stages") || !r["stages"].contains(list)) return out;
    for (const auto& s : r["stages"][list])
      out[s.contains("name") ? s["name"].get<std::string>() : "step " + std::to_string(s["step"].get<int>())] = s["duration_ms"];
    return out;
  };
  for (const char* list : {"steps", "denoise_steps_ms"}) {
    auto sa = steps_of(a, list), sb = steps_of(b, list);
    for (const auto& [name, v] : sa)
      if (sb.count(name)) row(name, v, sb[name]);
  }
}

struct BenchOptions {
  std::string model = "synthetic:turbo", label = "bench", out_dir = "bench/results";
  std::string prompt = "A futuristic cyberpunk city at night, neon lights reflecting on wet streets";
  std::string negative_prompt;
  ComponentFiles files;
  std::vector<std::string> resolutions = {"512x512", "1024x1024", "2048x2048"};
  std::optional<int> steps;
  std::optional<float> guidance;
  int runs = 5, batch = 1;
  bool profile = false;
  std::vector<std::string> compare;
  DeviceOptions device;
  std::string image, mask;  // image to image / inpainting: resized to each resolution
  std::optional<double> strength;
  ControlNetFlags controlnet;
  QuantizationFlags quantization;
  std::string control_image;  // default with --controlnet: a synthetic edge-like pattern
  float controlnet_scale = 0.75f;
};

// A stand-in control image (thin lines on black, as a canny map): what the ControlNet's cost does not
// depend on, so a benchmark needs no file.
ImageU8 pattern_control_image(int width, int height) {
  ImageU8 im;
  im.width = width;
  im.height = height;
  im.rgb.assign(size_t(width) * size_t(height) * 3, 0);
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x)
      if (x % 64 == 0 || y % 64 == 0 || (x + y) % 97 == 0)
        for (int c = 0; c < 3; ++c) im.rgb[(size_t(y) * size_t(width) + size_t(x)) * 3 + size_t(c)] = 255;
  return im;
}

// ||a - b|| / ||b|| over all values (float32 host tensors of one shape), in double.
double relative_l2(const Tensor& a, const Tensor& b) {
  ZI_ASSERT(a.shape() == b.shape());
  const Tensor fa = a.to_f32(), fb = b.to_f32();
  double num = 0, den = 0;
  for (int64_t i = 0; i < fa.numel(); ++i) {
    const double d = double(fa.f32()[i]) - double(fb.f32()[i]);
    num += d * d;
    den += double(fb.f32()[i]) * double(fb.f32()[i]);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Peak signal-to-noise ratio of two uint8 images of one shape, 10 log10(255^2 / MSE) (inf when equal).
double psnr_db(const Tensor& a, const Tensor& b) {
  ZI_ASSERT(a.shape() == b.shape() && a.dtype() == DType::U8 && b.dtype() == DType::U8);
  const uint8_t *pa = a.data_as<uint8_t>(), *pb = b.data_as<uint8_t>();
  double se = 0;
  for (int64_t i = 0; i < a.numel(); ++i) se += double(int(pa[i]) - int(pb[i])) * double(int(pa[i]) - int(pb[i]));
  return se == 0 ? std::numeric_limits<double>::infinity() : 10.0 * std::log10(255.0 * 255.0 * double(a.numel()) / se);
}

}  // namespace

Command add_bench(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "bench", "Benchmark text-to-image or image-to-image (warm-up, median of runs, per stage) and write JSON");
  auto o = std::make_shared<BenchOptions>();
  cmd->add_option("--model,--model-path", o->model, "Model folder or synthetic:tiny|turbo (default synthetic:turbo)");
  add_component_flags(cmd, o->files);
  cmd->add_option("--resolutions", o->resolutions, "WIDTHxHEIGHT list (default 512x512 1024x1024 2048x2048)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
      ->delimiter(',');
  cmd->add_option("--prompt", o->prompt, "Prompt");
  cmd->add_option("--negative-prompt", o->negative_prompt, "Negative prompt (CFG)");
  cmd->add_option("--num-inference-steps", o->steps, "Steps (default: the model's)");
  cmd->add_option("--guidance-scale", o->guidance, "CFG scale (default: the model's)");
  cmd->add_option("--runs", o->runs, "Timed runs per resolution (at least 5 for reported numbers)")->check(CLI::PositiveNumber);
  cmd->add_option("--batch", o->batch, "Images per prompt")->check(CLI::PositiveNumber);
  add_device_options(cmd, o->device);
  cmd->add_option("--image", o->image, "Benchmark image-to-image from this init image (resized to each resolution)");
  cmd->add_option("--mask", o->mask, "With --image: benchmark inpainting with this mask (white = repaint)");
  cmd->add_option("--strength", o->strength,
                  "With --image: share of the schedule run, in (0, 1] (default 0.6; 1 with --mask)");
  add_controlnet_flags(cmd, o->controlnet);
  add_quantization_flags(cmd, o->quantization);
  cmd->add_option("--control-image", o->control_image,
                  "With --controlnet: the control image (default: a generated line pattern at each resolution)");
  cmd->add_option("--controlnet-scale", o->controlnet_scale, "With --controlnet: the conditioning scale");
  cmd->add_option("--label", o->label, "Label in the result file name");
  cmd->add_flag("--profile", o->profile, "After the timed runs, one more run with per-op device times (CUDA)");
  cmd->add_option("--output-dir", o->out_dir, "Folder for the JSON result");
  cmd->add_option("--compare", o->compare, "Compare two result files (A.json B.json) stage by stage instead of running")
      ->expected(2)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  return {cmd, [o] {
            if (!o->compare.empty()) {
              auto a = load_results(o->compare[0]), b = load_results(o->compare[1]);
              bool any = false;
              for (const auto& ra : a)
                for (const auto& rb : b)
                  if ((a.size() == 1 && b.size() == 1) || ra.value("resolution", "") == rb.value("resolution", "")) {
                    print_comparison(ra, rb);
                    any = true;
                  }
              if (!any) throw Error(ErrorKind::InvalidArgument, "the two files share no resolution to compare");
              return 0;
            }
            std::vector<ImageU8> init_images, masks;
            if (!o->image.empty()) init_images.push_back(read_image(o->image));
            if (!o->mask.empty()) masks.push_back(read_image(o->mask));
            const bool control = !o->controlnet.file.empty();
            const char* kind = masks.empty() ? (init_images.empty() ? "text_to_image" : "image_to_image") : "inpaint";
            if (control) kind = masks.empty() ? "controlnet" : "controlnet_inpaint";
            std::optional<ImageU8> control_file;
            if (!o->control_image.empty()) control_file = read_image(o->control_image);
            auto t_load = Clock::now();
            ModelSource model = open_model(o->model, o->files);
            attach_controlnet(model, o->controlnet);
            const ModelSource unquantized = model;  // --quantization fp8: the bf16 run its accuracy is measured against
            apply_quantization(model, o->quantization);
            const ParallelConfig par = check_device_options(o->device, model);
            PipelineLimits limits;
            limits.max_pixels = int64_t(4096) * 4096;
            // Every resolution and the result folder are checked before the model is loaded.
            std::vector<GenerateRequest> requests;
            for (const auto& res_str : o->resolutions) {
              auto [w, h] = parse_resolution(res_str);
              GenerateRequest req;
              req.prompts = {o->prompt};
              if (!o->negative_prompt.empty()) req.negative_prompts = {o->negative_prompt};
              req.width = w;
              req.height = h;
              req.steps = o->steps;
              req.guidance = o->guidance;
              req.num_images_per_prompt = o->batch;
              req.seed = 42;
              req.images = init_images;
              req.masks = masks;
              req.strength = o->strength;
              if (control) req.control_image = control_file ? *control_file : pattern_control_image(w, h);
              req.controlnet_scale = o->controlnet_scale;
              requests.push_back(resolve_request(req, model, limits));
            }
            prepare_output_file((fs::path(o->out_dir) / "result.json").string(), "--output-dir", /*in_place=*/false);
            model.prefetch_weights();  // the files are read while the device initializes
            Engine engine = make_engine(o->device, par, model, limits);
            ImageGenerator& pipe = *engine.generator;
            Backend* be = &pipe.backend();
            const std::string device = engine.device();
            engine.synchronize();  // uploads are asynchronous: the load ends when the last one has landed
            double load_s = std::chrono::duration<double>(Clock::now() - t_load).count();
            log_info("loaded " + model.name + " on " + device + " in " + std::to_string(load_s) + " s");

            nlohmann::json results = nlohmann::json::array();
            std::vector<GenerateResult> seed_results;  // the warm-up run of each resolution (seed 42)
            bool first = true;
            for (GenerateRequest req : requests) {
              const int w = req.width, h = req.height;
              req = pipe.resolve(req);

              GenerateResult warm = pipe.generate(req);  // warm-up: plans, algorithms, allocator cache
              seed_results.push_back(warm);
              double first_image_s = std::chrono::duration<double>(Clock::now() - kProcessStart).count();
              be->reset_peak_memory();
              std::vector<double> e2e, te, enc, den, dit, vae, u8, png;
              std::vector<std::vector<double>> steps;
              for (int r = 0; r < o->runs; ++r) {
                auto t0 = Clock::now();
                GenerateResult g = pipe.generate(req);
                e2e.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
                te.push_back(g.times.text_encoder_ms);
                enc.push_back(g.times.vae_encode_ms);
                den.push_back(g.times.denoise_ms);
                dit.push_back(median(g.times.dit_ms));
                vae.push_back(g.times.vae_decode_ms);
                u8.push_back(g.times.to_u8_ms);
                steps.push_back(g.times.step_ms);
                auto tp = Clock::now();
                encode_image(tensor_to_image(g.images.narrow0(0, 1).reshape({h, w, 3})), ImageFormat::Png);
                png.push_back(std::chrono::duration<double, std::milli>(Clock::now() - tp).count());
              }
              nlohmann::json steps_ms = nlohmann::json::array();
              for (size_t i = 0; i < steps[0].size(); ++i) {
                std::vector<double> v;
                for (const auto& s : steps) v.push_back(s[i]);
                steps_ms.push_back({{"step", i}, {"duration_ms", median(v)}});
              }
              MemoryStats mem = be->memory_stats();
              nlohmann::json op_profile = nlohmann::json::array();
              if (o->profile) {
                be->set_op_profiling(true);
                pipe.generate(req);
                be->set_op_profiling(false);
                double total = 0;
                auto ops = be->take_op_profile();
                for (const auto& t : ops) total += t.ms;
                std::printf("per-op device time, one generation at %dx%d (%.1f ms in ops):\n", w, h, total);
                for (const auto& t : ops) {
                  std::printf("  %-28s %6lld calls %9.2f ms %5.1f%%\n", t.op.c_str(), (long long)t.calls, t.ms, 100 * t.ms / total);
                  op_profile.push_back({{"op", t.op}, {"calls", t.calls}, {"ms", t.ms}});
                }
              }
              nlohmann::json r = {
                  {"device", device},
                  {"num_gpus", par.num_gpus},
                  {"ulysses_degree", par.ulysses_degree},
                  {"ring_degree", par.ring_degree},
                  {"cfg_parallel", par.cfg_parallel},
                  {"commit", git_commit()},
                  {"model", model.name},
                  {"resolution", std::to_string(w) + "x" + std::to_string(h)},
                  {"kind", kind},
                  {"strength", req.strength ? nlohmann::json(*req.strength) : nlohmann::json(nullptr)},
                  {"controlnet", control ? nlohmann::json(model.controlnet->name) : nlohmann::json(nullptr)},
                  {"controlnet_scale", control ? nlohmann::json(req.controlnet_scale) : nlohmann::json(nullptr)},
                  {"quantization", o->quantization.mode},
                  {"steps", warm.steps},
                  {"steps_run", warm.steps_run},
                  {"guidance_scale", warm.guidance},
                  {"batch", o->batch},
                  {"runs", o->runs},
                  {"e2e_ms", median(e2e)},
                  {"text_encoder_ms", median(te)},
                  {"vae_encode_ms", median(enc)},
                  {"denoise_ms", median(den)},
                  {"dit_forward_ms", median(dit)},
                  {"vae_decode_ms", median(vae)},
                  {"to_uint8_ms", median(u8)},
                  {"png_encode_ms", median(png)},
                  {"peak_gpu_mib", double(mem.peak) / (1 << 20)},
                  {"load_s", load_s},
                  {"first_image_s", first ? nlohmann::json(first_image_s) : nlohmann::json(nullptr)},
                  {"stages",
                   {{"steps",
                     {{{"name", "text_encoder"}, {"duration_ms", median(te)}},
                      {{"name", "vae_encode"}, {"duration_ms", median(enc)}},
                      {{"name", "denoise"}, {"duration_ms", median(den)}},
                      {{"name", "vae_decode"}, {"duration_ms", median(vae)}},
                      {{"name", "to_uint8"}, {"duration_ms", median(u8)}}}},
                    {"denoise_steps_ms", steps_ms}}},
              };
              if (o->profile) r["op_profile"] = op_profile;
              first = false;
              std::printf(
                  "%s %s: e2e %.1f ms, text encoder %.2f ms, VAE encode %.2f ms, DiT %.2f ms/forward, VAE decode "
                  "%.2f ms, peak %.0f MiB\n",
                  device.c_str(), r["resolution"].get<std::string>().c_str(), median(e2e), median(te), median(enc),
                  median(dit), median(vae), double(mem.peak) / (1 << 20));
              results.push_back(r);
            }
            if (o->quantization.fp8()) {
              // Accuracy beside the speed: the same requests and seed through the bf16 model, loaded after the
              // FP8 one is gone (so the peaks above are the FP8 model's alone).
              { Engine gone = std::move(engine); }  // destroyed in its members' order
              Engine reference = make_engine(o->device, par, unquantized, limits);
              for (size_t i = 0; i < requests.size(); ++i) {
                const GenerateResult bf16 = reference.generator->generate(reference.generator->resolve(requests[i]));
                const double rel = relative_l2(seed_results[i].latents, bf16.latents);
                const double psnr = psnr_db(seed_results[i].images, bf16.images);
                results[i]["vs_bf16_latent_rel"] = rel;
                results[i]["vs_bf16_psnr_db"] = psnr;
                std::printf("%s FP8 vs bf16 (seed 42): final latents relative L2 %.4f, image PSNR %.2f dB\n",
                            results[i]["resolution"].get<std::string>().c_str(), rel, psnr);
              }
            }
            std::time_t now = std::time(nullptr);
            char date[16];
            std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
            std::string path = (fs::path(o->out_dir) / (slug(device) + "-" + date + "-" + slug(o->label) + ".json")).string();
            write_text_file(path, nlohmann::json{{"results", results}}.dump(2) + "\n");
            std::printf("wrote %s\n", path.c_str());
            return 0;
          }};
}

}  // namespace zimage::cli
