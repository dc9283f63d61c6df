// The body of POST /v1/images/edits: OpenAI's multipart/form-data edit (image or image[] files,
// optional mask file, prompt, n, size, response_format, output_format, user, model) with this engine's
// strength, seed, negative_prompt, guidance_scale, num_inference_steps (and the other generation
// fields). The text fields go through parse_image_request, so they are checked with the same words and
// limits as a generation; the files are decoded with the same decoder and a pixel cap.
//
// image[] with K images means K results (times n): one request per image, each the request with that
// image alone (same prompt, seed and settings), answered in the order of the images.
#pragma once

#include <string_view>
#include <variant>
#include <vector>

#include "server/image_request.h"
#include "server/multipart.h"

namespace zimage::server {

struct EditLimits {
  MultipartLimits multipart;
  size_t max_images = 4;                          // image[] files in one request
  int64_t max_upload_pixels = int64_t(16) << 20;  // per uploaded image or mask, before resizing
};

// One ImageRequest per uploaded image (request.images holds that one image; masks the mask, if any).
// size defaults to the first image's, each side rounded down to the size multiple (as `zimage generate
// --image`); strength must be in (0, 1]; a mask must have the size of every image.
std::variant<std::vector<ImageRequest>, RequestError> parse_edit_request(std::string_view content_type,
                                                                         std::string_view body,
                                                                         const RequestPolicy& policy,
                                                                         const EditLimits& limits = {});

}  // namespace zimage::server
