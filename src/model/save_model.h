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

// `zimage save-model --format comfyui|gguf`: the diffusion model alone, as the single files ComfyUI users
// have, under ComfyUI's names (attention.qkv fused, x_embedder, final_layer, ...):
//   comfyui: safetensors, names under "model.diffusion_model."; bf16, or with --quantize fp8 ComfyUI's
//     scaled FP8: the blocks' and the final adaLN's matrices as float8_e4m3fn with a float32
//     `<module>.scale_weight` (max |w| / 448, so the largest weight maps to e4m3's largest value) and the
//     `scaled_fp8` marker; embedders, final projection, norms, biases and pad tokens stay bf16, as in
//     ComfyUI's own Z-Image FP8 files.
//   gguf: city96's ComfyUI-GGUF layout (architecture "lumina2", names without a prefix), the tensor types
//     its tools give: tools/convert.py keeps 1-D tensors and those of <= 1024 values in F32, and its
//     llama.cpp patch quantizes the remaining ".weight" matrices except final_layer.linear (F32) and the
//     rest of final_layer; a matrix whose rows are not whole blocks, final_layer's others and the pad
//     tokens stay at the source's precision, BF16 (city96's patch picks F16 for those, for the
//     convolutions of UNets; BF16 keeps a bf16 source exact).
// Quantizers: ggml_quantize (io/gguf.h). Memory holds one tensor at a time (and its quantized copy).
enum class DitQuantization { None, Fp8, Q8_0, Q4_K };
enum class DitFileFormat { ComfyUi, Gguf };

struct SavedDiffusionModel {
  int64_t tensors = 0, quantized = 0;  // tensors written; of them quantized
  uint64_t bytes = 0;                  // the file's size
};

// Writes `model`'s diffusion model to the file `path` (replaced only when `overwrite`). Errors:
// InvalidArgument for a quantization the format does not have (fp8 is comfyui's, q8_0 / q4_k gguf's) or
// an existing file, Io naming the file for a failed write.
SavedDiffusionModel save_diffusion_model(const ModelSource& model, const std::string& path, DitFileFormat format,
                                         DitQuantization quantize, bool overwrite = false);

}  // namespace zimage
