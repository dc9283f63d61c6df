// Input: a model component's config.json (a diffusers folder from a stranger). Parsed by Config::parse,
// then read as each component's config would be: the DiT, the Qwen3 text encoder, the VAE and the
// flow-match scheduler (whose sigmas it computes), and key by key through every typed accessor. What a
// reader accepts must be usable: sizes positive and consistent, sigmas finite and within (0, 1].
#include <cmath>
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "io/config.h"
#include "model/qwen3.h"
#include "model/vae.h"
#include "model/zimage_dit.h"
#include "pipeline/flow_match_scheduler.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage;
  using fuzz::expect_clean_errors;
  Config c;
  try {
    c = Config::parse(std::string(reinterpret_cast<const char*>(data), size), "fuzz/config.json");
  } catch (const Error& e) {
    FUZZ_CHECK(e.kind() == ErrorKind::Format);
    return 0;
  }
  expect_clean_errors([&] {
    const DitConfig d = DitConfig::from(c);
    FUZZ_CHECK(d.dim > 0 && d.heads > 0 && d.head_dim * d.heads == d.dim && d.patch > 0 && d.ffn_hidden > 0);
    FUZZ_CHECK(d.axes_dims.size() == 3 && d.axes_dims[0] + d.axes_dims[1] + d.axes_dims[2] == d.head_dim);
  });
  expect_clean_errors([&] {
    const Qwen3Config q = Qwen3Config::from(c);
    FUZZ_CHECK(q.hidden > 0 && q.heads > 0 && q.kv_heads > 0 && q.heads % q.kv_heads == 0 && q.head_dim > 0);
    FUZZ_CHECK(q.layers >= 2 && q.vocab > 0 && q.rms_eps > 0);
  });
  expect_clean_errors([&] {
    const VaeConfig v = VaeConfig::from(c);
    FUZZ_CHECK(!v.block_out_channels.empty() && v.groups > 0 && v.layers_per_block > 0);
    for (int64_t ch : v.block_out_channels) FUZZ_CHECK(ch > 0 && ch % v.groups == 0);
    FUZZ_CHECK(std::isfinite(float(v.scaling_factor)) && float(v.scaling_factor) != 0.0f);
  });
  for (int steps : {1, 9, 50}) {
    expect_clean_errors([&] {
      const FlowMatchSchedule s = flow_match_schedule(c, steps, 4096);
      FUZZ_CHECK(s.sigmas.size() == size_t(steps) + 1 && s.timesteps.size() == size_t(steps));
      for (float x : s.sigmas) FUZZ_CHECK(std::isfinite(x) && x >= 0.0f && x <= 1.0f + 1e-5f);
      for (float t : s.timesteps) FUZZ_CHECK(std::isfinite(t));
    });
  }
  // Every key through every accessor: each either returns or names the key and the type it wanted.
  for (auto it = c.json().begin(); it != c.json().end(); ++it) {
    const std::string& key = it.key();
    expect_clean_errors([&] { c.integer(key); });
    expect_clean_errors([&] { c.integer_in(key, 1, 1 << 20); });
    expect_clean_errors([&] { c.number(key); });
    expect_clean_errors([&] { c.boolean(key); });
    expect_clean_errors([&] { c.string(key); });
    expect_clean_errors([&] { c.integers(key); });
    expect_clean_errors([&] { c.child(key).json().size(); });
  }
  return 0;
}
