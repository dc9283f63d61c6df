// Input: a whole safetensors file read as a LoRA for a small Z-Image DiT (dim 8, one layer and one refiner
// of each kind): key mapping, grouping, alpha, shape checks. Accepted files give factors whose shapes fit
// their target weights; everything else must be a clear Error.
#include <cstdint>
#include <vector>

#include "core/log.h"
#include "fuzz_common.h"
#include "io/config.h"
#include "model/lora.h"
#include "model/zimage_dit.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage;
  static const std::vector<WeightSpec> specs = ZImageDit::weight_specs(Config::parse(
      R"({"dim": 8, "n_heads": 1, "n_layers": 1, "n_refiner_layers": 1, "in_channels": 4, "all_patch_size": [2],
          "all_f_patch_size": [1], "cap_feat_dim": 6, "axes_dims": [2, 2, 4], "rope_theta": 256.0,
          "t_scale": 1000.0, "norm_eps": 1e-5})",
      "fuzz"));
  set_log_level(LogLevel::Error);
  fuzz::expect_clean_errors([&] {
    auto file = SafetensorsFile::from_bytes(std::vector<uint8_t>(data, data + size), "fuzz.safetensors");
    const LoraAdapter a = parse_lora(*file, specs, "fuzz");
    FUZZ_CHECK(!a.factors.empty());
    for (const auto& f : a.factors) {
      Shape target;
      for (const auto& s : specs)
        if (s.name == f.target) target = s.shape;
      FUZZ_CHECK(target.size() == 2 && f.down.dim(1) == target[1] && f.row_offset + f.up.dim(0) <= target[0]);
      FUZZ_CHECK(f.up.dim(1) == f.down.dim(0));
      Tensor w = Tensor::zeros(target, DType::F32);
      add_low_rank_(w, f, 1.0f);
    }
  });
  return 0;
}
