// Input: a whole safetensors file (u64 header length, JSON header, tensor bytes), parsed by the code
// SafetensorsFile::open runs on its mapping. Every tensor the parser accepts is read in full and
// converted to float32, so a byte range that escapes the file is an ASan report, and an accepted shape
// must match its bytes exactly.
#include <cstdint>
#include <vector>

#include "fuzz_common.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage;
  fuzz::expect_clean_errors([&] {
    auto file = SafetensorsFile::from_bytes(std::vector<uint8_t>(data, data + size), "fuzz.safetensors");
    FUZZ_CHECK(file->entries().size() <= SafetensorsFile::kMaxTensors);
    for (const auto& [name, entry] : file->entries()) {
      const Tensor t = file->get(name);
      FUZZ_CHECK(t.nbytes() == entry.end - entry.begin);
      FUZZ_CHECK(entry.end <= size);
      const Tensor f = t.to_f32();
      FUZZ_CHECK(f.numel() == t.numel());
    }
  });
  return 0;
}
