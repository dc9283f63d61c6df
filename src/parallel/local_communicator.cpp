#include "parallel/local_communicator.h"

#include <cstring>
#include <thread>

#include "core/error.h"

namespace zimage {

struct LocalWorld::Group {
  struct Slot {
    Op op = Op::AllToAll;
    const Tensor* send = nullptr;
    Tensor* recv = nullptr;
  };
  std::vector<int> members;  // world ranks
  std::vector<Slot> slots;   // per member, for the collective being gathered
  int arrived = 0;
  uint64_t generation = 0;  // collectives completed

  void exchange() const;
};

class LocalWorld::Member final : public Communicator {
 public:
  Member(LocalWorld& w, std::shared_ptr<Group> g, int index) : w_(w), g_(std::move(g)), index_(index) {}
  int rank() const override { return index_; }
  int size() const override { return int(g_->members.size()); }
  void all_to_all(const Tensor& send, Tensor& recv) override { w_.collective(*g_, index_, Op::AllToAll, send, recv); }
  void all_gather(const Tensor& send, Tensor& recv) override { w_.collective(*g_, index_, Op::AllGather, send, recv); }
  void ring_shift(const Tensor& send, Tensor& recv) override { w_.collective(*g_, index_, Op::RingShift, send, recv); }

 private:
  LocalWorld& w_;
  std::shared_ptr<Group> g_;
  int index_;
};

LocalWorld::LocalWorld(int size) : size_(size) { ZI_ASSERT(size >= 1); }

LocalWorld::~LocalWorld() = default;

std::vector<std::unique_ptr<Communicator>> LocalWorld::make_group(const std::vector<int>& members) {
  ZI_ASSERT(!members.empty());
  for (int r : members) ZI_ASSERT(r >= 0 && r < size_);
  auto g = std::make_shared<Group>();
  g->members = members;
  g->slots.resize(members.size());
  std::lock_guard<std::mutex> l(mu_);
  groups_.push_back(g);
  std::vector<std::unique_ptr<Communicator>> out;
  for (size_t i = 0; i < members.size(); ++i) out.push_back(std::make_unique<Member>(*this, g, int(i)));
  return out;
}

void LocalWorld::fail(std::exception_ptr e) {
  if (!error_) error_ = e;
  cv_.notify_all();
}

void LocalWorld::take_baton(std::unique_lock<std::mutex>& l, int rank) {
  cv_.wait(l, [&] { return baton_ == -1 || error_; });
  if (!error_) baton_ = rank;
}

void LocalWorld::give_baton() {
  baton_ = -1;
  cv_.notify_all();
}

void LocalWorld::check_stuck() {
  if (live_ > 0 && blocked_ == live_ && !error_)
    fail(std::make_exception_ptr(Error(
        ErrorKind::Internal, "local world: every rank waits in a collective that no other rank will join "
                             "(the ranks called different collectives, or one returned early)")));
}

void LocalWorld::run(const std::function<void(int)>& fn) {
  {
    std::lock_guard<std::mutex> l(mu_);
    baton_ = -1;
    live_ = size_;
    blocked_ = 0;
    error_ = nullptr;
    for (auto& g : groups_) g->arrived = 0;  // a failed run may have left collectives half gathered
  }
  std::vector<std::thread> threads;
  for (int r = 0; r < size_; ++r)
    threads.emplace_back([this, r, &fn] {
      {
        std::unique_lock<std::mutex> l(mu_);
        take_baton(l, r);
        if (error_) {
          --live_;
          return;
        }
      }
      try {
        fn(r);
      } catch (...) {
        std::lock_guard<std::mutex> l(mu_);
        fail(std::current_exception());
        --live_;
        give_baton();
        return;
      }
      std::lock_guard<std::mutex> l(mu_);
      --live_;
      give_baton();
      check_stuck();
    });
  for (auto& t : threads) t.join();
  if (error_) std::rethrow_exception(error_);
}

void LocalWorld::collective(Group& g, int member, Op op, const Tensor& send, Tensor& recv) {
  std::unique_lock<std::mutex> l(mu_);
  auto failed = [] { return Error(ErrorKind::Internal, "local world: another rank failed"); };
  if (error_) throw failed();
  const int rank = g.members[size_t(member)];
  ZI_ASSERT(baton_ == rank);
  g.slots[size_t(member)] = {op, &send, &recv};
  const int n = int(g.members.size());
  if (++g.arrived == n) {
    try {
      g.exchange();
    } catch (...) {
      fail(std::current_exception());
      throw;
    }
    g.arrived = 0;
    ++g.generation;
    blocked_ -= n - 1;  // the other members may go on; this rank keeps the baton
    cv_.notify_all();
  } else {
    const uint64_t gen = g.generation;
    ++blocked_;
    give_baton();
    check_stuck();
    cv_.wait(l, [&] { return g.generation != gen || error_; });
    if (error_) throw failed();
    take_baton(l, rank);
  }
  if (error_) throw failed();
}

void LocalWorld::Group::exchange() const {
  const Slot& first = slots[0];
  for (const Slot& s : slots) {
    ZI_CHECK(s.op == first.op && s.send->nbytes() == first.send->nbytes() && s.recv->nbytes() == first.recv->nbytes(),
             ErrorKind::Internal, "local world: the ranks of a group called different collectives");
    ZI_CHECK(s.send->device() == Device::Host && s.recv->device() == Device::Host && s.send->is_contiguous() &&
                 s.recv->is_contiguous() && s.send->dtype() == s.recv->dtype(),
             ErrorKind::Internal, "local world: collectives need contiguous host tensors of one dtype");
  }
  const size_t n = slots.size();
  if (first.op == Op::AllToAll) {
    ZI_ASSERT(first.send->nbytes() == first.recv->nbytes() && first.send->nbytes() % n == 0);
    size_t chunk = first.send->nbytes() / n;
    for (size_t dst = 0; dst < n; ++dst)
      for (size_t src = 0; src < n; ++src)
        std::memcpy(static_cast<char*>(slots[dst].recv->data()) + src * chunk,
                    static_cast<const char*>(slots[src].send->data()) + dst * chunk, chunk);
  } else if (first.op == Op::RingShift) {
    ZI_ASSERT(first.send->nbytes() == first.recv->nbytes());
    for (size_t dst = 0; dst < n; ++dst)
      std::memcpy(slots[dst].recv->data(), slots[(dst + n - 1) % n].send->data(), first.send->nbytes());
  } else {
    ZI_ASSERT(first.recv->nbytes() == first.send->nbytes() * n);
    size_t chunk = first.send->nbytes();
    for (size_t dst = 0; dst < n; ++dst)
      for (size_t src = 0; src < n; ++src)
        std::memcpy(static_cast<char*>(slots[dst].recv->data()) + src * chunk, slots[src].send->data(), chunk);
  }
}

LocalGroup::LocalGroup(int size) : world_(size) {
  std::vector<int> all;
  for (int r = 0; r < size; ++r) all.push_back(r);
  comms_ = world_.make_group(all);
}

void LocalGroup::run(const std::function<void(Communicator&)>& fn) {
  world_.run([&](int r) { fn(*comms_[size_t(r)]); });
}

}  // namespace zimage
