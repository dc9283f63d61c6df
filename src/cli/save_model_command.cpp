// `zimage save-model`: writes a model (a built-in synthetic one, or a folder re-sharded) as a
// diffusers-layout folder with bf16 safetensors shards, so that loading can be measured on real files;
// or, with --format comfyui|gguf, its diffusion model as one ComfyUI / ComfyUI-GGUF file, optionally
// quantized (FP8, Q8_0, Q4_K), as users have them.
#include <chrono>
#include <cstdio>
#include <limits>

#include "cli/commands.h"
#include "core/error.h"
#include "model/save_model.h"

namespace zimage::cli {

namespace {

// "5000000000", "5GB", "500MB", "64KiB", "4GiB": bytes, with decimal (KB, MB, GB) or binary units.
uint64_t parse_size(const std::string& text) {
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  const std::string unit = text.substr(digits);
  const std::pair<const char*, uint64_t> units[] = {{"", 1},
                                                    {"B", 1},
                                                    {"KB", 1000},
                                                    {"MB", 1000000},
                                                    {"GB", 1000000000},
                                                    {"KiB", 1ull << 10},
                                                    {"MiB", 1ull << 20},
                                                    {"GiB", 1ull << 30}};
  for (const auto& [name, scale] : units) {
    if (digits == 0 || digits > 15 || unit != name) continue;
    uint64_t n = std::stoull(text.substr(0, digits));
    if (n > 0 && n <= std::numeric_limits<uint64_t>::max() / scale) return n * scale;
  }
  throw Error(ErrorKind::InvalidArgument, "--shard-size '" + text +
                                              "' is not a positive size (bytes, or a whole number with KB, MB, GB, "
                                              "KiB, MiB or GiB)");
}

}  // namespace

Command add_save_model(CLI::App& app) {
  auto* cmd = app.add_subcommand("save-model",
                                 "Write a model as a diffusers-layout folder of bf16 safetensors shards, or its "
                                 "diffusion model as one ComfyUI / GGUF file (bf16, FP8, Q8_0, Q4_K)");
  cmd->footer(
      "The folder is laid out as Tongyi-MAI/Z-Image-Turbo: model_index.json, transformer/, text_encoder/, vae/,\n"
      "scheduler/, tokenizer/, weights as <stem>-0000k-of-0000n.safetensors with <stem>.safetensors.index.json.\n"
      "model_index.json records the model's recipe (steps, guidance), so the folder generates as its source did.\n"
      "Example: zimage save-model --model synthetic:turbo --out /data/zimage-turbo   (20.3 GB: time real loads)\n"
      "         zimage save-model --model synthetic:turbo --format gguf --quantize q8_0 --out /data/dit-q8_0.gguf\n"
      "         (the diffusion model alone; run it with --diffusion-model FILE beside --model for the rest)");
  struct Opts {
    std::string model, out, shard_size, format = "diffusers", quantize = "none";
    bool force = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model,--model-path", o->model, "Model folder or synthetic:tiny|turbo")->required();
  cmd->add_option("--out", o->out, "Folder to write (absent or empty)")->required();
  cmd->add_option("--shard-size", o->shard_size,
                  "Largest shard, e.g. 2GB or 500MiB (default: as the real checkpoint, 5 GB for the transformer, "
                  "4 GB for the text encoder, one VAE file)");
  cmd->add_flag("--force", o->force,
                "Replace a model folder already at --out (its model_index.json and component folders), or the file");
  cmd->add_option("--format", o->format,
                  "diffusers (a model folder), comfyui (the diffusion model as one ComfyUI .safetensors file) or "
                  "gguf (the diffusion model as one ComfyUI-GGUF .gguf file)")
      ->check(CLI::IsMember({"diffusers", "comfyui", "gguf"}));
  cmd->add_option("--quantize", o->quantize,
                  "none (bf16), fp8 (comfyui: scaled float8_e4m3fn), q8_0 or q4_k (gguf)")
      ->check(CLI::IsMember({"none", "fp8", "q8_0", "q4_k"}));
  return {cmd, [o] {
            if (o->format != "diffusers") {
              if (!o->shard_size.empty())
                throw Error(ErrorKind::InvalidArgument, "--shard-size is for --format diffusers (a model folder)");
              const DitQuantization q = o->quantize == "fp8"    ? DitQuantization::Fp8
                                        : o->quantize == "q8_0" ? DitQuantization::Q8_0
                                        : o->quantize == "q4_k" ? DitQuantization::Q4_K
                                                                : DitQuantization::None;
              auto t0 = std::chrono::steady_clock::now();
              ModelSource model = open_model(o->model);
              SavedDiffusionModel saved = save_diffusion_model(
                  model, o->out, o->format == "gguf" ? DitFileFormat::Gguf : DitFileFormat::ComfyUi, q, o->force);
              double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
              std::printf("wrote %s: %lld tensors (%lld %s), %.2f GB in %.1f s\n", o->out.c_str(),
                          (long long)saved.tensors, (long long)saved.quantized, o->quantize.c_str(),
                          double(saved.bytes) / 1e9, s);
              return 0;
            }
            if (o->quantize != "none")
              throw Error(ErrorKind::InvalidArgument, "--quantize writes one diffusion model file: give --format "
                                                      "comfyui (fp8) or gguf (q8_0, q4_k)");
            SaveModelOptions opts;
            if (!o->shard_size.empty()) opts.shard_bytes = parse_size(o->shard_size);
            opts.overwrite = o->force;
            auto t0 = std::chrono::steady_clock::now();
            ModelSource model = open_model(o->model);
            SavedModel saved = save_model(model, o->out, opts);
            double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            std::printf("wrote %s: %zu files, %.2f GB of bf16 weights in %.1f s (%.2f GB/s)\n", o->out.c_str(),
                        saved.files.size(), double(saved.weight_bytes) / 1e9, s, double(saved.weight_bytes) / 1e9 / s);
            return 0;
          }};
}

}  // namespace zimage::cli
