// Input: "<Content-Type>\n<body>" of POST /v1/images/edits, through parse_multipart and
// parse_edit_request (the pure functions the edits handler calls) with small limits, so the limits are
// reached often. Every part must lie inside the body and within the limits; an accepted edit must be
// one the server can run (one decoded image per request, a mask of its size, strength in (0, 1]).
#include <cstdint>
#include <string_view>
#include <variant>

#include "fuzz_common.h"
#include "server/edit_request.h"
#include "server/multipart.h"
#include "server/openai_errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage::server;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t eol = input.find('\n');
  const std::string_view content_type = input.substr(0, eol);
  const std::string_view body = eol == std::string_view::npos ? std::string_view() : input.substr(eol + 1);

  EditLimits limits;
  limits.multipart.max_parts = 8;
  limits.multipart.max_part_header_bytes = 256;
  limits.multipart.max_part_bytes = 16 * 1024;
  limits.max_upload_pixels = 256 * 256;
  const auto parts = parse_multipart(content_type, body, limits.multipart);
  if (const auto* list = std::get_if<std::vector<FormPart>>(&parts)) {
    FUZZ_CHECK(list->size() <= limits.multipart.max_parts);
    for (const FormPart& p : *list) {
      FUZZ_CHECK(p.data.size() <= limits.multipart.max_part_bytes);
      FUZZ_CHECK(p.data.empty() ||
                 (p.data.data() >= body.data() && p.data.data() + p.data.size() <= body.data() + body.size()));
    }
  } else {
    FUZZ_CHECK(!std::get<MultipartError>(parts).message.empty());
  }

  RequestPolicy policy;
  policy.default_steps = 2;
  zimage::fuzz::expect_clean_errors([&] {
    const auto edit = parse_edit_request(content_type, body, policy, limits);
    if (const auto* bad = std::get_if<RequestError>(&edit)) {
      FUZZ_CHECK(!bad->message.empty());
      FUZZ_CHECK(!invalid_request(bad->message, bad->param).to_json().empty());
      return;
    }
    const auto& requests = std::get<std::vector<ImageRequest>>(edit);
    FUZZ_CHECK(!requests.empty() && requests.size() <= limits.max_images);
    for (const ImageRequest& r : requests) {
      FUZZ_CHECK(r.images.size() == 1 && r.masks.size() <= 1);
      FUZZ_CHECK(int64_t(r.images[0].width) * r.images[0].height <= limits.max_upload_pixels);
      FUZZ_CHECK(r.images[0].width >= policy.size_multiple && r.images[0].height >= policy.size_multiple);
      if (!r.masks.empty())
        FUZZ_CHECK(r.masks[0].width == r.images[0].width && r.masks[0].height == r.images[0].height);
      if (r.strength) FUZZ_CHECK(*r.strength > 0 && *r.strength <= 1);
      FUZZ_CHECK(r.seeds.size() <= 1 && !r.seed_is_list);
      FUZZ_CHECK(r.width % policy.size_multiple == 0 && r.height % policy.size_multiple == 0);
    }
  });
  return 0;
}
