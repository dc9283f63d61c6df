// The collectives that sequence and CFG parallelism need, over backend tensors, among the size()
// ranks of one group. Every rank calls the same collectives in the same order (they block until the
// group has met, or, on a GPU, are queued in stream order). Two implementations: NcclCommunicator
// (one GPU per rank) and LocalCommunicator (ranks simulated in one process with CPU backends, data
// exchanged in memory); the model code sees only this interface.
#pragma once

#include "core/tensor.h"

namespace zimage {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // send and recv: contiguous, same dtype and byte size, divided into size() equal chunks along their
  // bytes (for [U, ...] tensors: along the leading dim). Chunk j of send goes to rank j; chunk s of
  // recv comes from rank s. recv is allocated by the caller on the same backend.
  virtual void all_to_all(const Tensor& send, Tensor& recv) = 0;
  // recv (size() times send's bytes): chunk s is rank s's send.
  virtual void all_gather(const Tensor& send, Tensor& recv) = 0;
  // One step around the ring: recv (send's bytes) is the send of rank (rank() - 1 + size()) % size(),
  // and this rank's send goes to rank (rank() + 1) % size() (ring attention's K/V blocks).
  virtual void ring_shift(const Tensor& send, Tensor& recv) = 0;
};

}  // namespace zimage
