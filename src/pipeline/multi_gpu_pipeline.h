// Several GPUs generating one request together (`--num-gpus N`): one TextToImagePipeline per rank,
// each with the whole model on its own backend, run by a RankWorld (one thread per GPU). The
// denoising loop splits every DiT call: each image's tokens over the U R ranks of a CFG branch (split
// along native H or W), attention by all-to-all over heads within Ulysses groups of U and by K/V blocks
// passed around rings of R (parallel/usp_attention.h), and with --cfg-parallel the positive and
// negative branches of a CFG batch over two such groups. Every rank keeps the whole latents, so the
// scheduler and the noise are exactly those of one GPU.
//
// Where the other stages run: the text encoder on every rank (8 ms at full size, less than sending its
// output around, and each rank needs the embeddings), the VAE decode on rank 0 only.
#pragma once

#include <memory>
#include <vector>

#include "parallel/parallel_config.h"
#include "parallel/rank_world.h"
#include "pipeline/text_to_image.h"

namespace zimage {

class MultiGpuPipeline final : public ImageGenerator {
 public:
  // backends[r] runs world rank r (GPU r, ranks [0, U) the positive CFG branch and [U, 2U) the negative
  // one); backends and world must outlive the pipeline. Loads the model on every rank in parallel.
  MultiGpuPipeline(const std::vector<Backend*>& backends, RankWorld& world, const ModelSource& model,
                   const ParallelConfig& config, PipelineLimits limits = {});

  // The rank's checks, and that the image has a patch row or column for every shard.
  GenerateRequest resolve(GenerateRequest r) const override;
  // Rank 0's result (images, latents, stage times).
  GenerateResult generate(const GenerateRequest& request,
                          const std::function<void(int, int)>& progress = nullptr) override;
  Backend& backend() override { return ranks_[0]->backend(); }
  int size_multiple() const override { return ranks_[0]->size_multiple(); }

 private:
  RankWorld& world_;
  ParallelConfig config_;
  std::vector<std::unique_ptr<Communicator>> ulysses_, ring_, cfg_;  // indexed by world rank; empty when unused
  std::vector<std::unique_ptr<TextToImagePipeline>> ranks_;
};

}  // namespace zimage
