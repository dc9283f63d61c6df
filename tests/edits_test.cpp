// POST /v1/images/edits: the multipart parser (multipart.h) and the edit request parser
// (edit_request.h) as pure functions, then the endpoint over loopback HTTP on the tiny synthetic model:
// an edit with image and mask, equality with the pipeline's own result, bad inputs, /metrics, and
// multipart bodies built by real clients (Python's standard library, curl -F) as OpenAI's SDK sends them.
#include <gtest/gtest.h>
#include <httplib.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <mutex>
#include <optional>
#include <sstream>

#include "io/image.h"
#include "model/model_source.h"
#include "model/zimage_controlnet.h"
#include "pipeline/text_to_image.h"
#include "server/base64.h"
#include "server/batcher.h"
#include "server/edit_request.h"
#include "server/http_server.h"
#include "server/multipart.h"
#include "server/request_reader.h"
#include "golden_requests.h"
#include "test_util.h"

using namespace zimage;
using namespace zimage::server;
using nlohmann::json;
using zimage::testing::FormField;
using zimage::testing::golden_path;
using zimage::testing::form_body;
using zimage::testing::kFormBoundary;
using zimage::testing::kFormType;

namespace {

// A w x h RGB image whose pixels depend on position and `salt`.
ImageU8 pattern(int w, int h, int salt) {
  ImageU8 im{w, h, std::vector<uint8_t>(size_t(w) * h * 3)};
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) im.rgb[(size_t(y) * w + x) * 3 + c] = uint8_t((x * 4 + y * 3 + c * 50 + salt) % 256);
  return im;
}

// White (repaint) on the right half, black (keep) on the left.
ImageU8 half_mask(int w, int h) {
  ImageU8 m{w, h, std::vector<uint8_t>(size_t(w) * h * 3, 0)};
  for (int y = 0; y < h; ++y)
    for (int x = w / 2; x < w; ++x)
      for (int c = 0; c < 3; ++c) m.rgb[(size_t(y) * w + x) * 3 + c] = 255;
  return m;
}

std::string png(const ImageU8& im) {
  auto bytes = encode_image(im, ImageFormat::Png);
  return std::string(bytes.begin(), bytes.end());
}

FormField file(const std::string& name, const std::string& bytes, const std::string& filename = "image.png") {
  return {name, bytes, filename, "image/png"};
}

// ---- multipart.h ----

TEST(Multipart, PartsWithNamesFilenamesTypesAndBinaryData) {
  const std::string binary("\x89PNG\r\n\x1a\n\0\r\n--x", 14);
  std::string body =
      "preamble to ignore\r\n" + form_body({{"prompt", "a fox"}, file("image[]", binary, "a b.png")}) + "epilogue";
  auto parsed = parse_multipart(kFormType, body);
  ASSERT_TRUE(std::holds_alternative<std::vector<FormPart>>(parsed)) << std::get<MultipartError>(parsed).message;
  const auto& parts = std::get<std::vector<FormPart>>(parsed);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].name, "prompt");
  EXPECT_FALSE(parts[0].has_filename);
  EXPECT_EQ(parts[0].data, "a fox");
  EXPECT_EQ(parts[1].name, "image[]");
  EXPECT_EQ(parts[1].filename, "a b.png");
  EXPECT_EQ(parts[1].content_type, "image/png");
  EXPECT_EQ(parts[1].data, binary);
}

TEST(Multipart, BoundaryFromContentType) {
  EXPECT_EQ(std::get<std::string>(multipart_boundary("Multipart/Form-Data; charset=utf-8; BOUNDARY=\"a;b c\"")),
            "a;b c");
  for (const char* bad : {"application/json", "multipart/form-data", "multipart/form-data; boundary=",
                          "multipart/form-data; boundary=\"open", "multipart/mixed; boundary=x"})
    EXPECT_TRUE(std::holds_alternative<MultipartError>(multipart_boundary(bad))) << bad;
  EXPECT_TRUE(std::holds_alternative<MultipartError>(
      multipart_boundary("multipart/form-data; boundary=" + std::string(71, 'b'))));
}

TEST(Multipart, MalformedBodiesAndLimitsAreClearErrors) {
  auto error = [](const std::string& body, const MultipartLimits& limits = {}) {
    auto parsed = parse_multipart(kFormType, body, limits);
    return std::holds_alternative<MultipartError>(parsed) ? std::get<MultipartError>(parsed).message : "";
  };
  const std::string good = form_body({{"prompt", "a"}, {"n", "1"}});
  EXPECT_EQ(error(good), "");
  EXPECT_NE(error("no boundary at all").find("no boundary line"), std::string::npos);
  EXPECT_NE(error(good.substr(0, good.size() - 12)).find("closing boundary"), std::string::npos);
  EXPECT_NE(error("--" + kFormBoundary + "\r\nX-Other: 1\r\n\r\nv\r\n--" + kFormBoundary + "--").find("Content-Disposition"),
            std::string::npos);
  EXPECT_NE(
      error("--" + kFormBoundary + "\r\nContent-Disposition: attachment; name=\"a\"\r\n\r\nv\r\n--" + kFormBoundary + "--")
          .find("not form-data"),
      std::string::npos);
  MultipartLimits one_part;
  one_part.max_parts = 1;
  EXPECT_NE(error(good, one_part).find("more than 1 parts"), std::string::npos);
  MultipartLimits small_parts;
  small_parts.max_part_bytes = 4;
  EXPECT_NE(error(form_body({{"prompt", "12345"}}), small_parts).find("over 4 bytes"), std::string::npos);
  MultipartLimits short_headers;
  short_headers.max_part_header_bytes = 16;
  EXPECT_NE(error(good, short_headers).find("headers"), std::string::npos);
}

// ---- edit_request.h ----

RequestPolicy policy() {
  RequestPolicy p;
  p.default_steps = 2;
  return p;
}

std::variant<std::vector<ImageRequest>, RequestError> parse_edit(const std::vector<FormField>& fields) {
  return parse_edit_request(kFormType, form_body(fields), policy());
}

void expect_rejected(const std::vector<FormField>& fields, const std::string& param, const std::string& message_part) {
  auto parsed = parse_edit(fields);
  ASSERT_TRUE(std::holds_alternative<RequestError>(parsed)) << "accepted; expected an error on " << param;
  const RequestError& e = std::get<RequestError>(parsed);
  EXPECT_EQ(e.param, param) << e.message;
  EXPECT_NE(e.message.find(message_part), std::string::npos) << e.message;
}

TEST(EditRequest, FieldsBecomeOneRequestPerImage) {
  auto parsed = parse_edit({{"prompt", "a fox"},
                            {"n", "2"},
                            {"strength", "0.75"},
                            {"seed", "7"},
                            {"guidance_scale", "1.5"},
                            {"num_inference_steps", "4"},
                            {"negative_prompt", "blur"},
                            {"response_format", "b64_json"},
                            {"output_format", "webp"},
                            file("image[]", png(pattern(40, 70, 1))),
                            file("image[]", png(pattern(40, 70, 2))),
                            file("mask", png(half_mask(40, 70)))});
  ASSERT_TRUE(std::holds_alternative<std::vector<ImageRequest>>(parsed)) << std::get<RequestError>(parsed).message;
  const auto& rs = std::get<std::vector<ImageRequest>>(parsed);
  ASSERT_EQ(rs.size(), 2u);
  for (size_t k = 0; k < 2; ++k) {
    const ImageRequest& r = rs[k];
    EXPECT_EQ(r.prompt, "a fox");
    EXPECT_EQ(r.negative_prompt, "blur");
    EXPECT_EQ(r.n, 2);
    EXPECT_EQ(r.width, 32);  // 40 x 70 rounded down to multiples of 16
    EXPECT_EQ(r.height, 64);
    EXPECT_EQ(r.steps, 4);
    EXPECT_FLOAT_EQ(r.guidance, 1.5f);
    ASSERT_EQ(r.seeds, std::vector<uint64_t>{7});
    ASSERT_TRUE(r.strength.has_value());
    EXPECT_DOUBLE_EQ(*r.strength, 0.75);
    EXPECT_EQ(r.output_format, ImageFormat::Webp);
    ASSERT_EQ(r.images.size(), 1u);
    EXPECT_EQ(r.images[0].rgb, pattern(40, 70, int(k) + 1).rgb);
    ASSERT_EQ(r.masks.size(), 1u);
  }
}

TEST(EditRequest, SizeGivenAndDefaults) {
  auto parsed = parse_edit({{"prompt", "a"}, {"size", "48x32"}, file("image", png(pattern(20, 20, 0)))});
  ASSERT_TRUE(std::holds_alternative<std::vector<ImageRequest>>(parsed)) << std::get<RequestError>(parsed).message;
  const ImageRequest& r = std::get<std::vector<ImageRequest>>(parsed)[0];
  EXPECT_EQ(r.width, 48);
  EXPECT_EQ(r.height, 32);
  EXPECT_FALSE(r.strength.has_value());  // the pipeline's default: 0.6, or 1.0 with a mask
  EXPECT_TRUE(r.masks.empty());
}

TEST(EditRequest, BadInputsNameTheirField) {
  const std::string image = png(pattern(32, 32, 0));
  expect_rejected({{"prompt", "a"}}, "image", "image is required");
  expect_rejected({{"prompt", "a"}, file("image", "this is not an image", "notes.txt")}, "image", "not a PNG");
  expect_rejected({{"prompt", "a"}, file("image", image), file("mask", "GIF89a")}, "mask", "not a PNG");
  expect_rejected({{"prompt", "a"}, file("image", image), file("mask", png(half_mask(32, 48)))}, "mask",
                  "mask is 32x48 but image is 32x32");
  for (const char* s : {"0", "-0.5", "1.01", "nan", "abc", "1e9"})
    expect_rejected({{"prompt", "a"}, {"strength", s}, file("image", image)}, "strength", "strength");
  expect_rejected({file("image", image)}, "prompt", "prompt is required");
  expect_rejected({{"prompt", "a"}, {"n", "two"}, file("image", image)}, "n", "integer");
  expect_rejected({{"prompt", "a"}, {"size", "30x30"}, file("image", image)}, "size", "multiple of 16");
  expect_rejected({{"prompt", "a"}, {"prompt", "b"}, file("image", image)}, "prompt", "more than once");
  expect_rejected({{"prompt", "a"}, {"colour", "red"}, file("image", image)}, "colour", "unrecognized");
  expect_rejected({{"prompt", "a"}, file("image", png(pattern(8, 40, 0)))}, "image", "at least 16");
  std::vector<FormField> five{{"prompt", "a"}};
  for (int i = 0; i < 5; ++i) five.push_back(file("image[]", image));
  expect_rejected(five, "image", "more than 4 images");
  auto bad_body = parse_edit_request(kFormType, "--" + kFormBoundary + "\r\nContent-Disposition: form-data", policy());
  ASSERT_TRUE(std::holds_alternative<RequestError>(bad_body));
  EXPECT_EQ(std::get<RequestError>(bad_body).param, "");  // the body as a whole, as a generation's bad JSON
}

TEST(EditRequest, UploadsPassTheDecodePixelCap) {
  EditLimits limits;
  limits.max_upload_pixels = 32 * 32 - 1;
  auto parsed = parse_edit_request(kFormType, form_body({{"prompt", "a"}, file("image", png(pattern(32, 32, 0)))}),
                                   policy(), limits);
  ASSERT_TRUE(std::holds_alternative<RequestError>(parsed));
  EXPECT_EQ(std::get<RequestError>(parsed).param, "image");
}

// ---- the endpoint ----

TextToImagePipeline& tiny() { return zimage::testing::synthetic_tiny_pipeline(); }

struct RecordingModel {
  std::mutex mutex;
  std::vector<GenerateRequest> calls;
  Batcher::GenerateFn fn() {
    return [this](const GenerateRequest& r) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        calls.push_back(r);
      }
      return tiny().generate(r);
    };
  }
};

struct TestServer {
  Metrics metrics;
  Batcher batcher;
  HttpServer http;
  int port;
  static ServerOptions options(bool controlnet) {
    ServerOptions o;
    o.port = 0;
    o.model_id = "synthetic:tiny";
    o.policy.default_steps = 2;
    o.policy.controlnet = controlnet;
    o.max_body_bytes = size_t(8) << 20;
    return o;
  }
  explicit TestServer(Batcher::GenerateFn fn, Batcher::Options bo = {}, bool controlnet = false)
      : batcher(std::move(fn), bo, metrics), http(options(controlnet), batcher, metrics), port(http.start()) {
    http.set_ready();
  }
  std::unique_ptr<httplib::Client> client() const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port);
    c->set_read_timeout(60, 0);
    return c;
  }
};

std::string base64_decode(const std::string& s) {
  auto bytes = server::base64_decode(s);
  EXPECT_TRUE(bytes.has_value());
  return bytes.value_or("");
}

ImageU8 decode(const std::string& bytes) {
  return decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

httplib::Result post_form(httplib::Client& c, const std::vector<FormField>& fields) {
  return c.Post("/v1/images/edits", form_body(fields), kFormType.c_str());
}

double metric(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  return NAN;
}

// The pipeline's own result for an edit: what `zimage generate --image --mask --strength --seed` runs.
Tensor pipeline_edit(const ImageU8& image, const ImageU8* mask, int n, int width, int height,
                     std::optional<double> strength, uint64_t seed, const std::string& prompt) {
  GenerateRequest g;
  g.prompts = {prompt};
  g.num_images_per_prompt = n;
  g.width = width;
  g.height = height;
  g.steps = 2;
  g.guidance = 0.0f;
  g.seed = seed;
  g.images = {image};
  if (mask) g.masks = {*mask};
  g.strength = strength;
  return tiny().generate(tiny().resolve(g)).images;
}

ImageU8 item(const Tensor& images, int i) {
  return tensor_to_image(images.narrow0(i, 1).reshape({images.shape()[1], images.shape()[2], 3}));
}

TEST(EditsEndpoint, ImageAndMaskGiveThePipelinesPngOfTheAskedSize) {
  RecordingModel model;
  TestServer s(model.fn());
  const ImageU8 image = pattern(80, 48, 3), mask = half_mask(80, 48);
  auto r = post_form(*s.client(), {{"prompt", "a red fox"},
                                   {"size", "64x32"},
                                   {"n", "2"},
                                   {"seed", "11"},
                                   {"strength", "0.8"},
                                   file("image", png(image)),
                                   file("mask", png(mask), "mask.png")});
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json j = json::parse(r->body);
  EXPECT_EQ(j["seed"], 11);
  ASSERT_EQ(j["data"].size(), 2u);
  const Tensor want = pipeline_edit(image, &mask, 2, 64, 32, 0.8, 11, "a red fox");
  for (int i = 0; i < 2; ++i) {
    const std::string bytes = base64_decode(j["data"][i]["b64_json"]);
    ASSERT_EQ(bytes.substr(1, 3), "PNG");
    const ImageU8 got = decode(bytes);
    EXPECT_EQ(got.width, 64);
    EXPECT_EQ(got.height, 32);
    EXPECT_EQ(got.rgb, item(want, i).rgb) << "image " << i;
    EXPECT_EQ(read_png_text(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size())["mode"], "inpaint");
  }
  // Text to image with the same seed gives other pixels: the init image and mask were used.
  GenerateRequest t2i;
  t2i.prompts = {"a red fox"};
  t2i.width = 64;
  t2i.height = 32;
  t2i.steps = 2;
  t2i.seed = 11;
  EXPECT_NE(item(tiny().generate(tiny().resolve(t2i)).images, 0).rgb,
            decode(base64_decode(j["data"][0]["b64_json"])).rgb);
  ASSERT_EQ(model.calls.size(), 1u);
  EXPECT_EQ(model.calls[0].masks.size(), 1u);
}

// image[] with two images: two results, each the edit of that image alone; edits never share a batch.
TEST(EditsEndpoint, ImageListGivesOneResultPerImageInOrder) {
  RecordingModel model;
  Batcher::Options bo;
  bo.batch_delay = std::chrono::milliseconds(200);  // time enough to group, were edits grouped
  TestServer s(model.fn(), bo);
  const ImageU8 a = pattern(32, 32, 1), b = pattern(32, 32, 90);
  auto r = post_form(
      *s.client(),
      {{"prompt", "a cat"}, {"seed", "5"}, file("image[]", png(a), "a.png"), file("image[]", png(b), "b.png")});
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json j = json::parse(r->body);
  ASSERT_EQ(j["data"].size(), 2u);
  EXPECT_EQ(decode(base64_decode(j["data"][0]["b64_json"])).rgb,
            item(pipeline_edit(a, nullptr, 1, 32, 32, std::nullopt, 5, "a cat"), 0).rgb);
  EXPECT_EQ(decode(base64_decode(j["data"][1]["b64_json"])).rgb,
            item(pipeline_edit(b, nullptr, 1, 32, 32, std::nullopt, 5, "a cat"), 0).rgb);
  ASSERT_EQ(model.calls.size(), 2u);  // one batch each
  for (const auto& call : model.calls) EXPECT_EQ(call.images.size(), 1u);

  const std::string text = s.client()->Get("/metrics")->body;
  EXPECT_EQ(metric(text, "zimage_image_requests_total{kind=\"edits\"}"), 1);
  EXPECT_EQ(metric(text, "zimage_image_requests_total{kind=\"generations\"}"), 0);
  EXPECT_EQ(metric(text, "zimage_images_generated_total{kind=\"edits\"}"), 2);
  EXPECT_EQ(metric(text, "zimage_images_generated_total{kind=\"generations\"}"), 0);
}

TEST(EditsEndpoint, BadInputsAre400WithParam) {
  RecordingModel model;
  TestServer s(model.fn());
  auto c = s.client();
  const std::string image = png(pattern(32, 32, 0));
  auto expect_400 = [&](const httplib::Result& r, const std::string& param) {
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 400) << r->body;
    json e = json::parse(r->body)["error"];
    EXPECT_EQ(e["type"], "invalid_request_error") << r->body;
    if (param.empty())
      EXPECT_TRUE(e["param"].is_null()) << r->body;
    else
      EXPECT_EQ(e["param"], param) << r->body;
  };
  expect_400(post_form(*c, {{"prompt", "a"}, file("image", image), file("mask", png(half_mask(48, 32)))}), "mask");
  expect_400(post_form(*c, {{"prompt", "a"}, {"strength", "0"}, file("image", image)}), "strength");
  expect_400(post_form(*c, {{"prompt", "a"}, {"strength", "1.5"}, file("image", image)}), "strength");
  expect_400(post_form(*c, {{"prompt", "a"}, file("image", "%PDF-1.4 not an image", "doc.pdf")}), "image");
  expect_400(c->Post("/v1/images/edits", "--nope", kFormType.c_str()), "");
  expect_400(c->Post("/v1/images/edits", "{\"prompt\": \"a\"}", "application/json"), "");
  // The header RequestReader moves a multipart Content-Type to is its own: a client's is dropped.
  const std::string form = form_body({{"prompt", "a"}, file("image", image)});
  expect_400(c->Post("/v1/images/edits", {{kFormContentType, kFormType}}, form, "application/json"), "");
  EXPECT_TRUE(model.calls.empty());
  auto wrong_method = c->Get("/v1/images/edits");
  ASSERT_TRUE(wrong_method);
  EXPECT_EQ(wrong_method->status, 405);
}

// A shell command's stdout, or nullopt when it exits with another status.
std::optional<std::string> run_command(const std::string& command) {
  FILE* p = popen(command.c_str(), "r");
  if (!p) return std::nullopt;
  std::string out;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  const int status = pclose(p);
  if (status != 0) {
    ADD_FAILURE() << command << " exited with " << status << ":\n" << out;
    return std::nullopt;
  }
  return out;
}

bool have(const std::string& tool) { return std::system(("command -v " + tool + " >/dev/null 2>&1").c_str()) == 0; }

void write_file(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

// The body built the way OpenAI's Python SDK sends images.edit(image=[...], mask=..., prompt=...):
// text fields, then files under "image[]" (a list) and "mask", each with a filename and a Content-Type,
// and a random boundary; sent with urllib. Only the standard library.
constexpr const char* kOpenAiStyleClient = R"PY(
import json, mimetypes, sys, urllib.request, uuid
url, prompt, mask_path, *image_paths = sys.argv[1:]
boundary = uuid.uuid4().hex
fields = {"prompt": prompt, "n": "1", "size": "32x32", "response_format": "b64_json", "seed": "3"}
files = [("image[]", p) for p in image_paths] + [("mask", mask_path)]
body = b""
for name, value in fields.items():
    body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
for name, path in files:
    ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
        data = f.read()
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.rsplit("/", 1)[-1]}"\r\n'
             f'Content-Type: {ctype}\r\n\r\n').encode() + data + b"\r\n"
body += f"--{boundary}--\r\n".encode()
req = urllib.request.Request(url, data=body, method="POST",
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
try:
    with urllib.request.urlopen(req, timeout=120) as r:
        sys.stdout.write(json.dumps({"status": r.status, "body": json.loads(r.read())}))
except urllib.error.HTTPError as e:
    sys.stdout.write(json.dumps({"status": e.code, "body": json.loads(e.read())}))
)PY";

TEST(EditsEndpoint, PythonStandardLibraryClientAsOpenAiSdkSendsIt) {
  if (!have("python3")) GTEST_SKIP() << "python3 is not installed: the real-client multipart test does not run";
  RecordingModel model;
  TestServer s(model.fn());
  const std::string dir = zimage::testing::temp_path("py_edit");
  ASSERT_EQ(std::system(("mkdir -p " + dir).c_str()), 0);
  const ImageU8 a = pattern(32, 32, 7), b = pattern(32, 32, 70), mask = half_mask(32, 32);
  write_file(dir + "/client.py", kOpenAiStyleClient);
  write_file(dir + "/a.png", png(a));
  write_file(dir + "/b.png", png(b));
  write_file(dir + "/mask.png", png(mask));
  const std::string url = "http://127.0.0.1:" + std::to_string(s.port) + "/v1/images/edits";
  auto out = run_command("python3 " + dir + "/client.py " + url + " 'a blue bird' " + dir + "/mask.png " + dir +
                         "/a.png " + dir + "/b.png");
  ASSERT_TRUE(out);
  json j = json::parse(*out);
  ASSERT_EQ(j["status"], 200) << *out;
  ASSERT_EQ(j["body"]["data"].size(), 2u);
  EXPECT_EQ(decode(base64_decode(j["body"]["data"][0]["b64_json"])).rgb,
            item(pipeline_edit(a, &mask, 1, 32, 32, std::nullopt, 3, "a blue bird"), 0).rgb);
  EXPECT_EQ(decode(base64_decode(j["body"]["data"][1]["b64_json"])).rgb,
            item(pipeline_edit(b, &mask, 1, 32, 32, std::nullopt, 3, "a blue bird"), 0).rgb);
}

TEST(EditsEndpoint, CurlFormUpload) {
  if (!have("curl")) GTEST_SKIP() << "curl is not installed: the curl -F test does not run";
  RecordingModel model;
  TestServer s(model.fn());
  const std::string dir = zimage::testing::temp_path("curl_edit");
  ASSERT_EQ(std::system(("mkdir -p " + dir).c_str()), 0);
  const ImageU8 image = pattern(48, 32, 9), mask = half_mask(48, 32);
  write_file(dir + "/in.png", png(image));
  write_file(dir + "/mask.png", png(mask));
  const std::string url = "http://127.0.0.1:" + std::to_string(s.port) + "/v1/images/edits";
  auto out = run_command("curl -sS --max-time 120 -F image=@" + dir + "/in.png -F mask=@" + dir +
                         "/mask.png -F 'prompt=a green frog' -F seed=21 -F strength=0.9 " + url);
  ASSERT_TRUE(out);
  json j = json::parse(*out);
  ASSERT_EQ(j["data"].size(), 1u) << *out;
  EXPECT_EQ(j["seed"], 21);
  const ImageU8 got = decode(base64_decode(j["data"][0]["b64_json"]));
  EXPECT_EQ(got.width, 48);  // the image's size
  EXPECT_EQ(got.height, 32);
  EXPECT_EQ(got.rgb, item(pipeline_edit(image, &mask, 1, 48, 32, 0.9, 21, "a green frog"), 0).rgb);

  auto bad = run_command("curl -sS --max-time 60 -F image=@" + dir + "/in.png -F 'prompt=x' -F strength=2 " + url);
  ASSERT_TRUE(bad);
  EXPECT_EQ(json::parse(*bad)["error"]["param"], "strength") << *bad;
}

}  // namespace

// A generation with a control image over HTTP (JSON, base64) runs alone, through the ControlNet, and
// gives the pipeline's own image; a ControlNet inpainting edit too.
TEST(EditsEndpoint, ControlImagesReachTheControlNet) {
  static std::unique_ptr<Backend> be = make_cpu_backend();
  ModelSource m = open_model(golden_path("tiny-zimage"));
  attach_controlnet(m, golden_path("wave3/controlnet_union_v2.safetensors"), golden_path("wave3/controlnet_union_v2.json"));
  TextToImagePipeline pipe(*be, m);
  std::vector<GenerateRequest> calls;
  std::mutex mutex;
  TestServer s(
      [&](const GenerateRequest& r) {
        std::lock_guard<std::mutex> lock(mutex);
        calls.push_back(r);
        return pipe.generate(r);
      },
      {}, /*controlnet=*/true);
  const std::string dir = golden_path("wave3/cases/cn_v2_inpaint");
  auto bytes = [&](const std::string& name) {
    std::ifstream in(dir + "/" + name, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  auto r = s.client()->Post("/v1/images/generations",
                            json{{"prompt", "a stone bridge"},
                                 {"size", "64x80"},
                                 {"seed", 5},
                                 {"control_image", "data:image/png;base64," + base64_encode(bytes("control.png"))},
                                 {"controlnet_scale", 0.9}}
                                .dump(),
                            "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  GenerateRequest g;
  g.prompts = {"a stone bridge"};
  g.width = 64;
  g.height = 80;
  g.steps = 2;
  g.guidance = 0.0f;
  g.seed = 5;
  g.noise_groups = {{1, 5}};
  g.control_image = read_image(dir + "/control.png");
  g.controlnet_scale = 0.9f;
  const ImageU8 want = item(pipe.generate(g).images, 0);
  EXPECT_EQ(decode(base64_decode(json::parse(r->body)["data"][0]["b64_json"])).rgb, want.rgb);

  auto e = post_form(*s.client(), {{"prompt", "a stone bridge"},
                                   {"seed", "5"},
                                   {"controlnet_scale", "0.9"},
                                   file("image", bytes("input.png")),
                                   file("mask", bytes("mask.png"), "mask.png"),
                                   file("control_image", bytes("control.png"), "control.png")});
  ASSERT_TRUE(e);
  ASSERT_EQ(e->status, 200) << e->body;
  std::lock_guard<std::mutex> lock(mutex);
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_TRUE(calls[1].control_image.has_value());
  EXPECT_EQ(calls[1].masks.size(), 1u);
  g.noise_groups.clear();
  g.images = {read_image(dir + "/input.png")};
  g.masks = {read_image(dir + "/mask.png")};
  EXPECT_EQ(decode(base64_decode(json::parse(e->body)["data"][0]["b64_json"])).rgb, item(pipe.generate(g).images, 0).rgb);
}
