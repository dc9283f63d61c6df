#include "cli/component_flags.h"

#include "core/error.h"
#include "core/log.h"
#include "model/fp8_linears.h"
#include "model/zimage_controlnet.h"

namespace zimage::cli {

void add_component_flags(CLI::App* cmd, ComponentFiles& files) {
  cmd->add_option("--diffusion-model", files.diffusion_model,
                  "Diffusion model file (diffusers, ComfyUI, FP8 or GGUF; layout from its keys): replaces --model's");
  cmd->add_option("--text-encoder", files.text_encoder, "Qwen3 text encoder file or folder: replaces --model's");
  cmd->add_option("--vae", files.vae, "VAE file (diffusers or BFL ae.safetensors) or folder: replaces --model's");
  cmd->add_option("--recipe", files.recipe,
                  "Steps and guidance of a model made of files: turbo (8 steps, no CFG) or base (50 steps, CFG 5); "
                  "default: turbo when the diffusion model's file name says so")
      ->check(CLI::IsMember({"turbo", "base"}));
}

void add_controlnet_flags(CLI::App* cmd, ControlNetFlags& flags) {
  cmd->add_option("--controlnet", flags.file,
                  "Z-Image ControlNet Union file (diffusers names; v1, v2.0, v2.1 and lite recognised from their "
                  "tensors), or synthetic:v1|v2.0|v2.1|lite (random weights)");
  cmd->add_option("--controlnet-config", flags.config, "The ControlNet's diffusers config.json (other layouts)");
}

void attach_controlnet(ModelSource& model, const ControlNetFlags& flags) {
  if (flags.file.empty()) {
    if (!flags.config.empty()) throw Error(ErrorKind::InvalidArgument, "--controlnet-config needs --controlnet");
    return;
  }
  zimage::attach_controlnet(model, flags.file, flags.config);
}

void add_quantization_flags(CLI::App* cmd, QuantizationFlags& flags) {
  cmd->add_option("--quantization", flags.mode,
                  "none (the weights' own precision; bf16 GEMMs) or fp8: the DiT's linears as FP8 e4m3 GEMMs (W8A8: "
                  "weights per output channel, activations per token; Hopper and newer GPUs, or the CPU reference)")
      ->check(CLI::IsMember({"none", "fp8"}));
  cmd->add_option("--fp8-keep-bf16", flags.keep_bf16,
                  "With --quantization fp8: the linears that stay bf16, as comma-separated patterns over diffusers "
                  "weight names ('*' any text); 'default' names the defaults (" +
                      [] {
                        std::string d;
                        for (const auto& p : Fp8Policy::default_keep_bf16()) d += (d.empty() ? "" : ",") + p;
                        return d;
                      }() +
                      "), 'none' quantizes every linear whose sizes allow it");
}

void apply_quantization(ModelSource& model, const QuantizationFlags& flags) {
  if (!flags.fp8()) {
    ZI_CHECK(flags.keep_bf16.empty(), ErrorKind::InvalidArgument, "--fp8-keep-bf16 needs --quantization fp8");
    return;
  }
  const Fp8Policy policy = flags.keep_bf16.empty() ? Fp8Policy{} : Fp8Policy::parse(flags.keep_bf16);
  std::string kept;
  for (const auto& p : policy.keep_bf16) kept += (kept.empty() ? "" : ", ") + p;
  log_info("FP8 linears (W8A8 e4m3); kept bf16: " + (kept.empty() ? std::string("none") : kept));
  use_fp8_linears(model, policy);
}

}  // namespace zimage::cli
