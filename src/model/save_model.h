// `zimage save-model`: a model written out as a diffusers-layout folder that open_model reads back, laid
// out as Tongyi-MAI/Z-Image-Turbo is: model_index.json, the component configs, the tokenizer files, and
// every weight the models load (their weight_specs) in bf16 as safetensors shards with an index:
//   transformer/diffusion_pytorch_model-0000k-of-0000n.safetensors (+ .safetensors.index.json)
//   text_encoder/model-0000k-of-0000n.safetensors (+ model.safetensors.index.json), names under "model."
//   vae/diffusion_pytorch_model.safetensors
// It turns synthetic:turbo into real files, so that loading is measured as it happens with a download.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/model_source.h"

namespace zimage {

struct SaveModelOptions {
  // Largest shard, bytes of tensor data. 0: as the real checkpoint, 5 GB shards for the transformer,
  // 4 GB for the text encoder (3 shards each at full size) and one file for the VAE.
  uint64_t shard_bytes = 0;
  // Replace a model folder already at the destination (its model_index.json and component folders are
  // deleted first). Without it the destination must be absent or empty.
  bool overwrite = false;
};

struct SavedModel {
  std::vector<std::string> files;  // paths relative to the folder, in the order written
  uint64_t weight_bytes = 0;       // tensor bytes over all checkpoints
};

// Writes `model` into `dir`; model_index.json is written last, so an interrupted save leaves a folder
// that open_model refuses. Memory holds one tensor at a time. Errors: InvalidArgument for a destination
// that is not empty (or is the source), Io naming the file for a failed write or too little disk space.
SavedModel save_model(const ModelSource& model, const std::string& dir, const SaveModelOptions& options = {});

}  // namespace zimage
