#include "server/edit_request.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/image.h"
#include "pipeline/request_limits.h"

namespace zimage::server {

namespace {

using nlohmann::json;

struct Reject {
  RequestError error;
};

[[noreturn]] void reject(const std::string& message, const std::string& param) { throw Reject{{message, param}}; }

// Form fields whose value is a number in the JSON body of a generation; a form sends them as text.
const std::set<std::string>& number_fields() {
  static const std::set<std::string> k = {"n",
                                          "width",
                                          "height",
                                          "num_inference_steps",
                                          "seed",
                                          "guidance_scale",
                                          "controlnet_scale",
                                          "cfg_normalization",
                                          "cfg_truncation",
                                          "max_sequence_length"};
  return k;
}

// "0.6" -> 0.6: the text of a JSON number, or nullopt (then the field stays text, and
// parse_image_request says what it must be).
std::optional<json> as_number(std::string_view text) {
  if (text.empty() || text.size() > 64) return std::nullopt;
  json v = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (v.is_discarded() || !v.is_number()) return std::nullopt;
  return v;
}

ImageU8 decode_upload(const FormPart& part, const std::string& what, const std::string& param,
                      const EditLimits& limits) {
  if (part.data.empty()) reject(what + " is empty", param);
  try {
    DecodeLimits d;
    d.max_pixels = limits.max_upload_pixels;
    return decode_image(reinterpret_cast<const uint8_t*>(part.data.data()), part.data.size(), d);
  } catch (const Error& e) {
    reject(what + " is not a PNG, JPEG or WebP image the server can read: " + e.what(), param);
  }
}

std::vector<ImageRequest> parse(std::string_view content_type, std::string_view body, const RequestPolicy& policy,
                                const EditLimits& limits) {
  auto parsed = parse_multipart(content_type, body, limits.multipart);
  if (auto* e = std::get_if<MultipartError>(&parsed)) reject(e->message, "");
  const auto& parts = std::get<std::vector<FormPart>>(parsed);

  std::vector<const FormPart*> image_parts;
  const FormPart* mask_part = nullptr;
  const FormPart* control_part = nullptr;
  std::optional<std::string> strength_text;
  json fields = json::object();
  for (const FormPart& part : parts) {
    const std::string& name = part.name;
    if (invalid_utf8_at(name)) reject("a form field's name is not valid UTF-8", "");
    if (name == "image" || name == "image[]") {
      if (image_parts.size() == limits.max_images)
        reject("more than " + std::to_string(limits.max_images) + " images in one edit request", "image");
      image_parts.push_back(&part);
      continue;
    }
    const bool repeated = name == "mask"            ? mask_part != nullptr
                          : name == "control_image" ? control_part != nullptr
                          : name == "strength"      ? strength_text.has_value()
                                                    : fields.contains(name);
    if (repeated) reject(name.substr(0, 100) + " is given more than once", name.substr(0, 100));
    if (name == "mask") {
      mask_part = &part;
      continue;
    }
    if (name == "control_image") {
      control_part = &part;
      continue;
    }
    const std::string text(part.data);
    if (auto bad = invalid_utf8_at(text))
      reject(name.substr(0, 100) + " is not valid UTF-8 (byte " + std::to_string(*bad) + ")", name.substr(0, 100));
    if (name == "strength") {
      strength_text = text;
    } else if (number_fields().count(name)) {
      auto number = as_number(text);
      fields[name] = number ? *number : json(text);
    } else {
      fields[name] = text;
    }
  }

  if (image_parts.empty()) reject("image is required: a PNG, JPEG or WebP file in the form field \"image\"", "image");
  std::vector<ImageU8> images;
  for (size_t i = 0; i < image_parts.size(); ++i) {
    const std::string what = image_parts.size() == 1 ? "image" : "image " + std::to_string(i + 1);
    images.push_back(decode_upload(*image_parts[i], what, "image", limits));
  }
  std::vector<ImageU8> masks;
  if (mask_part) {
    masks.push_back(decode_upload(*mask_part, "mask", "mask", limits));
    const ImageU8& m = masks[0];
    for (size_t i = 0; i < images.size(); ++i)
      if (images[i].width != m.width || images[i].height != m.height)
        reject("mask is " + std::to_string(m.width) + "x" + std::to_string(m.height) + " but image" +
                   (images.size() == 1 ? std::string() : " " + std::to_string(i + 1)) + " is " +
                   std::to_string(images[i].width) + "x" + std::to_string(images[i].height) +
                   "; the mask must have the image's size",
               "mask");
  }

  std::optional<double> strength;
  if (strength_text) {
    auto v = as_number(*strength_text);
    if (!v) reject("strength must be a number in (0, 1], got \"" + strength_text->substr(0, 64) + "\"", "strength");
    const double s = v->get<double>();
    if (!std::isfinite(s) || s <= 0 || s > 1)
      reject("strength must be in (0, 1] (the share of the schedule that runs), got " + *strength_text, "strength");
    strength = s;
  }

  // The size defaults to the first image's, each side rounded down to the size multiple.
  RequestPolicy p = policy;
  const int m = policy.size_multiple;
  p.default_width = std::max(images[0].width / m * m, m);
  p.default_height = std::max(images[0].height / m * m, m);
  auto request = parse_image_request(fields.dump(), p);
  if (auto* e = std::get_if<RequestError>(&request)) throw Reject{*e};
  ImageRequest base = std::get<ImageRequest>(std::move(request));
  if (base.seed_is_list) reject("seed must be a single integer in an edit", "seed");
  // What the pipeline's resolve would refuse after queueing, refused here with its field (strength > 0
  // always leaves at least one step: strength_begin_index).
  for (size_t i = 0; i < images.size(); ++i)
    if (images[i].width < m || images[i].height < m)
      reject("image is " + std::to_string(images[i].width) + "x" + std::to_string(images[i].height) +
                 " pixels; it must be at least " + std::to_string(m) + " pixels on each side",
             "image");
  base.masks = masks;
  base.strength = strength;
  if (control_part) {  // ControlNet inpainting: the control image, the init image and its mask
    if (!policy.controlnet)
      reject("control_image needs a ControlNet: this server was started without --controlnet", "control_image");
    if (masks.empty() || images.size() != 1)
      reject("an edit with a control_image is ControlNet inpainting: give one image and its mask", "control_image");
    if (strength) reject("strength does not apply to ControlNet inpainting, which starts from noise", "strength");
    base.control_image = decode_upload(*control_part, "control_image", "control_image", limits);
  }

  std::vector<ImageRequest> out;
  for (ImageU8& image : images) {
    out.push_back(base);
    out.back().images = {std::move(image)};
  }
  return out;
}

}  // namespace

std::variant<std::vector<ImageRequest>, RequestError> parse_edit_request(std::string_view content_type,
                                                                         std::string_view body,
                                                                         const RequestPolicy& policy,
                                                                         const EditLimits& limits) {
  try {
    return parse(content_type, body, policy, limits);
  } catch (const Reject& r) {
    return r.error;
  }
}

}  // namespace zimage::server
