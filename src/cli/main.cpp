// zimage: text-to-image with Z-Image. `zimage <command> --help` lists each command's flags.
#include <cstdio>

#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"

int main(int argc, char** argv) {
  CLI::App app{"zimage: fast Z-Image inference (Z-Image-Turbo and Z-Image) on CPU and CUDA"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "zimage 0.1.0");
  const zimage::cli::Command commands[] = {
      zimage::cli::add_generate(app),
      zimage::cli::add_tokenize(app),
      zimage::cli::add_encode_prompt(app),
      zimage::cli::add_bench(app),
      zimage::cli::add_serve(app),
      zimage::cli::add_save_model(app),
  };
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
    zimage::log(zimage::LogLevel::Error, e.what());
    switch (e.kind()) {
      case zimage::ErrorKind::InvalidArgument:
      case zimage::ErrorKind::NotFound:
      case zimage::ErrorKind::Format: return 2;
      default: return 1;
    }
  } catch (const std::exception& e) {
    zimage::log(zimage::LogLevel::Error, e.what());
    return 1;
  }
  return 0;
}
