// Times one full-size Z-Image DiT block (dim 3840, 30 heads x 128, FFN 10240) at 1024x1024
// (4096 image + 32 caption tokens) on the CPU backend: a DiT with one main layer and no refiners,
// synthetic weights. For the record: the CPU path is the reference, not the fast path.
// FLOPs per block: 2 * 4128 * (3*3840*3840 + 3840*3840 + 3*3840*10240) + 4 * 4128^2 * 3840 ~= 1.48 TFLOP.
#include <chrono>
#include <cstdio>

#include "backend/backend.h"
#include "model/zimage_dit.h"
#include "pipeline/torch_rng.h"

using namespace zimage;

int main() {
  Config cfg = Config::parse(R"({"all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [32, 48, 48],
      "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 1,
      "n_refiner_layers": 0, "norm_eps": 1e-05, "qk_norm": true, "rope_theta": 256.0, "t_scale": 1000.0})",
                             "one-block DiT");
  auto be = make_cpu_backend();
  SyntheticWeights ws(1, "synthetic one-block DiT");
  ZImageDit dit(*be, cfg, ws);
  Tensor lat = torch_randn({1, 16, 128, 128}, 0, GeneratorDevice::Cpu);
  Tensor cap = be->upload(torch_randn({32, 2560}, 1, GeneratorDevice::Cpu));
  for (int run = 0; run < 2; ++run) {
    auto t0 = std::chrono::steady_clock::now();
    Tensor out = dit.forward(be->upload(lat, DType::F32), {0.5f}, {cap});
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("run %d: one full-size DiT block + embedders at 1024x1024 on %s: %.2f s (%.0f GFLOP/s)\n", run,
                be->name().c_str(), s, 1.48e12 / s / 1e9);
  }
  return 0;
}
