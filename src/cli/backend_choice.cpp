#include "cli/commands.h"
#include "core/error.h"

namespace zimage::cli {

std::unique_ptr<Backend> make_backend(const std::string& which) {
  if (which == "cpu") return make_cpu_backend();
  if (which == "cuda") return make_cuda_backend(0);
  if (which == "auto") return cuda_device_count() > 0 ? make_cuda_backend(0) : make_cpu_backend();
  throw Error(ErrorKind::InvalidArgument, "unknown backend '" + which + "' (use cpu, cuda or auto)");
}

}  // namespace zimage::cli
