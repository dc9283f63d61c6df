// --num-gpus / --ulysses-degree / --cfg-parallel: the validation as a function, and as the CLI reports it.
#include "parallel/parallel_config.h"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>

#include "backend/backend.h"
#include "core/error.h"
#include "io/image.h"
#include "io/safetensors.h"
#include "test_util.h"

using namespace zimage;

namespace {

constexpr int64_t kHeads = 30;

std::string error_of(int n, int u, bool cfg, int64_t heads, int found, int ring = 0) {
  try {
    parallel_config(n, u, ring, cfg, heads, found);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    return e.what();
  }
  return "";
}

}  // namespace

TEST(ParallelConfig, DegreesAndRankLayout) {
  ParallelConfig one = parallel_config(1, 0, 0, false, kHeads, 0);  // one device, which may be the CPU
  EXPECT_EQ(one.ulysses_degree, 1);
  ParallelConfig u2 = parallel_config(2, 0, 0, false, kHeads, 2);
  EXPECT_EQ(u2.ulysses_degree, 2);
  EXPECT_EQ(u2.cfg_groups(), 1);
  // 6 GPUs, CFG parallel: two groups of 3; GPU 4 is rank 1 of the negative branch's group.
  ParallelConfig c6 = parallel_config(6, 0, 0, true, kHeads, 8);
  EXPECT_EQ(c6.ulysses_degree, 3);
  EXPECT_EQ(c6.cfg_rank(4), 1);
  EXPECT_EQ(c6.ulysses_rank(4), 1);
  EXPECT_EQ(c6.cfg_rank(2), 0);
  EXPECT_EQ(c6.ulysses_rank(2), 2);
  ParallelConfig c2 = parallel_config(2, 1, 0, true, kHeads, 2);  // CFG parallel alone
  EXPECT_EQ(c2.ulysses_degree, 1);
  EXPECT_EQ(c2.ring_degree, 1);
  // 30 heads on 4 and 8 GPUs: Ulysses 2 (the largest divisor of 30 that divides N) times a ring.
  ParallelConfig g4 = parallel_config(4, 0, 0, false, kHeads, 4);
  EXPECT_EQ(g4.ulysses_degree, 2);
  EXPECT_EQ(g4.ring_degree, 2);
  // GPU 3: shard 3 = member 1 of Ulysses group 1, member 1 of ring 1.
  EXPECT_EQ(g4.ulysses_rank(3), 1);
  EXPECT_EQ(g4.ring_rank(3), 1);
  EXPECT_EQ(g4.ring_rank(1), 0);
  ParallelConfig g8 = parallel_config(8, 0, 0, false, kHeads, 8);
  EXPECT_EQ(g8.ulysses_degree, 2);
  EXPECT_EQ(g8.ring_degree, 4);
  ParallelConfig r4 = parallel_config(4, 1, 0, false, kHeads, 4);  // ring only
  EXPECT_EQ(r4.ring_degree, 4);
  ParallelConfig cr = parallel_config(8, 0, 2, true, kHeads, 8);  // CFG pair x ring 2 x Ulysses 2
  EXPECT_EQ(cr.ulysses_degree, 2);
  EXPECT_EQ(cr.cfg_rank(5), 1);
  EXPECT_EQ(cr.sequence_rank(5), 1);
  ParallelConfig g6 = parallel_config(6, 0, 0, false, kHeads, 6);  // 6 divides 30: Ulysses alone, as before
  EXPECT_EQ(g6.ulysses_degree, 6);
  EXPECT_EQ(g6.ring_degree, 1);
}

TEST(ParallelConfig, ClearErrors) {
  EXPECT_EQ(error_of(4, 4, false, kHeads, 4),
            "--ulysses-degree 4 does not divide the model's 30 attention heads (use one of 1, 2, 3, 5, 6, 10, 15, 30; "
            "--ring-degree splits the rest)");
  EXPECT_EQ(error_of(4, 3, false, kHeads, 4), "--num-gpus 4 must be a multiple of --ulysses-degree 3");
  EXPECT_EQ(error_of(4, 3, true, kHeads, 4),
            "--num-gpus 4 must be a multiple of --ulysses-degree 3 x 2 (--cfg-parallel) = 6");
  EXPECT_EQ(error_of(4, 0, false, kHeads, 4, 3), "--num-gpus 4 must be a multiple of --ring-degree 3");
  EXPECT_EQ(error_of(4, 2, false, kHeads, 4, 3), "--num-gpus 4 must equal --ulysses-degree 2 x --ring-degree 3 = 6");
  EXPECT_EQ(error_of(4, -1, false, kHeads, 4), "--ulysses-degree must be at least 1, got -1");
  EXPECT_EQ(error_of(4, 0, false, kHeads, 4, -2), "--ring-degree must be at least 1, got -2");
  EXPECT_EQ(
      error_of(3, 0, true, kHeads, 4),
      "--cfg-parallel runs the positive and negative branches on two groups of GPUs: --num-gpus must be even, got 3");
  EXPECT_EQ(error_of(2, 0, false, kHeads, 1), "--num-gpus 2 needs 2 GPUs, found 1");
  EXPECT_EQ(error_of(0, 0, false, kHeads, 1), "--num-gpus must be at least 1, got 0");
}

// The flags on `zimage generate`: bad values exit with code 2 and the message, before any loading.
TEST(ParallelConfig, GenerateFlags) {
  auto run = [](const std::string& args) {
    const char* bin = std::getenv("ZIMAGE_BINARY");
    std::string cmd =
        std::string(bin && *bin ? bin : ZIMAGE_BINARY) +
        " generate --model synthetic:tiny --prompt x --height 64 --width 64 --output-path /dev/null/x.png " + args +
        " 2>&1";
    FILE* p = popen(cmd.c_str(), "r");
    std::string out;
    char buf[4096];
    while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
    int status = pclose(p);
    return std::make_pair(WIFEXITED(status) ? WEXITSTATUS(status) : -1, out);
  };
  // synthetic:tiny has 2 heads.
  auto [code, out] = run("--num-gpus 3 --ulysses-degree 3 --backend cpu");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--ulysses-degree 3 does not divide the model's 2 attention heads (use one of 1, 2; "
                     "--ring-degree splits the rest)"),
            std::string::npos)
      << out;
  // No machine here has 64 GPUs (the CPU backend simulates ranks instead: pipeline_test).
  std::tie(code, out) = run("--num-gpus 64 --ulysses-degree 2 --cfg-parallel --backend cuda");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--num-gpus 64 needs 64 GPUs, found"), std::string::npos) << out;
  std::tie(code, out) = run("--num-gpus 64 --ulysses-degree 2 --ring-degree 4 --cfg-parallel --backend cuda");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--num-gpus 64 must equal --ulysses-degree 2 x --ring-degree 4 x 2 (--cfg-parallel) = 16"),
            std::string::npos)
      << out;
  std::tie(code, out) = run("--num-gpus 2 --ulysses-degree 1 --cfg-parallel --backend cuda");
  if (cuda_device_count() < 2) {
    EXPECT_EQ(code, 2);
    EXPECT_NE(out.find("--num-gpus 2 needs 2 GPUs, found " + std::to_string(cuda_device_count())), std::string::npos)
        << out;
  }
  std::tie(code, out) = run("--num-gpus 2 --ulysses-degree 2 --cfg-parallel --backend cpu");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--num-gpus 2 must be a multiple of --ulysses-degree 2 x 2 (--cfg-parallel) = 4"),
            std::string::npos)
      << out;
}

// `--backend cpu --num-gpus 2`: two ranks simulated in one process write the image one rank writes.
TEST(ParallelConfig, SimulatedRanksWriteTheSameImage) {
  const char* bin = std::getenv("ZIMAGE_BINARY");
  std::string base = std::string(bin && *bin ? bin : ZIMAGE_BINARY) +
                     " generate --model synthetic:tiny --prompt 'a kite' --height 64 --width 96 --backend cpu"
                     " --guidance-scale 3 --num-inference-steps 3 --output-path ";
  std::string one = zimage::testing::temp_path("one_rank.png"), four = zimage::testing::temp_path("four_ranks.png");
  ASSERT_EQ(std::system((base + one + " >/dev/null 2>&1").c_str()), 0);
  ASSERT_EQ(std::system((base + four + " --num-gpus 4 --cfg-parallel >/dev/null 2>&1").c_str()), 0);
  ImageU8 a = read_image(one), b = read_image(four);
  ASSERT_EQ(a.rgb.size(), b.rgb.size());
  int worst = 0;
  for (size_t i = 0; i < a.rgb.size(); ++i) worst = std::max(worst, std::abs(int(a.rgb[i]) - int(b.rgb[i])));
  EXPECT_LE(worst, 1);
}

// `--backend cpu --num-gpus 4` and `--num-gpus 8` on the tiny model's 2 heads: Ulysses x ring layouts
// (4: U=2 x R=2; 8: U=2 x R=4; 4 with --cfg-parallel: a CFG pair of U=2 x R=1; 8 with it: U=2 x R=2 per
// branch), CFG on and off, portrait and landscape: the final latents within 1e-5 of one rank.
TEST(ParallelConfig, FourAndEightSimulatedRanksGiveOneRanksLatents) {
  const char* bin = std::getenv("ZIMAGE_BINARY");
  const std::string exe = std::string(bin && *bin ? bin : ZIMAGE_BINARY);
  for (const char* size : {"--height 208 --width 112", "--height 112 --width 208"}) {
    for (const char* guidance : {"0", "3"}) {
      auto latents = [&](const std::string& extra) {
        const std::string path = zimage::testing::temp_path("latents.safetensors");
        const std::string cmd = exe + " generate --model synthetic:tiny --prompt 'a kite over a beach' " + size +
                                " --backend cpu --num-inference-steps 2 --guidance-scale " + guidance +
                                " --output-path " + zimage::testing::temp_path("x.png") + " --save-latents " + path +
                                " " + extra + " >/dev/null 2>&1";
        EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
        return SafetensorsFile::open(path)->get("latents").clone();
      };
      const Tensor one = latents("--num-gpus 1");
      const bool cfg = std::string(guidance) != "0";
      const std::vector<std::string> layouts = cfg ? std::vector<std::string>{"--num-gpus 4", "--num-gpus 8 --cfg-parallel"}
                                                   : std::vector<std::string>{"--num-gpus 8", "--num-gpus 4 --ulysses-degree 1"};
      for (const std::string& layout : layouts) {
        const double err = zimage::testing::max_abs_diff(latents(layout), one);
        EXPECT_LE(err, 1e-5) << size << " guidance " << guidance << " " << layout;
        std::printf("%s, guidance %s, %s: max abs diff to one rank %.3g\n", size, guidance, layout.c_str(), err);
      }
    }
  }
}
