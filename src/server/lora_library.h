// The adapters `zimage serve --lora-dir DIR` makes available: every DIR/<name>.safetensors, named by its
// stem. A request names them ("lora": [{"name": "x", "scale": 0.8}]); the files are read on first use and
// kept, the least recently used dropped beyond --lora-cache. The base weights never change: adapters run
// per batch item at run time (model/linear.h).
#pragma once

#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "model/lora.h"
#include "model/weight_spec.h"

namespace zimage::server {

struct LoraRef {
  std::string name;
  float scale = 1.0f;
};

class LoraLibrary {
 public:
  // `specs`: the DiT's weights (ZImageDit::weight_specs), what the adapters' keys map onto.
  LoraLibrary(std::string dir, std::vector<WeightSpec> specs, size_t capacity);
  const std::vector<std::string>& names() const { return names_; }  // sorted
  // The named adapters with their scales; Error(NotFound) for a name not in the folder, or the file's
  // own Error when it is not a LoRA this engine can apply.
  std::vector<ScaledLora> resolve(const std::vector<LoraRef>& refs);

 private:
  std::string dir_;
  std::vector<WeightSpec> specs_;
  size_t capacity_;
  std::vector<std::string> names_;
  std::mutex mutex_;
  std::list<std::shared_ptr<const LoraAdapter>> loaded_;  // most recently used first
};

}  // namespace zimage::server
