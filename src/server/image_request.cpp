#include "server/image_request.h"

#include <charconv>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/untrusted_json.h"
#include "server/base64.h"
#include "text/tokenizer.h"

namespace zimage::server {

namespace {

using nlohmann::json;

// Thrown inside parse_image_request only, to leave at the first problem; never escapes it.
struct Reject {
  RequestError error;
};

[[noreturn]] void reject(const std::string& message, const std::string& param) { throw Reject{{message, param}}; }

// A field that is absent or null counts as not given (OpenAI clients send null for optional fields).
const json* field(const json& body, const char* name) {
  auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

std::string get_string(const json& body, const char* name, std::string fallback) {
  const json* v = field(body, name);
  if (!v) return fallback;
  if (!v->is_string()) reject(std::string(name) + " must be a string", name);
  return v->get<std::string>();
}

// An integer in [lo, hi]; JSON numbers with a fraction or exponent (2.0, 1e3) are not integers here.
int64_t to_int(const json& v, const std::string& what, const std::string& param, int64_t lo, int64_t hi) {
  const std::string range = " (" + std::to_string(lo) + " to " + std::to_string(hi) + ")";
  if (!v.is_number_integer()) reject(what + " must be an integer" + range, param);
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(hi))
    reject(what + " " + std::to_string(v.get<uint64_t>()) + " is out of range" + range, param);
  int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) reject(what + " " + std::to_string(x) + " is out of range" + range, param);
  return x;
}

int64_t get_int(const json& body, const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const json* v = field(body, name);
  return v ? to_int(*v, name, name, lo, hi) : fallback;
}

float get_float(const json& body, const char* name, float fallback) {
  const json* v = field(body, name);
  if (!v) return fallback;
  if (!v->is_number()) reject(std::string(name) + " must be a number", name);
  float x = float(v->get<double>());
  if (!std::isfinite(x)) reject(std::string(name) + " must be a finite number", name);
  return x;
}

// A string for every prompt, or a list of one string per prompt (the CLI's repeated --negative-prompt).
// A request here has one prompt, so a list holds one.
std::string get_negative_prompt(const json& body, size_t prompts) {
  const json* v = field(body, "negative_prompt");
  if (!v) return "";
  if (v->is_string()) return v->get<std::string>();
  if (!v->is_array()) reject("negative_prompt must be a string or a list of strings", "negative_prompt");
  if (v->size() != prompts)
    reject("negative_prompt is a list of " + std::to_string(v->size()) + " for " + std::to_string(prompts) +
               " prompt(s); give one per prompt, or a single string",
           "negative_prompt");
  for (const auto& s : *v)
    if (!s.is_string()) reject("every negative_prompt in the list must be a string", "negative_prompt");
  return (*v)[0].get<std::string>();
}

// The tokenizer's limits on prompts, as a 400 naming the field.
void check_text(const std::string& prompt, const char* name) {
  try {
    check_prompt(prompt, name);
  } catch (const Error& e) {
    reject(e.what(), name);
  }
}

// "1024x768" -> {1024, 768} (width first, as OpenAI's size); "auto" -> the defaults.
std::pair<int64_t, int64_t> parse_size(const std::string& s, const RequestPolicy& p) {
  if (s == "auto") return {p.default_width, p.default_height};
  const std::string bad = "size must look like \"1024x1024\" (width x height in pixels), got \"" + s + "\"";
  size_t x = s.find('x');
  if (x == std::string::npos || x == 0 || x + 1 == s.size()) reject(bad, "size");
  int64_t w = 0, h = 0;
  const char* begin = s.data();
  const char* end = s.data() + s.size();
  auto rw = std::from_chars(begin, begin + x, w);
  auto rh = std::from_chars(begin + x + 1, end, h);
  if (rw.ec != std::errc() || rw.ptr != begin + x || rh.ec != std::errc() || rh.ptr != end) reject(bad, "size");
  return {w, h};
}

// Far beyond any model's size, small enough that width * height cannot overflow.
constexpr int64_t kMaxSide = int64_t(1) << 20;

// Same wording as the pipeline's check: "width 1000 is not a multiple of 16 (nearest valid: 992 or 1008)".
void check_side(const char* what, int64_t v, const std::string& param, int multiple) {
  if (v <= 0) reject(std::string(what) + " must be positive (got " + std::to_string(v) + ")", param);
  if (v > kMaxSide) reject(std::string(what) + " " + std::to_string(v) + " is far too large", param);
  if (v % multiple) {
    int64_t lo = v / multiple * multiple, hi = lo + multiple;
    std::string nearest = lo > 0 ? std::to_string(lo) + " or " + std::to_string(hi) : std::to_string(hi);
    reject(std::string(what) + " " + std::to_string(v) + " is not a multiple of " + std::to_string(multiple) +
               " (nearest valid: " + nearest + ")",
           param);
  }
}

// "lora": a name, {"name", "scale"}, or a list of either; "lora_path" (SGLang): a name or a list of names.
std::vector<LoraRef> get_loras(const json& body, const RequestPolicy& p) {
  std::vector<LoraRef> out;
  auto one = [&](const json& v, const std::string& param) {
    LoraRef ref;
    if (v.is_string()) {
      ref.name = v.get<std::string>();
    } else if (v.is_object() && param == "lora") {
      for (auto it = v.begin(); it != v.end(); ++it)
        if (it.key() != "name" && it.key() != "scale") reject("unrecognized LoRA field: " + it.key(), param);
      if (!v.contains("name") || !v["name"].is_string()) reject("every LoRA needs a \"name\" string", param);
      ref.name = v["name"].get<std::string>();
      if (v.contains("scale")) {
        if (!v["scale"].is_number()) reject("a LoRA scale must be a number", param);
        const double s = v["scale"].get<double>();
        if (!(s >= -100.0 && s <= 100.0)) reject("a LoRA scale must be between -100 and 100", param);
        ref.scale = float(s);
      }
    } else {
      reject(param == "lora" ? "lora must be a name, {\"name\": ..., \"scale\": ...}, or a list of them"
                             : "lora_path must be a name or a list of names",
             param);
    }
    if (p.lora_names.empty()) reject("this server has no LoRA adapters (start it with --lora-dir)", param);
    if (!p.lora_names.count(ref.name)) {
      std::string known;
      for (const auto& n : p.lora_names) known += (known.empty() ? "" : ", ") + n;
      reject("unknown LoRA adapter '" + ref.name.substr(0, 200) + "'; available: " + known, param);
    }
    out.push_back(ref);
  };
  for (const char* param : {"lora", "lora_path"}) {
    const json* v = field(body, param);
    if (!v || v->is_null()) continue;
    if (v->is_array()) {
      for (const auto& e : *v) one(e, param);
    } else {
      one(*v, param);
    }
    if (int(out.size()) > p.max_loras)
      reject("at most " + std::to_string(p.max_loras) + " LoRA adapters per request", param);
  }
  return out;
}

// "control_image": base64, or a data URL ("data:image/png;base64,...") of a PNG, JPEG or WebP file.
ImageU8 get_control_image(const json& v, const RequestPolicy& p) {
  const char* param = "control_image";
  if (!p.controlnet) reject("control_image needs a ControlNet: this server was started without --controlnet", param);
  if (!v.is_string()) reject("control_image must be a base64 string or a data URL of a PNG, JPEG or WebP image", param);
  std::string_view text = v.get_ref<const std::string&>();
  if (text.starts_with("data:")) {
    const size_t comma = text.find(',');
    if (comma == std::string_view::npos || !text.substr(0, comma).ends_with(";base64"))
      reject("control_image is a data URL without \";base64,\" data", param);
    text.remove_prefix(comma + 1);
  }
  const auto bytes = base64_decode(text);
  if (!bytes) reject("control_image is not valid base64 (RFC 4648, padded)", param);
  if (bytes->empty()) reject("control_image is empty", param);
  try {
    DecodeLimits d;
    d.max_pixels = p.max_control_pixels;
    return decode_image(reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size(), d);
  } catch (const Error& e) {
    reject(std::string("control_image is not a PNG, JPEG or WebP image the server can read: ") + e.what(), param);
  }
}

const std::set<std::string>& known_fields() {
  static const std::set<std::string> k = {"prompt",         "n",
                                          "size",           "response_format",
                                          "output_format",  "user",
                                          "model",          "width",
                                          "height",         "num_inference_steps",
                                          "guidance_scale", "negative_prompt",
                                          "seed",           "cfg_normalization",
                                          "cfg_truncation", "max_sequence_length",
                                          "lora",           "lora_path",
                                          "control_image",  "controlnet_scale"};
  return k;
}

ImageRequest parse(std::string_view text, const RequestPolicy& p) {
  if (text.find_first_not_of(" \t\r\n") == std::string_view::npos)
    reject("the request body is empty: send a JSON object with at least a \"prompt\"", "");
  json body;
  try {
    body = parse_untrusted_json(text, "the request body");
  } catch (const Error& e) {
    reject(e.what(), "");
  }
  if (!body.is_object()) reject("the request body must be a JSON object", "");
  for (auto it = body.begin(); it != body.end(); ++it)
    if (!known_fields().count(it.key())) reject("unrecognized request argument supplied: " + it.key(), it.key());

  ImageRequest r;
  const json* prompt = field(body, "prompt");
  if (!prompt) reject("prompt is required", "prompt");
  if (!prompt->is_string()) reject("prompt must be a string", "prompt");
  r.prompt = prompt->get<std::string>();
  if (r.prompt.empty()) reject("prompt must not be empty", "prompt");
  r.negative_prompt = get_negative_prompt(body, 1);
  check_text(r.prompt, "prompt");
  check_text(r.negative_prompt, "negative_prompt");
  r.model = get_string(body, "model", "");
  r.user = get_string(body, "user", "");
  r.n = int(get_int(body, "n", 1, 1, p.max_n));

  // Explicit width/height (SGLang) take precedence over the matching side of size (OpenAI).
  int64_t w = p.default_width, h = p.default_height;
  std::string w_param = "size", h_param = "size";
  if (const json* size = field(body, "size")) {
    if (!size->is_string()) reject("size must be a string such as \"1024x1024\"", "size");
    std::tie(w, h) = parse_size(size->get<std::string>(), p);
  }
  if (field(body, "width")) {
    w = get_int(body, "width", 0, 1, kMaxSide);
    w_param = "width";
  }
  if (field(body, "height")) {
    h = get_int(body, "height", 0, 1, kMaxSide);
    h_param = "height";
  }
  check_side("width", w, w_param, p.size_multiple);
  check_side("height", h, h_param, p.size_multiple);
  if (w * h > p.max_pixels)
    reject(std::to_string(w) + "x" + std::to_string(h) + " is " + std::to_string(w * h) +
               " pixels, above the server's maximum of " + std::to_string(p.max_pixels),
           w_param);
  r.width = int(w);
  r.height = int(h);

  r.steps = int(get_int(body, "num_inference_steps", p.default_steps, 1, p.max_steps));
  r.guidance = get_float(body, "guidance_scale", p.default_guidance);
  if (r.guidance < 0) reject("guidance_scale must be >= 0", "guidance_scale");
  r.cfg_normalization = get_float(body, "cfg_normalization", 0.0f);
  if (r.cfg_normalization < 0) reject("cfg_normalization must be >= 0", "cfg_normalization");
  r.cfg_truncation = get_float(body, "cfg_truncation", 1.0f);
  r.max_sequence_length = int(get_int(body, "max_sequence_length", 512, 1, p.max_sequence_length));

  // Seeds in [0, 2^63), as torch.manual_seed takes them from Python ints; a list gives each image its own.
  if (const json* seed = field(body, "seed")) {
    const int64_t seed_max = std::numeric_limits<int64_t>::max();
    if (seed->is_array()) {
      if (int(seed->size()) != r.n)
        reject("seed is a list of " + std::to_string(seed->size()) + " seeds for n = " + std::to_string(r.n) +
                   " images; give one per image, or a single integer",
               "seed");
      for (const auto& s : *seed) r.seeds.push_back(uint64_t(to_int(s, "every seed", "seed", 0, seed_max)));
      r.seed_is_list = true;
    } else {
      r.seeds.push_back(uint64_t(to_int(*seed, "seed", "seed", 0, seed_max)));
    }
  }

  r.loras = get_loras(body, p);
  if (const json* c = field(body, "control_image")) r.control_image = get_control_image(*c, p);
  r.controlnet_scale = get_float(body, "controlnet_scale", 0.75f);

  std::string format = get_string(body, "response_format", "b64_json");
  if (format == "b64_json")
    r.response_format = ResponseFormat::B64Json;
  else if (format == "url")
    r.response_format = ResponseFormat::Url;
  else
    reject("response_format must be \"b64_json\" or \"url\", got \"" + format + "\"", "response_format");
  std::string output = get_string(body, "output_format", "png");
  auto image_format = image_format_from_name(output);
  if (!image_format) reject("output_format must be png, jpeg or webp, got \"" + output + "\"", "output_format");
  r.output_format = *image_format;
  return r;
}

}  // namespace

std::variant<ImageRequest, RequestError> parse_image_request(std::string_view body, const RequestPolicy& policy) {
  try {
    return parse(body, policy);
  } catch (const Reject& r) {
    return r.error;
  }
}

}  // namespace zimage::server
