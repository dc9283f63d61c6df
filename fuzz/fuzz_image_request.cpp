// Input: the body of POST /v1/images/generations, through parse_image_request (the pure function the
// server calls, no sockets) with the server's default policy and a ControlNet loaded (so control_image's
// base64 and image decoding run). A rejection must become OpenAI's error
// JSON; an accepted request must be one the server can run and answer: every field within the policy,
// one seed or one per image, and prompts the PNG text chunks of the answer can hold.
#include <cmath>
#include <cstdint>
#include <string_view>
#include <variant>

#include "fuzz_common.h"
#include "io/image.h"
#include "server/image_request.h"
#include "server/openai_errors.h"
#include "text/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage;
  using namespace zimage::server;
  RequestPolicy policy;
  policy.controlnet = true;
  policy.max_control_pixels = 1 << 16;
  const auto parsed = parse_image_request(std::string_view(reinterpret_cast<const char*>(data), size), policy);
  if (const auto* bad = std::get_if<RequestError>(&parsed)) {
    FUZZ_CHECK(!bad->message.empty());
    FUZZ_CHECK(!invalid_request(bad->message, bad->param).to_json().empty());
    return 0;
  }
  const ImageRequest& r = std::get<ImageRequest>(parsed);
  FUZZ_CHECK(r.n >= 1 && r.n <= policy.max_n);
  FUZZ_CHECK(r.width > 0 && r.height > 0 && r.width % policy.size_multiple == 0 &&
             r.height % policy.size_multiple == 0);
  FUZZ_CHECK(int64_t(r.width) * r.height <= policy.max_pixels);
  FUZZ_CHECK(r.steps >= 1 && r.steps <= policy.max_steps);
  FUZZ_CHECK(std::isfinite(r.guidance) && r.guidance >= 0);
  FUZZ_CHECK(std::isfinite(r.cfg_normalization) && r.cfg_normalization >= 0 && std::isfinite(r.cfg_truncation));
  FUZZ_CHECK(r.max_sequence_length >= 1 && r.max_sequence_length <= policy.max_sequence_length);
  FUZZ_CHECK(r.seed_is_list ? int(r.seeds.size()) == r.n : r.seeds.size() <= 1);
  FUZZ_CHECK(!r.prompt.empty() && r.prompt.size() <= kMaxPromptBytes && r.negative_prompt.size() <= kMaxPromptBytes);
  FUZZ_CHECK(std::isfinite(r.controlnet_scale));
  if (r.control_image)
    FUZZ_CHECK(r.control_image->width >= 1 && r.control_image->height >= 1 &&
               int64_t(r.control_image->width) * r.control_image->height <= policy.max_control_pixels &&
               r.control_image->rgb.size() == size_t(r.control_image->width) * r.control_image->height * 3);
  // The answer records the prompts in PNG text chunks: encoding must not refuse them after generation.
  ImageU8 pixel{1, 1, {0, 0, 0}};
  EncodeOptions options;
  options.text = {{"prompt", r.prompt}, {"negative_prompt", r.negative_prompt}};
  try {
    encode_image(pixel, ImageFormat::Png, options);
  } catch (const Error& e) {
    std::fprintf(stderr, "fuzz: the answer's PNG refuses an accepted request: %s\n", e.what());
    std::abort();
  }
  return 0;
}
