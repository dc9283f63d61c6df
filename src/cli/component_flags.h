// The component-file flags of generate, serve and bench (model/component_files.h).
#pragma once

#include <CLI/CLI.hpp>

#include "model/component_files.h"

namespace zimage::cli {

void add_component_flags(CLI::App* cmd, ComponentFiles& files);

// --controlnet FILE|synthetic:VARIANT and --controlnet-config JSON (generate, serve, bench).
struct ControlNetFlags {
  std::string file, config;
};
void add_controlnet_flags(CLI::App* cmd, ControlNetFlags& flags);
// Attaches the ControlNet the flags name to `model` (nothing when none is named).
void attach_controlnet(ModelSource& model, const ControlNetFlags& flags);

// --quantization none|fp8 and --fp8-keep-bf16 PATTERN,... (generate, serve, bench).
struct QuantizationFlags {
  std::string mode = "none";
  std::string keep_bf16;  // empty: Fp8Policy's defaults
  bool fp8() const { return mode == "fp8"; }
};
void add_quantization_flags(CLI::App* cmd, QuantizationFlags& flags);
// With --quantization fp8, serves the model's DiT (and ControlNet) linears as FP8 (model/fp8_linears.h): call
// after attach_controlnet.
void apply_quantization(ModelSource& model, const QuantizationFlags& flags);

}  // namespace zimage::cli
