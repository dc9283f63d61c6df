// Sequence parallelism simulated on the CPU: U ranks, each with its own CPU backend and tiny DiT, in a
// LocalGroup (the same Communicator calls as NCCL), against the one-rank forward.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/model_source.h"
#include "model/zimage_dit.h"
#include "parallel/cfg_parallel.h"
#include "parallel/local_communicator.h"
#include "parallel/sequence_parallel_plan.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::golden_case_names;
using zimage::testing::golden_path;
using zimage::testing::stack_golden_items;
using zimage::testing::max_abs_diff;

namespace {

constexpr double kTolerance = 1e-5;

// Deterministic values in [-1, 1) (a 64-bit LCG), for latents and caption features.
Tensor pseudo_random(const Shape& shape, uint64_t seed) {
  Tensor t = Tensor::empty(shape, DType::F32);
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (int64_t i = 0; i < t.numel(); ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    t.f32()[i] = float(double(s >> 11) / double(1ull << 53) * 2.0 - 1.0);
  }
  return t;
}

// One rank's model, and U of them run as a group.
struct Ranks {
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<std::unique_ptr<ZImageDit>> dits;

  Ranks(int u, const ModelSource& m) {
    for (int r = 0; r < u; ++r) {
      backends.push_back(make_cpu_backend());
      dits.push_back(std::make_unique<ZImageDit>(*backends.back(), m.transformer, *m.transformer_weights));
    }
  }
  int size() const { return int(dits.size()); }

  // Every rank's output of forward_sharded (host float32).
  std::vector<Tensor> forward(const Tensor& latents, const std::vector<float>& t, const std::vector<Tensor>& caps) {
    const auto& c = dits[0]->config();
    SequenceParallelPlan plan =
        plan_sequence_parallel(latents.dim(2) / c.patch, latents.dim(3) / c.patch, size(), c.heads);
    std::vector<Tensor> outs(static_cast<size_t>(size()));
    LocalGroup group(size());
    group.run([&](Communicator& comm) {
      const size_t r = size_t(comm.rank());
      outs[r] = backends[r]->to_host_f32(dits[r]->forward_sharded(latents, t, caps, plan, &comm, nullptr));
    });
    return outs;
  }
};

ModelSource& tiny() {
  static ModelSource m = open_model(golden_path("tiny-zimage"));
  return m;
}

}  // namespace

// ring_shift: rank r receives rank r-1's tensor (rank 0 the last rank's).
TEST(LocalGroup, RingShift) {
  LocalGroup group(4);
  std::vector<float> got(4);
  group.run([&](Communicator& comm) {
    Tensor send = Tensor::from_f32({1}, {float(10 + comm.rank())}), recv = Tensor::empty({1}, DType::F32);
    comm.ring_shift(send, recv);
    got[size_t(comm.rank())] = recv.f32()[0];
  });
  EXPECT_EQ(got, (std::vector<float>{13, 10, 11, 12}));
}

TEST(LocalGroup, AllToAllAndAllGather) {
  // Rank r sends [3 chunks of 2 values] = 100*r + 10*j + {0, 1} to rank j.
  LocalGroup group(3);
  std::vector<std::vector<float>> a2a(3), gathered(3);
  group.run([&](Communicator& comm) {
    const int r = comm.rank();
    ASSERT_EQ(comm.size(), 3);
    std::vector<float> v;
    for (int j = 0; j < 3; ++j)
      for (int e = 0; e < 2; ++e) v.push_back(100.0f * float(r) + 10.0f * float(j) + float(e));
    Tensor send = Tensor::from_f32({3, 2}, v), recv = Tensor::empty({3, 2}, DType::F32);
    comm.all_to_all(send, recv);
    a2a[size_t(r)] = recv.to_vector();
    Tensor mine = Tensor::from_f32({1}, {float(r) + 0.5f}), all = Tensor::empty({3}, DType::F32);
    comm.all_gather(mine, all);
    gathered[size_t(r)] = all.to_vector();
  });
  for (int r = 0; r < 3; ++r) {
    std::vector<float> want;
    for (int s = 0; s < 3; ++s)
      for (int e = 0; e < 2; ++e) want.push_back(100.0f * float(s) + 10.0f * float(r) + float(e));
    EXPECT_EQ(a2a[size_t(r)], want) << "rank " << r;
    EXPECT_EQ(gathered[size_t(r)], (std::vector<float>{0.5f, 1.5f, 2.5f})) << "rank " << r;
  }
}

// A rank that fails stops the group: the error comes out of run(), and no rank waits forever.
TEST(LocalGroup, OneRankFailing) {
  LocalGroup group(3);
  try {
    group.run([&](Communicator& comm) {
      if (comm.rank() == 1) throw Error(ErrorKind::InvalidArgument, "rank 1 refuses");
      Tensor t = Tensor::zeros({3}, DType::F32), all = Tensor::empty({9}, DType::F32);
      comm.all_gather(t, all);
    });
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "rank 1 refuses");
  }
}

// Four ranks in two overlapping kinds of group, as Ulysses x CFG uses them: pairs {0,1}, {2,3} and
// {0,2}, {1,3}. Each rank gathers in its first pair, then in its second.
TEST(LocalWorld, OverlappingGroups) {
  LocalWorld world(4);
  auto a = world.make_group({0, 1}), b = world.make_group({2, 3}), c = world.make_group({0, 2}),
       d = world.make_group({1, 3});
  Communicator* first[4] = {a[0].get(), a[1].get(), b[0].get(), b[1].get()};
  Communicator* second[4] = {c[0].get(), d[0].get(), c[1].get(), d[1].get()};
  std::vector<std::vector<float>> got(4);
  world.run([&](int r) {
    Tensor mine = Tensor::from_f32({1}, {float(r)}), pair = Tensor::empty({2}, DType::F32);
    first[r]->all_gather(mine, pair);
    Tensor sum = Tensor::from_f32({1}, {pair.f32()[0] + pair.f32()[1]}), both = Tensor::empty({2}, DType::F32);
    second[r]->all_gather(sum, both);
    got[size_t(r)] = both.to_vector();
  });
  // Pair sums: ranks 0,1 -> 1; ranks 2,3 -> 5. Second gather: {0,2} and {1,3} each see {1, 5}.
  for (int r = 0; r < 4; ++r) EXPECT_EQ(got[size_t(r)], (std::vector<float>{1, 5})) << "rank " << r;
}

// A rank that returns while its peer waits in a collective is a bug: run() says so instead of hanging.
TEST(LocalWorld, CollectiveThatNoRankJoinsFails) {
  LocalGroup group(2);
  try {
    group.run([&](Communicator& comm) {
      if (comm.rank() == 0) return;
      Tensor t = Tensor::zeros({2}, DType::F32), all = Tensor::empty({4}, DType::F32);
      comm.all_gather(t, all);
    });
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("waits in a collective that no other rank will join"), std::string::npos)
        << e.what();
  }
}

// One model alternating forward() and a one-rank forward_sharded() at the same layout: each call's
// cached layout plan belongs to its own kind of call.
TEST(SequenceParallelDit, PlainAndShardedCallsShareOneModel) {
  auto be = make_cpu_backend();
  ZImageDit dit(*be, tiny().transformer, *tiny().transformer_weights);
  auto f = SafetensorsFile::open(golden_path("cases/cfg_portrait/tensors.safetensors"));
  Tensor t = f->get("dit0.t");
  std::vector<Tensor> caps = {f->get("dit0.cap.0").clone(), f->get("dit0.cap.1").clone()};
  Tensor x = stack_golden_items(*f, "dit0.x.", 2);
  const auto& c = dit.config();
  SequenceParallelPlan plan = plan_sequence_parallel(x.dim(2) / c.patch, x.dim(3) / c.patch, 1, c.heads);
  Tensor plain = be->to_host_f32(dit.forward(x, t.to_vector(), caps));
  LocalGroup group(1);
  Tensor sharded, ringed;
  group.run([&](Communicator& comm) {
    sharded = be->to_host_f32(dit.forward_sharded(x, t.to_vector(), caps, plan, &comm, nullptr));
    // The same on a ring of one rank: the Ulysses x ring path (partial attentions merged by log-sum-exp).
    ringed = be->to_host_f32(dit.forward_sharded(x, t.to_vector(), caps, plan, nullptr, &comm));
  });
  EXPECT_LE(max_abs_diff(sharded, plain), kTolerance);
  EXPECT_LE(max_abs_diff(ringed, plain), kTolerance);
  EXPECT_EQ(max_abs_diff(be->to_host_f32(dit.forward(x, t.to_vector(), caps)), plain), 0.0);
}

// Both recorded DiT calls of every golden case (batched CFG and captions of different lengths
// included) on 2 ranks, the tiny model's 2 heads one per rank, and on a group of one.
TEST(SequenceParallelDit, GoldenCallsMatchOneRank) {
  auto be = make_cpu_backend();
  ZImageDit single(*be, tiny().transformer, *tiny().transformer_weights);
  for (int u : {1, 2}) {
    Ranks ranks(u, tiny());
    for (const auto& name : golden_case_names()) {
      auto f = SafetensorsFile::open(golden_path("cases/" + name + "/tensors.safetensors"));
      for (const std::string call : {"dit0.", "dit1."}) {
        Tensor t = f->get(call + "t");
        const int64_t n = t.numel();
        std::vector<Tensor> caps;
        for (int64_t j = 0; j < n; ++j) caps.push_back(f->get(call + "cap." + std::to_string(j)).clone());
        Tensor x = stack_golden_items(*f, call + "x.", n);
        Tensor want = be->to_host_f32(single.forward(x, t.to_vector(), caps));
        std::vector<Tensor> outs = ranks.forward(x, t.to_vector(), caps);
        for (int r = 0; r < u; ++r) {
          double err = max_abs_diff(outs[size_t(r)], want);
          EXPECT_LE(err, kTolerance) << name << " " << call << " U=" << u << " rank " << r;
          if (r == 0)
            std::printf("%-16s %s N=%lld U=%d max abs diff to one rank %.3g\n", name.c_str(), call.c_str(),
                        (long long)n, u, err);
        }
        EXPECT_LE(max_abs_diff(outs[0], stack_golden_items(*f, call + "out.", n)), 1e-4) << name << " vs diffusers";
      }
    }
  }
}

// The sizes that SGLang got wrong before PR 21042, at full resolution with the tiny model: portrait
// 720x1280 (H bands, 48 pad tokens of which one GPU attends 16), landscape 1280x720 (W bands), and
// 720x720 (87 pad tokens, 23 attended) as a CFG-style batch of two captions of different lengths.
TEST(SequenceParallelDit, PortraitLandscapeAndPaddedSizesMatchOneRank) {
  struct Size {
    int64_t width, height, items;
    ShardAxis axis;
  };
  auto be = make_cpu_backend();
  ZImageDit single(*be, tiny().transformer, *tiny().transformer_weights);
  Ranks ranks(2, tiny());
  const int64_t cap_dim = single.config().cap_feat_dim;
  for (const Size& s :
       {Size{720, 1280, 1, ShardAxis::H}, Size{1280, 720, 1, ShardAxis::W}, Size{720, 720, 2, ShardAxis::H}}) {
    const int64_t lh = s.height / 8, lw = s.width / 8;
    EXPECT_EQ(plan_sequence_parallel(lh / 2, lw / 2, 2, single.config().heads).axis, s.axis);
    Tensor x = pseudo_random({s.items, 16, lh, lw}, uint64_t(s.width * 7 + s.height));
    std::vector<float> t = {0.25f, 0.25f};
    t.resize(size_t(s.items));
    std::vector<Tensor> caps = {pseudo_random({7, cap_dim}, 1), pseudo_random({40, cap_dim}, 2)};
    caps.resize(size_t(s.items));
    Tensor want = be->to_host_f32(single.forward(x, t, caps));
    std::vector<Tensor> outs = ranks.forward(x, t, caps);
    for (int r = 0; r < 2; ++r) {
      double err = max_abs_diff(outs[size_t(r)], want);
      EXPECT_LE(err, kTolerance) << s.width << "x" << s.height << " rank " << r;
      std::printf("%lldx%lld (items %lld) rank %d: max abs diff to one rank %.3g\n", (long long)s.width,
                  (long long)s.height, (long long)s.items, r, err);
    }
  }
}

// The tiny model has 2 heads: 3 ranks cannot share them, and the plan says so before any work.
TEST(SequenceParallelDit, DegreeNotDividingHeadsIsRefused) {
  try {
    plan_sequence_parallel(4, 4, 3, 2);
    FAIL() << "degree 3 accepted for 2 heads";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_EQ(std::string(e.what()),
              "Ulysses degree 3 does not divide the model's 2 attention heads: each GPU attends heads / degree of "
              "them (use one of 1, 2)");
  }
}

// CFG parallelism on 2 simulated ranks: the golden batched CFG calls (positive and negative captions of
// different lengths) split into one branch per rank, gathered, against the one-rank call.
TEST(CfgParallelDit, GoldenCfgCallsMatchOneRank) {
  auto be = make_cpu_backend();
  ZImageDit single(*be, tiny().transformer, *tiny().transformer_weights);
  Ranks ranks(2, tiny());
  for (const std::string name : {"cfg_norm_trunc", "cfg_portrait"}) {
    auto f = SafetensorsFile::open(golden_path("cases/" + name + "/tensors.safetensors"));
    Tensor t = f->get("dit0.t");
    ASSERT_EQ(t.numel(), 2);
    std::vector<Tensor> caps = {f->get("dit0.cap.0").clone(), f->get("dit0.cap.1").clone()};
    ASSERT_NE(caps[0].dim(0), caps[1].dim(0));
    Tensor x = stack_golden_items(*f, "dit0.x.", 2);
    Tensor want = be->to_host_f32(single.forward(x, t.to_vector(), caps));
    std::vector<Tensor> outs(2);
    LocalGroup group(2);
    group.run([&](Communicator& comm) {
      const size_t r = size_t(comm.rank());
      Backend& rb = *ranks.backends[r];
      ZImageDit& dit = *ranks.dits[r];
      Tensor out = cfg_parallel_forward(rb, comm, x, t.to_vector(), caps,
                                        [&](const Tensor& l, const std::vector<float>& tt,
                                            const std::vector<Tensor>& cc) { return dit.forward(l, tt, cc); });
      outs[r] = rb.to_host_f32(out);
    });
    for (int r = 0; r < 2; ++r) {
      ASSERT_EQ(outs[size_t(r)].shape(), want.shape());
      double err = max_abs_diff(outs[size_t(r)], want);
      EXPECT_LE(err, kTolerance) << name << " rank " << r;
      std::printf("%-16s CFG parallel rank %d: max abs diff to one rank %.3g\n", name.c_str(), r, err);
    }
  }
}
