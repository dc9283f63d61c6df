// CFG parallelism: a batched CFG call [positives (B items) | negatives (B items)] split over the two
// ranks of a communicator. Rank g runs items [g*B, (g+1)*B) and the halves are all-gathered, so both
// ranks return what the one-rank call returns: DiT items are independent (each attends only its own
// tokens), so the split changes nothing but the batch size (and float rounding with it: 2e-6 on the
// golden CFG calls on the CPU).
#pragma once

#include <functional>
#include <vector>

#include "backend/backend.h"
#include "parallel/communicator.h"

namespace zimage {

// The DiT call to split: (latents [n, C, h, w], t [n], caption features [n]) -> float32 [n, C, h, w].
// forward_sharded with a sequence-parallel group of its own makes CFG x Ulysses.
using BatchForward =
    std::function<Tensor(const Tensor& latents, const std::vector<float>& t, const std::vector<Tensor>& caps)>;

// comm: the 2 ranks of the CFG split; latents [2B, ...] with the positives first. Returns [2B, ...].
Tensor cfg_parallel_forward(Backend& be, Communicator& comm, const Tensor& latents, const std::vector<float>& t,
                            const std::vector<Tensor>& caps, const BatchForward& forward);

}  // namespace zimage
