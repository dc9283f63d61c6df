// Input: a `model.safetensors.index.json`, opened by Checkpoint::open_index in a folder that holds two
// real shards (written once at start-up): the JSON checks, the shard names (no path may leave the
// folder) and the cross-check of every listed tensor against its shard all run. Each accepted tensor
// is read.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "fuzz_common.h"
#include "io/safetensors.h"

namespace {

namespace fs = std::filesystem;

// The folder with the shards; removed at exit.
struct Folder {
  fs::path dir = fs::temp_directory_path() / ("zimage-fuzz-index-" + std::to_string(::getpid()));
  Folder() {
    using zimage::Tensor;
    fs::create_directories(dir);
    zimage::write_safetensors((dir / "model-00001-of-00002.safetensors").string(),
                              {{"a", Tensor::from_f32({2}, {1, 2})}, {"b.weight", Tensor::from_f32({1}, {3})}});
    zimage::write_safetensors((dir / "model-00002-of-00002.safetensors").string(),
                              {{"c", Tensor::from_f32({2, 2}, {4, 5, 6, 7})}});
  }
  ~Folder() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage;
  static const Folder folder;
  const std::string index = (folder.dir / "model.safetensors.index.json").string();
  std::ofstream(index, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data), long(size));
  fuzz::expect_clean_errors([&] {
    const Checkpoint c = Checkpoint::open_index(index);
    for (const std::string& name : c.names()) FUZZ_CHECK(c.get(name).to_f32().numel() == c.get(name).numel());
  });
  return 0;
}
