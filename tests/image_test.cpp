#include "io/image.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "io/safetensors.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::expect_error;
using zimage::testing::golden_path;
using zimage::testing::make_png;
using zimage::testing::scanlines;
using zimage::testing::zlib_stored;
using Chunk = zimage::testing::PngChunk;
using zimage::testing::temp_path;
namespace fs = std::filesystem;

namespace {

// A smooth image with every channel varying, so lossy codecs have realistic content to work on.
ImageU8 gradient(int width, int height) {
  ImageU8 image;
  image.width = width;
  image.height = height;
  image.rgb.resize(size_t(width) * height * 3);
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x) {
      uint8_t* p = &image.rgb[(size_t(y) * width + x) * 3];
      p[0] = uint8_t(x * 255 / (width - 1));
      p[1] = uint8_t(y * 255 / (height - 1));
      p[2] = uint8_t((x + y) * 127 / (width + height - 2) + 64);
    }
  return image;
}

double mean_abs_error(const ImageU8& a, const ImageU8& b) {
  EXPECT_EQ(a.rgb.size(), b.rgb.size());
  double sum = 0;
  for (size_t i = 0; i < a.rgb.size(); ++i) sum += std::abs(int(a.rgb[i]) - int(b.rgb[i]));
  return sum / double(a.rgb.size());
}

ImageU8 decode(const std::vector<uint8_t>& bytes, const DecodeLimits& limits = {}) {
  return decode_image(bytes.data(), bytes.size(), limits);
}

// --- Hand-assembled PNG files (test_util.h), for layouts our encoder never writes.

std::vector<uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }

// The seven Adam7 sub-images one after the other, as an interlaced PNG stores them.
std::vector<uint8_t> adam7_scanlines(const std::vector<uint8_t>& pixels, int width, int height, int bpp) {
  const int passes[7][4] = {{0, 0, 8, 8}, {4, 0, 8, 8}, {0, 4, 4, 8}, {2, 0, 4, 4},
                            {0, 2, 2, 4}, {1, 0, 2, 2}, {0, 1, 1, 2}};  // x0, y0, dx, dy
  std::vector<uint8_t> out;
  for (const auto& [x0, y0, dx, dy] : passes) {
    if (x0 >= width) continue;  // an empty pass has no rows at all
    for (int y = y0; y < height; y += dy) {
      out.push_back(0);
      for (int x = x0; x < width; x += dx)
        out.insert(out.end(), pixels.begin() + (long(y) * width + x) * bpp,
                   pixels.begin() + (long(y) * width + x + 1) * bpp);
    }
  }
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------------- formats

TEST(ImageFormat, FromPathAndName) {
  EXPECT_EQ(image_format_from_path("out.png"), ImageFormat::Png);
  EXPECT_EQ(image_format_from_path("/a/b.c/OUT.PNG"), ImageFormat::Png);
  EXPECT_EQ(image_format_from_path("x.jpg"), ImageFormat::Jpeg);
  EXPECT_EQ(image_format_from_path("x.JPeG"), ImageFormat::Jpeg);
  EXPECT_EQ(image_format_from_path("x.webp"), ImageFormat::Webp);
  expect_error([] { image_format_from_path("picture.bmp"); }, ErrorKind::InvalidArgument,
               {"'.bmp'", "picture.bmp", ".png", ".jpg", ".jpeg", ".webp"});
  expect_error([] { image_format_from_path("dir.png/picture"); }, ErrorKind::InvalidArgument,
               {"no file extension", ".png"});

  EXPECT_STREQ(image_format_name(ImageFormat::Png), "png");
  EXPECT_STREQ(image_format_name(ImageFormat::Jpeg), "jpeg");
  EXPECT_STREQ(image_format_name(ImageFormat::Webp), "webp");
  EXPECT_EQ(image_format_from_name("png"), ImageFormat::Png);
  EXPECT_EQ(image_format_from_name("jpg"), ImageFormat::Jpeg);
  EXPECT_EQ(image_format_from_name("jpeg"), ImageFormat::Jpeg);
  EXPECT_EQ(image_format_from_name("WEBP"), ImageFormat::Webp);
  EXPECT_EQ(image_format_from_name("gif"), std::nullopt);
  EXPECT_EQ(image_format_from_name(""), std::nullopt);
}

// ------------------------------------------------------------------------------------------ round trips

TEST(ImagePng, LosslessRoundTripWithText) {
  const ImageU8 image = gradient(37, 23);
  EncodeOptions options;
  options.text = {{"prompt", "一只可爱的小猫"}, {"seed", "42"}, {"steps", "8"}, {"guidance", "0.0"},
                  {"model", "Z-Image-Turbo"}};
  const std::vector<uint8_t> png = encode_image(image, ImageFormat::Png, options);

  const ImageU8 back = decode(png);
  EXPECT_EQ(back.width, 37);
  EXPECT_EQ(back.height, 23);
  EXPECT_EQ(back.rgb, image.rgb);

  const auto text = read_png_text(png.data(), png.size());
  EXPECT_EQ(text, (std::map<std::string, std::string>{{"prompt", "一只可爱的小猫"}, {"seed", "42"}, {"steps", "8"},
                                                       {"guidance", "0.0"}, {"model", "Z-Image-Turbo"}}));
  // ASCII values go to tEXt, the UTF-8 prompt to iTXt.
  const std::string raw(png.begin(), png.end());
  EXPECT_NE(raw.find("tEXtseed"), std::string::npos);
  EXPECT_NE(raw.find("iTXtprompt"), std::string::npos);
  const std::vector<uint8_t> plain = encode_image(image, ImageFormat::Png);
  EXPECT_TRUE(read_png_text(plain.data(), plain.size()).empty());
}

TEST(ImagePng, TextChunksOfEveryKindAndPlace) {
  // tEXt (Latin-1 "café"), zTXt before the pixels, iTXt after them.
  std::vector<uint8_t> ztxt = bytes_of(std::string("note") + '\0' + '\0');
  const auto z = zlib_stored(bytes_of("compressed text"));
  ztxt.insert(ztxt.end(), z.begin(), z.end());
  const std::vector<uint8_t> itxt = bytes_of(std::string("late") + '\0' + '\0' + '\0' + "en" + '\0' + '\0' + "später");
  const std::vector<uint8_t> png =
      make_png(2, 1, 8, 2, scanlines({1, 2, 3, 4, 5, 6}, 2, 1, 3),
               {{"tEXt", bytes_of(std::string("Comment") + '\0' + "caf\xe9")}, {"zTXt", ztxt}}, {{"iTXt", itxt}});
  EXPECT_EQ(read_png_text(png.data(), png.size()),
            (std::map<std::string, std::string>{{"Comment", "café"}, {"note", "compressed text"}, {"late", "später"}}));
  EXPECT_EQ(decode(png).rgb, (std::vector<uint8_t>{1, 2, 3, 4, 5, 6}));
}

TEST(ImagePng, RejectsBadTextKeys) {
  const ImageU8 image = gradient(4, 4);
  const std::vector<std::string> keys = {"", " lead", "trail ", "two  spaces", "ключ", std::string(80, 'k')};
  for (const std::string& key : keys) {
    EncodeOptions options;
    options.text = {{key, "v"}};
    expect_error([&] { encode_image(image, ImageFormat::Png, options); }, ErrorKind::InvalidArgument,
                 {"PNG text key"});
  }
  EncodeOptions nul;
  nul.text = {{"k", std::string("a\0b", 3)}};
  expect_error([&] { encode_image(image, ImageFormat::Png, nul); }, ErrorKind::InvalidArgument, {"NUL"});
}

TEST(ImageJpeg, RoundTripWithinTolerance) {
  const ImageU8 image = gradient(64, 48);
  EncodeOptions options;
  options.text = {{"prompt", "ignored for JPEG"}};
  const std::vector<uint8_t> jpeg = encode_image(image, ImageFormat::Jpeg, options);
  ASSERT_GE(jpeg.size(), 3u);
  EXPECT_EQ(jpeg[0], 0xFF);
  EXPECT_EQ(jpeg[1], 0xD8);
  const ImageU8 back = decode(jpeg);
  EXPECT_EQ(back.width, 64);
  EXPECT_EQ(back.height, 48);
  EXPECT_LT(mean_abs_error(image, back), 1.5);

  options.quality = 20;
  const std::vector<uint8_t> small = encode_image(image, ImageFormat::Jpeg, options);
  EXPECT_LT(small.size(), jpeg.size());
  EXPECT_LT(mean_abs_error(image, decode(small)), 6.0);
}

TEST(ImageWebp, LossyRoundTripWithinTolerance) {
  const ImageU8 image = gradient(64, 48);
  const std::vector<uint8_t> webp = encode_image(image, ImageFormat::Webp, {.quality = 95, .text = {}});
  ASSERT_GE(webp.size(), 12u);
  EXPECT_EQ(std::string(webp.begin() + 8, webp.begin() + 12), "WEBP");
  const ImageU8 back = decode(webp);
  EXPECT_EQ(back.width, 64);
  EXPECT_EQ(back.height, 48);
  EXPECT_LT(mean_abs_error(image, back), 2.0);
}

TEST(ImageWebp, LosslessAtQuality100) {
  const ImageU8 image = gradient(33, 17);
  EXPECT_EQ(decode(encode_image(image, ImageFormat::Webp, {.quality = 100, .text = {}})).rgb, image.rgb);
}

TEST(ImageFile, WriteAndReadEachFormat) {
  const ImageU8 image = gradient(40, 30);
  for (const char* name : {"rt.png", "rt.JPG", "rt.jpeg", "rt.webp"}) {
    const std::string path = temp_path(name);
    write_image(path, image, {.quality = 100, .text = {{"seed", "7"}}});
    const ImageU8 back = read_image(path);
    EXPECT_EQ(back.width, 40) << name;
    EXPECT_EQ(back.height, 30) << name;
    EXPECT_LT(mean_abs_error(image, back), 1.0) << name;
  }
  EXPECT_EQ(read_image(temp_path("rt.png")).rgb, image.rgb);
}

TEST(ImageFile, FailedWriteLeavesNothing) {
  const ImageU8 image = gradient(8, 8);
  const std::string missing_dir = temp_path("no_such_dir") + "/out.png";
  expect_error([&] { write_image(missing_dir, image); }, ErrorKind::Io, {"out.png"});
  EXPECT_FALSE(fs::exists(missing_dir));

  // Renaming onto a directory fails after the temporary file was written: it must be removed.
  const std::string folder = temp_path("cleanup_check");
  fs::create_directories(folder + "/taken.png");
  expect_error([&] { write_image(folder + "/taken.png", image); }, ErrorKind::Io, {"taken.png"});
  EXPECT_EQ(std::distance(fs::directory_iterator(folder), fs::directory_iterator()), 1);

  // Encoding errors come before any file is created.
  const std::string bad = temp_path("bad_quality.jpg");
  expect_error([&] { write_image(bad, image, {.quality = 0, .text = {}}); }, ErrorKind::InvalidArgument,
               {"quality"});
  EXPECT_FALSE(fs::exists(bad));
}

TEST(ImageFile, ReadErrorsNameTheFile) {
  expect_error([] { read_image(temp_path("does_not_exist.png")); }, ErrorKind::NotFound, {"does_not_exist.png"});
  const std::string path = temp_path("not_an_image.png");
  std::ofstream(path) << "<html>error</html>";
  expect_error([&] { read_image(path); }, ErrorKind::Format, {"not_an_image.png", "3c 68 74 6d"});
}

TEST(ImageEncode, RejectsInvalidImages) {
  ImageU8 image = gradient(4, 4);
  image.rgb.pop_back();
  expect_error([&] { encode_image(image, ImageFormat::Png); }, ErrorKind::InvalidArgument, {"4x4", "47"});
  expect_error([] { encode_image(ImageU8{}, ImageFormat::Png); }, ErrorKind::InvalidArgument, {"0x0"});
  expect_error([] { encode_image(gradient(4, 4), ImageFormat::Webp, {.quality = 101, .text = {}}); },
               ErrorKind::InvalidArgument, {"quality", "101"});
  expect_error([] { encode_image(gradient(17000, 2), ImageFormat::Webp); }, ErrorKind::InvalidArgument,
               {"17000x2", "webp", "16383"});
}

// --------------------------------------------------------------------------------- decode conversions

TEST(ImageDecode, PngColorTypesBecomeRgb) {
  // Gray, 1 bit: 0 -> 0, 1 -> 255.
  auto gray1 = decode(make_png(3, 1, 1, 0, {0, 0b10100000}));
  EXPECT_EQ(gray1.rgb, (std::vector<uint8_t>{255, 255, 255, 0, 0, 0, 255, 255, 255}));

  // Gray + alpha: the alpha is dropped, not composited.
  auto gray_alpha = decode(make_png(2, 1, 8, 4, scanlines({10, 0, 200, 255}, 2, 1, 2)));
  EXPECT_EQ(gray_alpha.rgb, (std::vector<uint8_t>{10, 10, 10, 200, 200, 200}));

  auto rgba = decode(make_png(2, 1, 8, 6, scanlines({10, 20, 30, 0, 40, 50, 60, 128}, 2, 1, 4)));
  EXPECT_EQ(rgba.rgb, (std::vector<uint8_t>{10, 20, 30, 40, 50, 60}));

  // Palette with transparency (tRNS): colors looked up, alpha dropped.
  auto palette = decode(make_png(3, 1, 8, 3, scanlines({2, 0, 1}, 3, 1, 1),
                                 {{"PLTE", {255, 0, 0, 0, 255, 0, 0, 0, 255}}, {"tRNS", {0, 128, 255}}}));
  EXPECT_EQ(palette.rgb, (std::vector<uint8_t>{0, 0, 255, 255, 0, 0, 0, 255, 0}));

  // 16-bit: k * 257 is exactly k in 8 bits.
  std::vector<uint8_t> rgb16;
  for (int k : {0, 1, 128, 254, 255, 77}) rgb16.insert(rgb16.end(), {uint8_t(k * 257 >> 8), uint8_t(k * 257)});
  EXPECT_EQ(decode(make_png(2, 1, 16, 2, scanlines(rgb16, 2, 1, 6))).rgb,
            (std::vector<uint8_t>{0, 1, 128, 254, 255, 77}));
  EXPECT_EQ(decode(make_png(1, 1, 16, 0, {0, 0x80, 0x80})).rgb, (std::vector<uint8_t>{128, 128, 128}));
}

TEST(ImageDecode, InterlacedPng) {
  const ImageU8 image = gradient(11, 9);
  const auto png = make_png(11, 9, 8, 2, adam7_scanlines(image.rgb, 11, 9, 3), {},
                            {{"tEXt", bytes_of(std::string("k") + '\0' + "v")}}, /*interlaced=*/true);
  EXPECT_EQ(decode(png).rgb, image.rgb);
  EXPECT_EQ(read_png_text(png.data(), png.size()), (std::map<std::string, std::string>{{"k", "v"}}));
}

TEST(ImageDecode, AdobeCmykJpeg) {
  // 8x8, written by libjpeg from inverted CMYK (as Adobe applications store it): the left half pure
  // red (C=0 M=1 Y=1 K=0), the right half 50% black.
  const std::string hex =
      "ffd8ffee000e41646f626500640000000000ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912130f"
      "141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffc000140800080008"
      "044311004d11005911004b1100ffc4001500010100000000000000000000000000000107ffc4001c1000010403010000"
      "00000000000000000000084684c3074583c2ffda000e0443004d0059004b00003f00bf826574c4b8132ba625c50326ea"
      "faf83fffd9";
  std::vector<uint8_t> jpeg;
  for (size_t i = 0; i < hex.size(); i += 2) jpeg.push_back(uint8_t(std::stoi(hex.substr(i, 2), nullptr, 16)));
  const ImageU8 image = decode(jpeg);
  ASSERT_EQ(image.width, 8);
  ASSERT_EQ(image.height, 8);
  for (int y = 0; y < 8; ++y)
    for (int x : {0, 3, 4, 7}) {
      const uint8_t* p = &image.rgb[(size_t(y) * 8 + x) * 3];
      const int want[3] = {x < 4 ? 255 : 128, x < 4 ? 0 : 128, x < 4 ? 0 : 128};
      for (int c = 0; c < 3; ++c) EXPECT_NEAR(p[c], want[c], 4) << x << "," << y << " channel " << c;
    }
}

TEST(ImageDecode, GoldenInputsMatchTheirTensors) {
  int checked = 0;
  for (const auto& entry : fs::directory_iterator(golden_path("wave2/cases"))) {
    const fs::path dir = entry.path();
    if (!fs::exists(dir / "input.png")) continue;
    SCOPED_TRACE(dir.filename().string());
    const auto spec = nlohmann::json::parse(std::ifstream(dir / "case.json"));
    const int width = spec.at("width"), height = spec.at("height");
    const auto tensors = SafetensorsFile::open((dir / "tensors.safetensors").string());

    const ImageU8 image = read_image((dir / "input.png").string());
    ASSERT_EQ(image.width, width);
    ASSERT_EQ(image.height, height);
    const Tensor expected = tensors->get("input.image_u8");
    ASSERT_EQ(expected.shape(), (Shape{height, width, 3}));
    EXPECT_EQ(std::memcmp(expected.data(), image.rgb.data(), image.rgb.size()), 0);
    EXPECT_EQ(tensor_to_image(expected).rgb, image.rgb);
    ++checked;

    if (!fs::exists(dir / "mask.png")) continue;
    const ImageU8 mask = read_image((dir / "mask.png").string());
    ASSERT_EQ(mask.width, width);
    ASSERT_EQ(mask.height, height);
    const Tensor expected_mask = tensors->get("input.mask_u8");  // single-channel [H, W]
    ASSERT_EQ(expected_mask.shape(), (Shape{height, width}));
    const auto* m = expected_mask.data_as<uint8_t>();
    size_t mismatches = 0;
    for (size_t i = 0; i < size_t(width) * height; ++i)
      for (int c = 0; c < 3; ++c) mismatches += mask.rgb[i * 3 + c] != m[i];
    EXPECT_EQ(mismatches, 0u);
    ++checked;
  }
  EXPECT_EQ(checked, 6);  // 4 cases with an input image, 2 of them with a mask
}

// ---------------------------------------------------------------------------------------- bad input

TEST(ImageDecode, EmptyAndUnrecognized) {
  expect_error([] { decode_image(nullptr, 0); }, ErrorKind::Format, {"empty"});
  expect_error([] { decode({}); }, ErrorKind::Format, {"empty"});
  std::mt19937 rng(1);
  std::vector<uint8_t> noise(1000);
  for (auto& b : noise) b = uint8_t(rng());
  noise[0] = 0x42;
  expect_error([&] { decode(noise); }, ErrorKind::Format, {"unrecognized", "42"});
  expect_error([&] { read_png_text(noise.data(), noise.size()); }, ErrorKind::Format, {"PNG signature"});
}

TEST(ImageDecode, TruncatedFiles) {
  const ImageU8 image = gradient(64, 48);
  for (ImageFormat format : {ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp}) {
    std::vector<uint8_t> bytes = encode_image(image, format);
    for (size_t keep : {bytes.size() / 2, size_t(20), bytes.size() - 3}) {
      SCOPED_TRACE(std::string(image_format_name(format)) + " cut to " + std::to_string(keep));
      const std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + long(keep));
      expect_error([&] { decode(cut); }, ErrorKind::Format, {"invalid"});
    }
  }
  const auto png = encode_image(image, ImageFormat::Png);
  expect_error([&] { read_png_text(png.data(), png.size() / 2); }, ErrorKind::Format, {"invalid PNG data"});
}

TEST(ImageDecode, HugeHeaderFailsBeforeAllocating) {
  // Valid chunks, CRCs included, claiming 100000 x 100000 pixels (30 GB of RGB).
  const auto png = make_png(100000, 100000, 8, 2, {0, 0, 0, 0});
  expect_error([&] { decode(png); }, ErrorKind::InvalidArgument, {"100000x100000", "10000000000", "limit"});
  // Within the limit, a header is read as far as the (missing) pixel data.
  expect_error([] { decode(make_png(1000, 1000, 8, 2, {0, 0, 0, 0})); }, ErrorKind::Format, {"invalid PNG data"});
}

// Fuzzing finding: libpng allocates a chunk's declared length before reading it (its 8 MB chunk limit
// only warns when reading), so these 60 bytes claiming a 1.4 GB zTXt chunk after the pixels made it
// allocate 1.4 GB. libpng's allocations are capped now; the chunk is then just truncated. (The fuzz
// target replays this input from its corpus with a 512 MB allocation limit, which is what guards it.)
TEST(ImageDecode, HugeChunkLengthDoesNotAllocateIt) {
  std::vector<uint8_t> png = make_png(2, 2, 8, 2, scanlines(std::vector<uint8_t>(12, 7), 2, 2, 3));
  const std::vector<uint8_t> claim = {0x55, 0x00, 0x00, 0x31, 'z', 'T', 'X', 't', 'k', 0, 0};
  png.insert(png.end() - 12, claim.begin(), claim.end());  // before IEND
  expect_error([&] { decode(png); }, ErrorKind::Format, {"invalid PNG data", "ends early"});
  expect_error([&] { read_png_text(png.data(), png.size()); }, ErrorKind::Format, {"ends early"});
}

TEST(ImageDecode, PixelLimitAppliesToEveryFormat) {
  const ImageU8 image = gradient(37, 23);
  for (ImageFormat format : {ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp}) {
    const auto bytes = encode_image(image, format);
    expect_error([&] { decode(bytes, {.max_pixels = 37 * 23 - 1}); }, ErrorKind::InvalidArgument,
                 {"37x23", "limit"});
    EXPECT_NO_THROW(decode(bytes, {.max_pixels = 37 * 23}));
  }
}

// Damaged files must decode or fail with an Error, never crash (run under ASan to see overreads).
TEST(ImageDecode, CorruptedBytesNeverCrash) {
  const ImageU8 image = gradient(48, 40);
  std::mt19937 rng(7);
  for (ImageFormat format : {ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp}) {
    const auto clean = encode_image(image, format);
    int failures = 0;
    for (int trial = 0; trial < 300; ++trial) {
      auto bytes = clean;
      const int flips = 1 + int(rng() % 8);
      for (int i = 0; i < flips; ++i) bytes[rng() % bytes.size()] = uint8_t(rng());
      try {
        const ImageU8 out = decode(bytes);
        EXPECT_EQ(out.rgb.size(), size_t(out.width) * out.height * 3);
      } catch (const Error& e) {
        EXPECT_TRUE(e.kind() == ErrorKind::Format || e.kind() == ErrorKind::InvalidArgument) << e.what();
        ++failures;
      }
    }
    EXPECT_GT(failures, 0) << image_format_name(format);
  }
}

// ----------------------------------------------------------------------------------------- tensors

TEST(ImageTensor, RoundTripAndChecks) {
  const ImageU8 image = gradient(5, 3);
  const Tensor t = image_to_tensor(image);
  EXPECT_EQ(t.dtype(), DType::U8);
  EXPECT_EQ(t.shape(), (Shape{3, 5, 3}));
  EXPECT_EQ(t.data_as<uint8_t>()[(1 * 5 + 2) * 3 + 1], image.rgb[(1 * 5 + 2) * 3 + 1]);
  const ImageU8 back = tensor_to_image(t);
  EXPECT_EQ(back.width, 5);
  EXPECT_EQ(back.height, 3);
  EXPECT_EQ(back.rgb, image.rgb);

  expect_error([] { tensor_to_image(Tensor::zeros({3, 5, 3}, DType::F32)); }, ErrorKind::InvalidArgument,
               {"uint8 [H, W, 3]", "f32"});
  expect_error([] { tensor_to_image(Tensor::zeros({3, 5, 4}, DType::U8)); }, ErrorKind::InvalidArgument,
               {"[3, 5, 4]"});
  expect_error([] { tensor_to_image(Tensor::zeros({15, 3}, DType::U8)); }, ErrorKind::InvalidArgument, {"[15, 3]"});
  expect_error([] { tensor_to_image(Tensor::zeros({0, 5, 3}, DType::U8)); }, ErrorKind::InvalidArgument,
               {"[0, 5, 3]"});
}
