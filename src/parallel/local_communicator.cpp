#include "parallel/local_communicator.h"

#include <cstring>
#include <thread>

#include "core/error.h"

namespace zimage {

class LocalGroup::Rank final : public Communicator {
 public:
  Rank(LocalGroup& g, int rank) : g_(g), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_.size_; }
  void all_to_all(const Tensor& send, Tensor& recv) override { g_.collective(rank_, Op::AllToAll, send, recv); }
  void all_gather(const Tensor& send, Tensor& recv) override { g_.collective(rank_, Op::AllGather, send, recv); }

 private:
  LocalGroup& g_;
  int rank_;
};

LocalGroup::LocalGroup(int size) : size_(size), slots_(size_t(size)) { ZI_ASSERT(size >= 1); }

LocalGroup::~LocalGroup() = default;

void LocalGroup::fail(std::exception_ptr e) {
  if (!error_) error_ = e;
  cv_.notify_all();
}

void LocalGroup::run(const std::function<void(Communicator&)>& fn) {
  {
    std::lock_guard<std::mutex> l(mu_);
    turn_ = 0;
    arrived_ = 0;
    error_ = nullptr;
  }
  std::vector<std::thread> threads;
  for (int r = 0; r < size_; ++r)
    threads.emplace_back([this, r, &fn] {
      Rank comm(*this, r);
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return turn_ == r || error_; });
        if (error_) return;
      }
      try {
        fn(comm);
      } catch (...) {
        std::lock_guard<std::mutex> l(mu_);
        fail(std::current_exception());
        return;
      }
      std::lock_guard<std::mutex> l(mu_);
      // Ranks before this one wait in a collective that this rank will never join.
      if (arrived_ > 0)
        fail(std::make_exception_ptr(
            Error(ErrorKind::Internal,
                  "local group: rank " + std::to_string(r) + " returned while other ranks wait in a collective")));
      turn_ = r + 1;
      cv_.notify_all();
    });
  for (auto& t : threads) t.join();
  if (error_) std::rethrow_exception(error_);
}

void LocalGroup::collective(int rank, Op op, const Tensor& send, Tensor& recv) {
  std::unique_lock<std::mutex> l(mu_);
  auto failed = [&] { return Error(ErrorKind::Internal, "local group: another rank failed"); };
  if (error_) throw failed();
  ZI_ASSERT(turn_ == rank);
  slots_[size_t(rank)] = {op, &send, &recv};
  if (++arrived_ == size_) {
    try {
      exchange();
    } catch (...) {
      fail(std::current_exception());
      throw;
    }
    arrived_ = 0;
    ++generation_;
    turn_ = 0;
    cv_.notify_all();
    cv_.wait(l, [&] { return turn_ == rank || error_; });
  } else {
    uint64_t g = generation_;
    turn_ = rank + 1;
    cv_.notify_all();
    cv_.wait(l, [&] { return (generation_ != g && turn_ == rank) || error_; });
  }
  if (error_) throw failed();
}

void LocalGroup::exchange() {
  const Slot& first = slots_[0];
  for (const Slot& s : slots_) {
    ZI_CHECK(s.op == first.op && s.send->nbytes() == first.send->nbytes() && s.recv->nbytes() == first.recv->nbytes(),
             ErrorKind::Internal, "local group: the ranks called different collectives");
    ZI_CHECK(s.send->device() == Device::Host && s.recv->device() == Device::Host && s.send->is_contiguous() &&
                 s.recv->is_contiguous() && s.send->dtype() == s.recv->dtype(),
             ErrorKind::Internal, "local group: collectives need contiguous host tensors of one dtype");
  }
  const size_t n = size_t(size_);
  if (first.op == Op::AllToAll) {
    ZI_ASSERT(first.send->nbytes() == first.recv->nbytes() && first.send->nbytes() % n == 0);
    size_t chunk = first.send->nbytes() / n;
    for (size_t dst = 0; dst < n; ++dst)
      for (size_t src = 0; src < n; ++src)
        std::memcpy(static_cast<char*>(slots_[dst].recv->data()) + src * chunk,
                    static_cast<const char*>(slots_[src].send->data()) + dst * chunk, chunk);
  } else {
    ZI_ASSERT(first.recv->nbytes() == first.send->nbytes() * n);
    size_t chunk = first.send->nbytes();
    for (size_t dst = 0; dst < n; ++dst)
      for (size_t src = 0; src < n; ++src)
        std::memcpy(static_cast<char*>(slots_[dst].recv->data()) + src * chunk, slots_[src].send->data(), chunk);
  }
}

}  // namespace zimage
