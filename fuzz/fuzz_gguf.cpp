// Input: a whole GGUF file, parsed by the code GgufFile::open runs on its mapping. Every tensor the
// parser accepts is read in full and dequantized, so a byte range that escapes the file is an ASan
// report, and an accepted tensor's bytes must lie inside the input.
#include <cstdint>
#include <vector>

#include "fuzz_common.h"
#include "io/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage;
  fuzz::expect_clean_errors([&] {
    auto file = GgufFile::from_bytes(std::vector<uint8_t>(data, data + size), "fuzz.gguf");
    FUZZ_CHECK(file->tensors().size() <= GgufFile::kMaxTensors);
    for (const auto& [name, info] : file->tensors()) {
      FUZZ_CHECK(info.offset + info.nbytes <= size);
      if (info.nbytes > (64u << 20)) continue;  // accepted, but too large to dequantize in a fuzz run
      const Tensor t = file->get(name);
      FUZZ_CHECK(t.numel() == shape_numel(info.shape()));
    }
  });
  return 0;
}
