// Times reading every weight of a model folder through Checkpoint, the host half of a model load:
// each tensor (in the order the models load them: text encoder, DiT, VAE) is copied in 16 MiB pieces
// into one reused buffer, as the CUDA backend fills its pinned staging buffers. No GPU needed.
//   bench_checkpoint_read DIR [--evict] [--prefetch] [--copy-threads N]
// --evict drops the folder's files from the page cache first (posix_fadvise DONTNEED on those files only:
// a cold read without touching the rest of the machine's cache); --prefetch starts the model's background
// readers (ModelSource::prefetch_weights) as the engine does; --copy-threads N copies each piece with N
// threads of the pool (1: one memcpy, the upload path before the parallel fill).
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "core/parallel.h"
#include "model/model_source.h"
#include "model/qwen3.h"
#include "model/vae.h"
#include "model/zimage_dit.h"

using namespace zimage;
namespace fs = std::filesystem;

namespace {

void evict(const std::string& dir) {
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file() || e.path().extension() != ".safetensors") continue;
    int fd = ::open(e.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    ::fdatasync(fd);  // dirty pages cannot be dropped
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MODEL_DIR [--evict] [--prefetch] [--copy-threads N]\n", argv[0]);
    return 2;
  }
  std::string dir = argv[1];
  bool do_evict = false, prefetch = false;
  int copy_threads = 1;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--evict")
      do_evict = true;
    else if (a == "--prefetch")
      prefetch = true;
    else if (a == "--copy-threads" && i + 1 < argc)
      copy_threads = std::atoi(argv[++i]);
  }
  if (do_evict) evict(dir);

  const size_t kPiece = size_t(16) << 20;
  std::vector<char> buffer(kPiece);
  auto t0 = std::chrono::steady_clock::now();
  ModelSource m = open_model(dir);
  if (prefetch) m.prefetch_weights();
  double open_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  struct Part {
    const char* name;
    std::vector<WeightSpec> specs;
    const WeightSource& ws;
  };
  const Part parts[] = {{"text_encoder", Qwen3TextEncoder::weight_specs(m.text_encoder), *m.text_encoder_weights},
                        {"transformer", ZImageDit::weight_specs(m.transformer), *m.transformer_weights},
                        {"vae", Vae::weight_specs(m.vae), *m.vae_weights}};
  size_t total = 0;
  for (const auto& p : parts) {
    auto tp = std::chrono::steady_clock::now();
    size_t bytes = 0;
    for (const auto& s : p.specs) {
      Tensor t = p.ws.get(s.name, s.shape);
      const char* src = static_cast<const char*>(t.data());
      for (size_t off = 0; off < t.nbytes(); off += kPiece) {
        size_t n = std::min(kPiece, t.nbytes() - off);
        if (copy_threads <= 1) {
          std::memcpy(buffer.data(), src + off, n);
        } else {
          int64_t piece = int64_t((n + size_t(copy_threads) - 1) / size_t(copy_threads));
          parallel_for(int64_t(n), piece, [&](int64_t lo, int64_t hi) {
            std::memcpy(buffer.data() + lo, src + off + size_t(lo), size_t(hi - lo));
          });
        }
      }
      bytes += t.nbytes();
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - tp).count();
    std::printf("  %-13s %6.2f GB in %6.2f s  %6.2f GB/s\n", p.name, double(bytes) / 1e9, s, double(bytes) / 1e9 / s);
    total += bytes;
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s%s%s, copy threads %d: %.2f GB in %.2f s (open %.3f s)  %.2f GB/s\n", dir.c_str(),
              do_evict ? " cold" : " warm", prefetch ? " +prefetch" : "", copy_threads, double(total) / 1e9, s, open_s,
              double(total) / 1e9 / s);
  return 0;
}
