// zimage: text-to-image with Z-Image. `zimage <command> --help` lists each command's flags.
#include <cstdio>
#include <sstream>

#include "cli/commands.h"
#include "cli/version.h"
#include "core/error.h"
#include "core/log.h"
#include "model/model_source.h"
#include "pipeline/request_limits.h"

namespace {

// Every option of every command that takes one value refuses a second (`--seed 1 --seed 2` is exit 2):
// a wrapper script that appends a flag the user also gave must not silently change the image. Options
// that collect values (--prompt, --negative-prompt, --resolutions) are vectors, which this leaves alone.
void forbid_repeated_values(CLI::App& app) {
  for (CLI::Option* opt : app.get_options())
    if (opt->get_type_size_max() == 1 && opt->get_expected_max() == 1)  // one value (flags have none)
      opt->multi_option_policy(CLI::MultiOptionPolicy::Throw);
  for (CLI::App* sub : app.get_subcommands({})) forbid_repeated_values(*sub);
}

// CLI11's "--seed: At Most 1 required but received 2" in words a user reads.
std::string parse_failure(const CLI::App* app, const CLI::Error& e) {
  std::string what = e.what();
  const std::string marker = ": At Most 1 required but received ";
  if (auto at = what.find(marker); at != std::string::npos)
    what = what.substr(0, at) + " takes one value but was given " + what.substr(at + marker.size()) +
           " times (give each option once)";
  return zimage::escape_for_message(what) + "\nRun with " + app->get_help_ptr()->get_name() +
         " for more information.\n";
}

// "zimage 0.1.0 (commit 1a2b3c4d5e6f)" and where the data files are looked up.
std::string version_text() {
  return zimage::cli::software_name() + " (commit " + zimage::cli::git_commit() + ")\ndata: " + zimage::assets_dir();
}

// An error message may quote a file's contents or a path: never send raw invalid bytes or control
// characters to the terminal or the log.
void log_error(const std::string& message) {
  std::istringstream lines(message);
  std::string out;
  for (std::string line; std::getline(lines, line);)
    out += (out.empty() ? "" : "\n") + zimage::escape_for_message(line);
  zimage::log(zimage::LogLevel::Error, out);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"zimage: fast Z-Image inference (Z-Image-Turbo and Z-Image) on CPU and CUDA"};
  app.require_subcommand(1);
  app.set_version_flag("--version", version_text, "Print the version, the commit and the data folder, and exit");
  app.failure_message(parse_failure);
  const zimage::cli::Command commands[] = {
      zimage::cli::add_generate(app),
      zimage::cli::add_tokenize(app),
      zimage::cli::add_encode_prompt(app),
      zimage::cli::add_bench(app),
      zimage::cli::add_serve(app),
      zimage::cli::add_save_model(app),
  };
  forbid_repeated_values(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  try {
    for (const auto& c : commands)
      if (c.app->parsed()) return c.run();
  } catch (const zimage::Error& e) {
    log_error(e.what());
    switch (e.kind()) {
      case zimage::ErrorKind::InvalidArgument:
      case zimage::ErrorKind::NotFound:
      case zimage::ErrorKind::Format: return 2;
      default: return 1;
    }
  } catch (const std::exception& e) {
    log_error(e.what());
    return 1;
  }
  return 0;
}
