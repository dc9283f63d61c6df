// The `zimage` subcommands. Each registers its flags on the CLI11 app and returns the function that
// runs it; main() maps engine errors to exit codes (2: bad input, 1: anything else).
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <memory>
#include <string>


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

}  // namespace zimage::cli
