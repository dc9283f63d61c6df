// The body of POST /v1/images/generations: OpenAI's fields (prompt, n, size, response_format,
// output_format, user, model) and SGLang's extensions (width, height, num_inference_steps,
// guidance_scale, negative_prompt, seed, cfg_normalization, cfg_truncation, max_sequence_length).
// Parsing and validation are one pure function from the JSON text to a complete request or to the
// message and field of the first problem: no sockets, no engine, no exceptions, so it can be fuzzed alone.
#pragma once

#include <cstdint>
#include <set>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "io/image.h"
#include "model/lora.h"
#include "model/model_source.h"
#include "server/lora_library.h"

namespace zimage::server {

enum class ResponseFormat { B64Json, Url };

struct ImageRequest {
  std::string prompt, negative_prompt;
  std::string model, user;  // accepted as OpenAI clients send them; not used for generation
  int n = 1;
  int width = 1024, height = 1024;
  int steps = 0;
  float guidance = 0;
  float cfg_normalization = 0.0f, cfg_truncation = 1.0f;
  int max_sequence_length = 512;
  // Empty: none given (the server draws one). One: a single torch.randn draw for all n images, as a
  // one-request `zimage generate`. n (seed given as a list): image j starts from its own draw with seeds[j].
  std::vector<uint64_t> seeds;
  bool seed_is_list = false;
  ResponseFormat response_format = ResponseFormat::B64Json;
  ImageFormat output_format = ImageFormat::Png;
  // Runtime LoRA: "lora": [{"name": "x", "scale": 0.8}] (or "x", or {"name": "x"}), or SGLang's
  // "lora_path": "x" / ["x", "y"] (scale 1). Scales add as diffusers' set_adapters.
  std::vector<LoraRef> loras;
  std::vector<ScaledLora> adapters;  // the named adapters, filled by the server from its LoraLibrary
  // An edit (POST /v1/images/edits, edit_request.h): one decoded init image, the mask (white =
  // repaint) or none, and the strength (nullopt: the pipeline's default). Empty for a generation.
  std::vector<ImageU8> images, masks;
  std::optional<double> strength;
  bool is_edit() const { return !images.empty(); }
  // ControlNet (serve --controlnet): "control_image" (base64 or a data: URL in JSON; a file part on
  // /v1/images/edits, where with the mask it is ControlNet inpainting) and "controlnet_scale".
  std::optional<ImageU8> control_image;
  float controlnet_scale = 0.75f;
  // Edits and ControlNet requests run alone (batcher.h).
  bool runs_alone() const { return is_edit() || control_image.has_value(); }
};

// What the server accepts and what it fills in for fields left out.
struct RequestPolicy {
  int max_n = 4;
  int64_t max_pixels = int64_t(2048) * 2048;
  int size_multiple = 16;  // VAE downscale (8) x DiT patch (2)
  int max_steps = 1000;
  int max_sequence_length = 4096;
  int default_steps = kTurboSteps;  // the model's recipe (serve sets it from the model)
  float default_guidance = 0.0f;  // the model's recipe
  int default_width = 1024, default_height = 1024;
  std::set<std::string> lora_names;  // the adapters a request may name (serve --lora-dir)
  int max_loras = 8;                 // per request
  bool controlnet = false;           // a ControlNet is loaded: control_image is accepted
  int64_t max_control_pixels = int64_t(4096) * 4096;  // a control image's decoded size
};

struct RequestError {
  std::string message;
  std::string param;  // the JSON field at fault; empty when the body as a whole is wrong
};

std::variant<ImageRequest, RequestError> parse_image_request(std::string_view body, const RequestPolicy& policy);

}  // namespace zimage::server
