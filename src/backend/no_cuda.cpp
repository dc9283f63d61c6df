// Builds without the CUDA backend (ZIMAGE_CUDA=OFF): the GPU entry points say so clearly.
#ifndef ZIMAGE_WITH_CUDA
#include "backend/backend.h"
#include "core/error.h"

namespace zimage {

int cuda_device_count() { return 0; }

std::unique_ptr<Backend> make_cuda_backend(int) {
  throw Error(ErrorKind::InvalidArgument, "this build of zimage has no CUDA backend (rebuild with -DZIMAGE_CUDA=ON)");
}

}  // namespace zimage
#endif
