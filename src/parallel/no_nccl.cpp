// Builds without CUDA: no NCCL (the CPU backend simulates ranks with LocalWorld instead).
#include "core/error.h"
#include "parallel/nccl_communicator.h"

namespace zimage {

std::unique_ptr<RankWorld> make_nccl_world(const std::vector<int>&, const std::vector<Backend*>&) {
  throw Error(ErrorKind::InvalidArgument, "this build has no CUDA, so no NCCL: several GPUs need a CUDA build");
}

}  // namespace zimage
