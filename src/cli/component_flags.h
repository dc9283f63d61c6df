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

}  // namespace zimage::cli
