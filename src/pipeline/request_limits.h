// What a generation request may ask for, checked from the model's configs alone: the CLI checks a
// request before a single weight is loaded, the pipeline checks it again (resolve()), and the server's
// parser can give the same answers with the same words. Every check throws Error(InvalidArgument) with a
// message that names the field and the limit.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include "model/model_source.h"
#include "pipeline/text_to_image.h"

namespace zimage {

// Seeds are what torch.manual_seed takes from a Python int: 0 .. 2^63 - 1.
inline constexpr uint64_t kMaxSeed = uint64_t(std::numeric_limits<int64_t>::max());

// Image sides must be multiples of this: the VAE's downscale (8) times the DiT's patch (2) = 16.
int size_multiple(const ModelSource& model);

// "height 1000 is not a multiple of 16 (nearest valid: 992 or 1008)"; 64-bit, so any int side has an
// honest hint.
std::string not_a_multiple_message(const std::string& what, int64_t value, int multiple);

// width and height positive, multiples of `multiple`, width * height <= max_pixels.
void check_image_size(int64_t width, int64_t height, int multiple, int64_t max_pixels);

// seed <= kMaxSeed; `what` names it in the message ("seed", "--seed").
void check_seed(uint64_t seed, const std::string& what = "seed");

// A seed written in decimal ("42"), 0 to kMaxSeed; anything else (-1, 2^63, 0x10, 1e3) throws.
uint64_t parse_seed(std::string_view text, const std::string& what = "seed");

// The byte offset of the first byte that is not part of well-formed UTF-8 (overlong forms, surrogates
// and code points above U+10FFFF are ill-formed), or nullopt when all of `s` is valid.
std::optional<size_t> invalid_utf8_at(std::string_view s);

// `s` with every byte of ill-formed UTF-8 and every control character written as \xHH (\n and \t as
// such), so a message can quote untrusted text without sending raw bytes to a terminal or a log.
std::string escape_for_message(std::string_view s);

// Throws unless `prompt` is valid UTF-8 (a PNG's iTXt text and the tokenizer both need it) and passes
// the tokenizer's check_prompt; the message names `what` ("prompt 2") and escapes the bad byte.
void check_prompt_text(std::string_view prompt, const std::string& what);

// Fills the model's defaults (steps, guidance, negative prompts) and checks every field of `r` against
// the model's size multiple and `limits`; what TextToImagePipeline::resolve does, without the weights.
GenerateRequest resolve_request(GenerateRequest r, const ModelSource& model, const PipelineLimits& limits);

}  // namespace zimage
