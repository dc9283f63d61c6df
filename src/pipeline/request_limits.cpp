#include "pipeline/request_limits.h"

#include <charconv>
#include <cmath>
#include <cstdio>

#include "core/error.h"
#include "model/vae.h"
#include "model/zimage_controlnet.h"
#include "model/zimage_dit.h"
#include "pipeline/denoise.h"
#include "text/tokenizer.h"

namespace zimage {

namespace {

Error bad(const std::string& message) { return Error(ErrorKind::InvalidArgument, message); }

// Length of the well-formed UTF-8 sequence at s[i] (Unicode Table 3-7), or 0 when it is ill-formed.
size_t utf8_sequence_length(std::string_view s, size_t i) {
  auto byte = [&](size_t k) { return k < s.size() ? static_cast<unsigned char>(s[k]) : 0u; };
  const unsigned b0 = byte(i);
  auto cont = [&](size_t k, unsigned lo = 0x80, unsigned hi = 0xBF) { return byte(k) >= lo && byte(k) <= hi; };
  if (b0 < 0x80) return 1;
  if (b0 >= 0xC2 && b0 <= 0xDF) return cont(i + 1) ? 2 : 0;
  if (b0 == 0xE0) return cont(i + 1, 0xA0) && cont(i + 2) ? 3 : 0;
  if (b0 == 0xED) return cont(i + 1, 0x80, 0x9F) && cont(i + 2) ? 3 : 0;  // no surrogates
  if (b0 >= 0xE1 && b0 <= 0xEF) return cont(i + 1) && cont(i + 2) ? 3 : 0;
  if (b0 == 0xF0) return cont(i + 1, 0x90) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  if (b0 >= 0xF1 && b0 <= 0xF3) return cont(i + 1) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  if (b0 == 0xF4) return cont(i + 1, 0x80, 0x8F) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  return 0;
}

}  // namespace

int size_multiple(const ModelSource& model) {
  const auto vae_blocks = VaeConfig::from(model.vae).block_out_channels.size();
  return (1 << (vae_blocks - 1)) * int(DitConfig::from(model.transformer).patch);
}

std::string not_a_multiple_message(const std::string& what, int64_t value, int multiple) {
  const int64_t lo = value / multiple * multiple, hi = lo + multiple;
  const std::string nearest = lo > 0 ? std::to_string(lo) + " or " + std::to_string(hi) : std::to_string(hi);
  return what + " " + std::to_string(value) + " is not a multiple of " + std::to_string(multiple) +
         " (nearest valid: " + nearest + ")";
}

void check_image_size(int64_t width, int64_t height, int multiple, int64_t max_pixels) {
  if (height <= 0 || width <= 0)
    throw bad("height and width must be positive (got " + std::to_string(width) + "x" + std::to_string(height) + ")");
  if (height % multiple) throw bad(not_a_multiple_message("height", height, multiple));
  if (width % multiple) throw bad(not_a_multiple_message("width", width, multiple));
  // Each side is at most max_pixels / multiple here or the product is over the limit anyway, so the
  // product is computed only when it cannot overflow.
  if (height > max_pixels / width)
    throw bad(std::to_string(width) + "x" + std::to_string(height) + " is " +
              (height <= std::numeric_limits<int64_t>::max() / width ? std::to_string(height * width) + " pixels, "
                                                                     : std::string("too many pixels, ")) +
              "above the maximum of " + std::to_string(max_pixels));
}

uint64_t parse_seed(std::string_view text, const std::string& what) {
  const std::string quoted = what + " '" + escape_for_message(text) + "'";
  if (text.starts_with('-')) throw bad(quoted + " is negative; seeds are 0 to " + std::to_string(kMaxSeed));
  uint64_t seed = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), seed);
  if (text.empty() || end != text.data() + text.size() || (ec != std::errc() && ec != std::errc::result_out_of_range))
    throw bad(quoted + " is not a whole number");
  if (ec == std::errc::result_out_of_range || seed > kMaxSeed)
    throw bad(quoted + " is above the largest seed, " + std::to_string(kMaxSeed));
  return seed;
}

void check_seed(uint64_t seed, const std::string& what) {
  if (seed > kMaxSeed)
    throw bad(what + " " + std::to_string(seed) + " is above the largest seed, " + std::to_string(kMaxSeed));
}

std::optional<size_t> invalid_utf8_at(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_sequence_length(s, i);
    if (n == 0) return i;
    i += n;
  }
  return std::nullopt;
}

std::string escape_for_message(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = utf8_sequence_length(s, i), step = n ? n : 1;
    // ASCII controls and C1 controls (U+0080..U+009F, which some terminals obey) are escaped too.
    const bool control = c < 0x20 || c == 0x7F || (n == 2 && c == 0xC2 && static_cast<unsigned char>(s[i + 1]) < 0xA0);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (n == 0 || control) {
      for (size_t k = i; k < i + step; ++k) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "\\x%02x", static_cast<unsigned char>(s[k]));
        out += hex;
      }
    } else {
      out.append(s.substr(i, n));
    }
    i += step;
  }
  return out;
}

void check_prompt_text(std::string_view prompt, const std::string& what) {
  if (auto at = invalid_utf8_at(prompt)) {
    const size_t from = *at > 20 ? *at - 20 : 0;
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", static_cast<unsigned char>(prompt[*at]));
    throw bad(what + " is not valid UTF-8: byte " + hex + " at offset " + std::to_string(*at) + " (\"" +
              (from > 0 ? "..." : "") + escape_for_message(prompt.substr(from, *at - from + 8)) + "\")");
  }
  check_prompt(prompt, what);
}

namespace {

// The init images, masks and strength of image to image and inpainting: defaults and checks.
void resolve_image_inputs(GenerateRequest& r, int64_t batch, int multiple) {
  if (r.images.empty()) {
    if (!r.masks.empty()) throw bad("a mask needs an init image to inpaint");
    if (r.strength) throw bad("strength applies to image-to-image and inpainting; no init image was given");
    return;
  }
  const bool inpaint = !r.masks.empty();
  auto check_size = [&](const ImageU8& im, const char* what) {
    if (im.width < multiple || im.height < multiple)
      throw bad(std::string(what) + " is " + std::to_string(im.width) + "x" + std::to_string(im.height) +
                " pixels; it must be at least " + std::to_string(multiple) + " pixels on each side");
    if (im.rgb.size() != size_t(im.width) * size_t(im.height) * 3) throw bad(std::string(what) + " is malformed");
  };
  for (const ImageU8& im : r.images) check_size(im, "an init image");
  for (const ImageU8& im : r.masks) check_size(im, "a mask");
  const int64_t n = int64_t(r.images.size());
  if (batch % n)
    throw bad(std::to_string(n) + " init images do not divide a batch of " + std::to_string(batch) +
              " images (prompts x num_outputs_per_prompt)");
  if (inpaint && r.masks.size() != 1 && r.masks.size() != r.images.size())
    throw bad("got " + std::to_string(r.masks.size()) + " masks for " + std::to_string(n) +
              " init images; give one mask for all or one per image");
  if (!r.noise_groups.empty()) throw bad("noise groups are not supported with init images");
  if (!r.strength) r.strength = inpaint ? 1.0 : 0.6;  // diffusers' defaults
  if (!std::isfinite(*r.strength) || *r.strength <= 0.0 || *r.strength > 1.0)
    throw bad("strength must be in (0, 1] (got " + std::to_string(*r.strength) + ")");
  const int begin = strength_begin_index(*r.steps, *r.strength);
  if (begin >= *r.steps)
    throw bad("strength " + std::to_string(*r.strength) + " leaves no denoising step of " + std::to_string(*r.steps) +
              "; raise strength or num_inference_steps");
}

// The control image of a ControlNet request, and ControlNet inpainting's init image and mask.
void resolve_control_inputs(GenerateRequest& r, const ModelSource& model, int multiple) {
  if (!model.controlnet)
    throw bad("a control image needs a ControlNet: load one with --controlnet (zimage serve --controlnet)");
  const ImageU8& im = *r.control_image;
  if (im.width < multiple || im.height < multiple)
    throw bad("the control image is " + std::to_string(im.width) + "x" + std::to_string(im.height) +
              " pixels; it must be at least " + std::to_string(multiple) + " pixels on each side");
  if (im.rgb.size() != size_t(im.width) * size_t(im.height) * 3) throw bad("the control image is malformed");
  if (!std::isfinite(r.controlnet_scale)) throw bad("controlnet_scale must be a finite number");
  if (r.strength)
    throw bad("strength does not apply with a control image: ControlNet generation and ControlNet inpainting start "
              "from noise (diffusers' ZImageControlNetPipeline, ZImageControlNetInpaintPipeline)");
  if (r.images.empty()) {
    if (!r.masks.empty()) throw bad("a mask needs an init image to inpaint");
    return;
  }
  if (r.masks.empty())
    throw bad("an init image with a control image needs a mask: that is ControlNet inpainting (ControlNet "
              "image-to-image is not a diffusers pipeline)");
  if (r.images.size() != 1 || r.masks.size() != 1)
    throw bad("ControlNet inpainting takes one init image and one mask (got " + std::to_string(r.images.size()) +
              " and " + std::to_string(r.masks.size()) + ")");
  const DitConfig dit = DitConfig::from(model.transformer);
  const ControlNetConfig cc = model.controlnet->config_for(dit);
  if (!cc.takes_mask(dit.in_channels))
    throw bad("ControlNet inpainting needs a v2.x ControlNet (" + std::to_string(2 * dit.in_channels + 1) +
              " input channels: control, mask, masked image); " + model.controlnet->name + " takes " +
              std::to_string(cc.in_channels));
  for (const ImageU8* p : {&r.images[0], &r.masks[0]})
    if (p->width < multiple || p->height < multiple || p->rgb.size() != size_t(p->width) * size_t(p->height) * 3)
      throw bad("the init image and the mask must be well-formed and at least " + std::to_string(multiple) +
                " pixels on each side");
}

}  // namespace

GenerateRequest resolve_request(GenerateRequest r, const ModelSource& model, const PipelineLimits& limits) {
  if (!r.steps) r.steps = model.default_steps;
  if (!r.guidance) r.guidance = model.default_guidance;
  if (r.prompts.empty()) throw bad("no prompt given");
  check_image_size(r.width, r.height, size_multiple(model), limits.max_pixels);
  if (*r.steps < 1) throw bad("num_inference_steps must be at least 1 (got " + std::to_string(*r.steps) + ")");
  if (*r.steps > limits.max_steps)
    throw bad("num_inference_steps " + std::to_string(*r.steps) + " is above the maximum of " +
              std::to_string(limits.max_steps));
  if (!std::isfinite(*r.guidance)) throw bad("guidance_scale must be a finite number");
  if (*r.guidance < 0) throw bad("guidance_scale must be >= 0 (got " + std::to_string(*r.guidance) + ")");
  if (r.cfg_normalization < 0 || !std::isfinite(r.cfg_normalization)) throw bad("cfg_normalization must be >= 0");
  if (!std::isfinite(r.cfg_truncation)) throw bad("cfg_truncation must be a finite number");
  if (r.max_sequence_length < 1 || r.max_sequence_length > limits.max_sequence_length)
    throw bad("max_sequence_length must be between 1 and " + std::to_string(limits.max_sequence_length));
  if (r.num_images_per_prompt < 1) throw bad("num_outputs_per_prompt must be at least 1");
  const int64_t batch = int64_t(r.prompts.size()) * r.num_images_per_prompt;
  if (batch > limits.max_batch)
    throw bad("a batch of " + std::to_string(batch) + " images is above the maximum of " +
              std::to_string(limits.max_batch));
  check_seed(r.seed);
  int64_t grouped = 0;
  for (const auto& g : r.noise_groups) {
    if (g.count < 1) throw bad("a noise group must hold at least one image");
    check_seed(g.seed);
    grouped += g.count;
  }
  if (!r.noise_groups.empty() && grouped != batch)
    throw bad("noise groups cover " + std::to_string(grouped) + " images of a batch of " + std::to_string(batch));
  // Negative prompts: none ("" for every prompt), one for all, or one per prompt.
  if (r.negative_prompts.empty()) r.negative_prompts.assign(r.prompts.size(), "");
  if (r.negative_prompts.size() == 1 && r.prompts.size() > 1)
    r.negative_prompts.assign(r.prompts.size(), r.negative_prompts[0]);
  if (r.negative_prompts.size() != r.prompts.size())
    throw bad("got " + std::to_string(r.negative_prompts.size()) + " negative prompts for " +
              std::to_string(r.prompts.size()) + " prompts (give one for all prompts or one per prompt)");
  // "prompt 2" when there are several; built with append (GCC 12 warns falsely on "lit" + string here).
  const bool many = r.prompts.size() > 1;
  for (size_t i = 0; i < r.prompts.size(); ++i) {
    std::string prompt = "prompt", negative = "negative prompt";
    if (many) {
      prompt.append(" ").append(std::to_string(i + 1));
      negative.append(" ").append(std::to_string(i + 1));
    }
    check_prompt_text(r.prompts[i], prompt);
    check_prompt_text(r.negative_prompts[i], negative);
  }
  if (r.control_image)
    resolve_control_inputs(r, model, size_multiple(model));
  else
    resolve_image_inputs(r, batch, size_multiple(model));
  return r;
}

}  // namespace zimage
