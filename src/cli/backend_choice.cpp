#include "cli/commands.h"
#include "core/error.h"

namespace zimage::cli {

std::unique_ptr<Backend> make_backend(const std::string& which) {
  if (which == "cpu" || which == "auto") return make_cpu_backend();
  if (which == "cuda")
    throw Error(ErrorKind::InvalidArgument, "the CUDA backend is not part of this build yet; use --backend cpu");
  throw Error(ErrorKind::InvalidArgument, "unknown backend '" + which + "' (use cpu, cuda or auto)");
}

}  // namespace zimage::cli
