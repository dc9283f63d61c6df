#include "parallel/cfg_parallel.h"

#include "core/error.h"

namespace zimage {

Tensor cfg_parallel_forward(Backend& be, Communicator& comm, const Tensor& latents, const std::vector<float>& t,
                            const std::vector<Tensor>& caps, const BatchForward& forward) {
  const int64_t n = latents.dim(0), half = n / 2, branch = comm.rank();
  ZI_ASSERT(comm.size() == 2 && n % 2 == 0 && int64_t(t.size()) == n && int64_t(caps.size()) == n);
  std::vector<float> t_half(t.begin() + branch * half, t.begin() + (branch + 1) * half);
  std::vector<Tensor> caps_half(caps.begin() + branch * half, caps.begin() + (branch + 1) * half);
  Tensor mine = forward(latents.narrow0(branch * half, half), t_half, caps_half);
  Shape whole = mine.shape();
  whole[0] = n;
  Tensor all = be.empty(whole, mine.dtype());
  comm.all_gather(mine, all);  // [positives' output | negatives' output]
  return all;
}

}  // namespace zimage
