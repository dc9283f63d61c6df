#include "cli/component_flags.h"

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

}  // namespace zimage::cli
