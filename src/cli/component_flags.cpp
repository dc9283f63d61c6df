#include "cli/component_flags.h"

#include "core/error.h"
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

}  // namespace zimage::cli
