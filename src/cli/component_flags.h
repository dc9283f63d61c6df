// The component-file flags of generate, serve and bench (model/component_files.h).
#pragma once

#include <CLI/CLI.hpp>

#include "model/component_files.h"

namespace zimage::cli {

void add_component_flags(CLI::App* cmd, ComponentFiles& files);

}  // namespace zimage::cli
