#include "io/safetensors.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;
using zimage::testing::temp_path;

namespace {

// Writes a raw safetensors file: header JSON (length prefix computed unless overridden) + data bytes.
std::string write_raw(const std::string& name, const std::string& header, size_t data_bytes,
                      int64_t header_len_override = -1) {
  std::string path = temp_path(name);
  std::ofstream out(path, std::ios::binary);
  uint64_t n = header_len_override >= 0 ? uint64_t(header_len_override) : header.size();
  for (int i = 0; i < 8; ++i) out.put(char((n >> (8 * i)) & 0xff));
  out << header;
  out << std::string(data_bytes, '\0');
  return path;
}

// Expects open() to throw an Error of `kind` whose message contains every fragment.
void expect_error(const std::string& path, ErrorKind kind, std::initializer_list<std::string> fragments) {
  SCOPED_TRACE(path);
  zimage::testing::expect_error([&] { SafetensorsFile::open(path); }, kind, fragments);
}

// A whole file in memory, as the fuzz target feeds it.
std::vector<uint8_t> file_bytes(const std::string& header, const std::string& data = "") {
  std::vector<uint8_t> b;
  for (int i = 0; i < 8; ++i) b.push_back(uint8_t(uint64_t(header.size()) >> (8 * i)));
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

void expect_bytes_error(const std::string& header, std::initializer_list<std::string> fragments) {
  SCOPED_TRACE(header.substr(0, 200));
  zimage::testing::expect_error([&] { SafetensorsFile::from_bytes(file_bytes(header), "mem.safetensors"); },
                                ErrorKind::Format, fragments);
}

}  // namespace

TEST(Safetensors, ReadsGoldenModel) {
  auto f = SafetensorsFile::open(golden_path("tiny-zimage/transformer/diffusion_pytorch_model.safetensors"));
  ASSERT_TRUE(f->has("x_pad_token"));
  Tensor t = f->get("layers.0.attention.to_q.weight");
  EXPECT_EQ(t.dtype(), DType::BF16);
  EXPECT_EQ(t.shape(), (Shape{64, 64}));
  EXPECT_THROW(f->get("no.such.tensor"), Error);
}

TEST(Safetensors, WriteThenReadRoundTrip) {
  Tensor a = Tensor::from_f32({2, 3}, {1, -2, 3.5f, 4, 5, 6});
  Tensor b = Tensor::from_f32({4}, {7, 8, 9, 10}).to_dtype(DType::BF16);
  Tensor c = Tensor::zeros({0, 3}, DType::F32);
  Tensor d = Tensor::from_f32({2}, {0.25f, -8}).to_dtype(DType::F64);
  std::string path = temp_path("roundtrip.safetensors");
  write_safetensors(path, {{"a", a}, {"b", b}, {"empty", c}, {"d", d}}, {{"format", "pt"}});
  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->get("a").to_vector(), a.to_vector());
  EXPECT_EQ(f->get("b").dtype(), DType::BF16);
  EXPECT_EQ(f->get("b").to_vector(), (std::vector<float>{7, 8, 9, 10}));
  EXPECT_EQ(f->get("empty").numel(), 0);
  EXPECT_EQ(f->get("d").dtype(), DType::F64);
  EXPECT_EQ(f->get("d").data_as<double>()[1], -8.0);
  EXPECT_EQ(f->metadata().at("format"), "pt");
}

TEST(Safetensors, TruncatedFile) {
  std::string path = temp_path("short.safetensors");
  std::ofstream(path, std::ios::binary) << "abc";
  expect_error(path, ErrorKind::Format, {"short.safetensors", "too short"});
}

TEST(Safetensors, HeaderLengthPastEndOfFile) {
  auto p = write_raw("past_end.safetensors", "{}", 0, 1000);
  expect_error(p, ErrorKind::Format, {"past_end.safetensors", "runs past the end"});
}

TEST(Safetensors, OversizeHeaderLength) {
  auto p = write_raw("huge_header.safetensors", "{}", 0, int64_t(1) << 40);
  expect_error(p, ErrorKind::Format, {"exceeds the limit"});
}

TEST(Safetensors, MalformedJson) {
  auto p = write_raw("bad_json.safetensors", "{\"a\": [", 0);
  expect_error(p, ErrorKind::Format, {"not valid JSON"});
}

TEST(Safetensors, UnknownDtype) {
  auto p = write_raw("dtype.safetensors", R"({"w":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,2]}})", 2);
  expect_error(p, ErrorKind::Format, {"tensor 'w'", "unknown dtype 'Q4_K'"});
}

TEST(Safetensors, ShapeDoesNotMatchRange) {
  auto p = write_raw("shape.safetensors", R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 24);
  expect_error(p, ErrorKind::Format, {"tensor 'w'", "does not match the byte range"});
}

TEST(Safetensors, HugeShapeDoesNotOverflow) {
  auto p = write_raw("overflow.safetensors",
                     R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})", 0);
  expect_error(p, ErrorKind::Format, {"tensor 'w'", "over the limit of 68719476736 bytes per tensor"});
}

TEST(Safetensors, OffsetsOutOfBounds) {
  auto p = write_raw("oob.safetensors", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})", 16);
  expect_error(p, ErrorKind::Format, {"tensor 'w'", "outside the data section"});
}

TEST(Safetensors, OffsetsReversed) {
  auto p = write_raw("rev.safetensors", R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}})", 16);
  expect_error(p, ErrorKind::Format, {"tensor 'w'", "is after end"});
}

TEST(Safetensors, OverlappingRanges) {
  auto p = write_raw("overlap.safetensors",
                     R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                     R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                     16);
  expect_error(p, ErrorKind::Format, {"'a'", "'b'", "overlapping"});
}

TEST(Safetensors, NegativeDimension) {
  auto p = write_raw("neg.safetensors", R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4);
  expect_error(p, ErrorKind::Format, {"tensor 'w'", "negative"});
}

TEST(Safetensors, FromBytesReadsWhatOpenReads) {
  const std::string path = golden_path("text_encoder/tensors.safetensors");
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto mem = SafetensorsFile::from_bytes(bytes, "mem");
  auto file = SafetensorsFile::open(path);
  ASSERT_EQ(mem->entries().size(), file->entries().size());
  for (const auto& [name, e] : file->entries()) EXPECT_EQ(max_abs_diff(mem->get(name), file->get(name)), 0.0) << name;
}

// Limits: a 100 MB header could list a million tensors; 1 TB of shape fits in a 60-byte header.
TEST(Safetensors, TensorCountAndBytesAreBounded) {
  std::string many = "{";
  for (size_t i = 0; i <= SafetensorsFile::kMaxTensors; ++i)
    many += (i ? ",\"" : "\"") + std::to_string(i) + R"(":{"dtype":"U8","shape":[0],"data_offsets":[0,0]})";
  many += "}";
  expect_bytes_error(many, {"131073 tensors", "the limit of 131072"});
  expect_bytes_error(R"({"w":{"dtype":"BF16","shape":[1048576,65537],"data_offsets":[0,0]}})",
                     {"tensor 'w'", "[1048576, 65537] x bf16 is over the limit of 68719476736 bytes"});
}

// Found writing the fuzz target: an empty tensor with huge other dimensions passed (0 bytes match its
// range), and numel() then overflowed int64 multiplying 2^62 by 4 before reaching the 0.
TEST(Safetensors, EmptyTensorWithHugeDimensionsIsRefused) {
  expect_bytes_error(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4,0],"data_offsets":[0,0]}})",
                     {"tensor 'w'", "over the limit"});
}

// Fuzzing finding (a seed from the golden files): converting an empty float32 tensor memcpy'd 0 bytes
// to the null data pointer of the empty result, which is undefined behaviour.
TEST(Safetensors, EmptyTensorsConvert) {
  auto f = SafetensorsFile::from_bytes(
      file_bytes(
          R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"h":{"dtype":"F16","shape":[0],"data_offsets":[0,0]}})"),
      "mem");
  EXPECT_EQ(f->get("e").to_f32().numel(), 0);
  EXPECT_EQ(f->get("e").to_dtype(DType::BF16).numel(), 0);
  EXPECT_TRUE(f->get("h").to_vector().empty());
  // Fuzzing finding: an empty f64 tensor at offset 4 took the copy for misaligned tensors, a memcpy of 0
  // bytes to the null data of an empty tensor.
  std::string header =
      R"({"p":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"e":{"dtype":"F64","shape":[0],"data_offsets":[4,4]}})";
  header.resize((header.size() + 7) / 8 * 8, ' ');  // the data section 8-aligned, offset 4 is not
  f = SafetensorsFile::from_bytes(file_bytes(header, "abcd"), "mem");
  EXPECT_EQ(f->get("e").numel(), 0);
  EXPECT_EQ(f->get("p").to_vector(), (std::vector<float>{97, 98, 99, 100}));
}

// Nothing pads the header to 8 bytes or aligns the offsets: such tensors are copied, not viewed misaligned.
TEST(Safetensors, UnalignedTensorsAreCopiedToAlignedMemory) {
  const float values[2] = {1.5f, -2.0f};
  std::string data(1, '\0');  // one byte before the floats: offset 1
  data.append(reinterpret_cast<const char*>(values), sizeof values);
  auto bytes = file_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})", data);  // 57-byte header
  auto f = SafetensorsFile::from_bytes(bytes, "mem");
  Tensor w = f->get("w");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w.data()) % alignof(float), 0u);
  EXPECT_EQ(w.to_vector(), (std::vector<float>{1.5f, -2.0f}));
}

// JSON nested a million deep parses, but copying or printing it would overflow the stack later.
TEST(Safetensors, DeeplyNestedHeaderIsRefused) {
  expect_bytes_error(R"({"w":)" + std::string(100000, '[') + std::string(100000, ']') + "}",
                     {"nests deeper than 64 levels"});
}

TEST(Safetensors, MissingFile) { expect_error(temp_path("nope.safetensors"), ErrorKind::NotFound, {"nope"}); }

TEST(Checkpoint, ShardedIndex) {
  namespace fs = std::filesystem;
  std::string dir = temp_path("sharded");
  fs::create_directories(dir);
  write_safetensors(dir + "/m-00001-of-00002.safetensors", {{"a", Tensor::from_f32({2}, {1, 2})}});
  write_safetensors(dir + "/m-00002-of-00002.safetensors", {{"b", Tensor::from_f32({1}, {3})}});
  std::ofstream(dir + "/m.safetensors.index.json")
      << R"({"metadata":{},"weight_map":{"a":"m-00001-of-00002.safetensors","b":"m-00002-of-00002.safetensors"}})";
  Checkpoint c = Checkpoint::open_dir(dir);
  EXPECT_EQ(c.get("a").to_vector(), (std::vector<float>{1, 2}));
  EXPECT_EQ(c.get("b").to_vector(), (std::vector<float>{3}));
  EXPECT_EQ(c.names().size(), 2u);
}

TEST(Checkpoint, MissingShard) {
  namespace fs = std::filesystem;
  std::string dir = temp_path("missing_shard");
  fs::create_directories(dir);
  write_safetensors(dir + "/m-00001-of-00002.safetensors", {{"a", Tensor::from_f32({2}, {1, 2})}});
  std::ofstream(dir + "/m.safetensors.index.json")
      << R"({"weight_map":{"a":"m-00001-of-00002.safetensors","b":"m-00002-of-00002.safetensors"}})";
  zimage::testing::expect_error([&] { Checkpoint::open_dir(dir); }, ErrorKind::NotFound,
                                {"m-00002-of-00002.safetensors", "'b'"});
}

TEST(Checkpoint, IndexShardsMustStayInTheFolder) {
  namespace fs = std::filesystem;
  std::string dir = temp_path("escaping");
  fs::create_directories(dir + "/sub");
  write_safetensors(dir + "/s.safetensors", {{"a", Tensor::from_f32({2}, {1, 2})}});
  for (const std::string shard :
       {"../escaping/s.safetensors", "/etc/passwd", "sub/../s.safetensors", "", "s.safetensors\\u0000x"}) {
    std::ofstream(dir + "/sub/m.safetensors.index.json", std::ios::trunc)
        << R"({"weight_map":{"a":")" + shard + R"("}})";
    try {
      Checkpoint::open_dir(dir + "/sub");
      ADD_FAILURE() << "accepted shard '" << shard << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("invalid shard"), std::string::npos) << e.what();
    }
  }
}

// Found by an input written for the fuzz target: a shard name longer than the file system allows made
// std::filesystem throw its own exception out of open_index instead of an Error.
TEST(Checkpoint, OverlongShardNameIsAnError) {
  namespace fs = std::filesystem;
  std::string dir = temp_path("overlong");
  fs::create_directories(dir);
  std::ofstream(dir + "/m.safetensors.index.json") << R"({"weight_map":{"a":")" + std::string(300, 'x') + R"("}})";
  zimage::testing::expect_error([&] { Checkpoint::open_dir(dir); }, ErrorKind::NotFound,
                                {"is missing (File name too long)"});
}

TEST(Checkpoint, IndexNamesTensorAbsentFromShard) {
  namespace fs = std::filesystem;
  std::string dir = temp_path("absent");
  fs::create_directories(dir);
  write_safetensors(dir + "/s.safetensors", {{"a", Tensor::from_f32({2}, {1, 2})}});
  std::ofstream(dir + "/m.safetensors.index.json") << R"({"weight_map":{"a":"s.safetensors","zz":"s.safetensors"}})";
  EXPECT_THROW(Checkpoint::open_dir(dir), Error);
}

TEST(Safetensors, WriteToAMissingFolderNamesTheFile) {
  zimage::testing::expect_error(
      [] {
        write_safetensors(temp_path("no_such_folder") + "/x.safetensors", {{"a", Tensor::from_f32({1}, {1})}});
      },
      ErrorKind::Io, {"no_such_folder/x.safetensors"});
}

TEST(WriteCheckpoint, ShardsInOrderWithAnIndexAsHuggingFaceDoes) {
  namespace fs = std::filesystem;
  std::string dir = temp_path("written_sharded");
  fs::create_directories(dir);
  // 100 + 100 bytes, 400 bytes (more than a shard: alone), 100 + 40 bytes; shards of <= 250 bytes.
  std::vector<CheckpointEntry> entries = {{"z.first", DType::F32, {25}},
                                          {"a.second", DType::F32, {5, 5}},
                                          {"big", DType::F32, {100}},
                                          {"m.third", DType::BF16, {50}},
                                          {"tail", DType::F32, {10}}};
  std::vector<std::string> asked;
  auto values = [](const CheckpointEntry& e) {
    Tensor t = Tensor::empty(e.shape, DType::F32);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = float(e.name.size() * 1000 + size_t(i));
    return e.dtype == DType::F32 ? t : t.to_dtype(e.dtype);
  };
  WrittenCheckpoint w = write_checkpoint(dir, "m", entries, 250, [&](const CheckpointEntry& e) {
    asked.push_back(e.name);
    return values(e);
  });
  EXPECT_EQ(w.total_bytes, 100u + 100u + 100u + 400u + 40u);
  EXPECT_EQ(w.files, (std::vector<std::string>{"m-00001-of-00003.safetensors", "m-00002-of-00003.safetensors",
                                               "m-00003-of-00003.safetensors", "m.safetensors.index.json"}));
  // Inside a shard the tensors go in name order (as safetensors writes them), asked for in that order.
  EXPECT_EQ(asked, (std::vector<std::string>{"a.second", "z.first", "big", "m.third", "tail"}));
  auto index = nlohmann::json::parse(std::ifstream(dir + "/m.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 740);
  EXPECT_EQ(index["weight_map"]["z.first"], "m-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["a.second"], "m-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["big"], "m-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["m.third"], "m-00003-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["tail"], "m-00003-of-00003.safetensors");
  auto shard = SafetensorsFile::open(dir + "/m-00001-of-00003.safetensors");
  EXPECT_EQ(shard->metadata().at("format"), "pt");
  EXPECT_EQ(shard->entries().at("a.second").begin, 0u);  // name order in the data section too
  Checkpoint c = Checkpoint::open_dir(dir);
  EXPECT_EQ(c.names().size(), entries.size());
  for (const auto& e : entries) {
    EXPECT_EQ(c.get(e.name).dtype(), e.dtype) << e.name;
    EXPECT_EQ(c.get(e.name).to_vector(), values(e).to_vector()) << e.name;
  }
  for (const auto& f : fs::directory_iterator(dir)) EXPECT_NE(f.path().extension(), ".tmp") << f.path();
}

TEST(WriteCheckpoint, OneShardIsOneFileWithoutIndex) {
  namespace fs = std::filesystem;
  std::string dir = temp_path("written_single");
  fs::create_directories(dir);
  auto one = [](const CheckpointEntry&) { return Tensor::from_f32({2}, {1, 2}); };
  WrittenCheckpoint w = write_checkpoint(dir, "diffusion_pytorch_model", {{"a", DType::F32, {2}}}, 1u << 20, one);
  EXPECT_EQ(w.files, std::vector<std::string>{"diffusion_pytorch_model.safetensors"});
  EXPECT_EQ(Checkpoint::open_dir(dir).get("a").to_vector(), (std::vector<float>{1, 2}));
}

TEST(WriteCheckpoint, ATensorUnlikeItsEntryIsRefusedAndLeavesNoFile) {
  namespace fs = std::filesystem;
  std::string dir = temp_path("written_bad");
  fs::create_directories(dir);
  try {
    auto f32 = [](const CheckpointEntry&) { return Tensor::from_f32({2}, {1, 2}); };
    write_checkpoint(dir, "m", {{"a", DType::BF16, {2}}}, 1u << 20, f32);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'a'"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::is_empty(dir));
}

TEST(Checkpoint, PrefetchLeavesTheTensorsAsTheyAre) {
  Checkpoint c = Checkpoint::open_dir(golden_path("tiny-zimage/transformer"));
  std::vector<float> before = c.get("x_pad_token").to_vector();
  c.prefetch();
  c.prefetch();  // idempotent
  EXPECT_EQ(c.get("x_pad_token").to_vector(), before);
  const auto& file = *c.files().front();
  file.prefetch(0, file.size_bytes());
  file.prefetch(file.size_bytes() + 4096, 4096);  // past the end: nothing to do
  // Destroyed at once: the readers stop.
  Checkpoint::open_dir(golden_path("tiny-zimage/vae")).prefetch();
}
