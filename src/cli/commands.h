// The `zimage` subcommands. Each registers its flags on the CLI11 app and returns the function that
// runs it; main() maps engine errors to exit codes (2: bad input, 1: anything else).
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <memory>
#include <string>

#include "backend/backend.h"

namespace zimage::cli {

struct Command {
  CLI::App* app;           // the subcommand, to know whether it was chosen
  std::function<int()> run;
};

Command add_generate(CLI::App& app);
Command add_tokenize(CLI::App& app);
Command add_encode_prompt(CLI::App& app);
Command add_bench(CLI::App& app);
Command add_serve(CLI::App& app);
Command add_save_model(CLI::App& app);

// "cpu", "cuda" or "auto" (the GPU when this build has CUDA and a device is present, else the CPU).
std::unique_ptr<Backend> make_backend(const std::string& which);

}  // namespace zimage::cli
