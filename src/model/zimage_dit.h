// The Z-Image diffusion transformer (diffusers' ZImageTransformer2DModel), written once against the
// Backend interface. One call runs a batch of items that share the image size but may differ in
// caption length: image tokens and caption tokens are padded to multiples of 32 (pad tokens),
// refined separately (noise_refiner with adaLN modulation, context_refiner without), joined as
// [image, caption] per item, run through the main layers, and projected back to latent patches.
// Items are padded to a common length with key masking between them.
// forward_sharded runs the same computation over several ranks (Ulysses sequence parallelism): each
// rank holds its band of the image tokens (parallel/sequence_parallel_plan.h), captions replicated,
// attention through parallel/ulysses_attention.h.
// Hook point (DESIGN.md §4): with a ControlNet set (set_control, model/zimage_controlnet.h) its control
// blocks run on the same block code and token layout, and their outputs join the residual stream of the
// layers they control inside the fused residual + norm kernel.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "io/config.h"
#include "model/linear.h"
#include "model/weight_spec.h"
#include "model/weights.h"
#include "parallel/communicator.h"
#include "parallel/sequence_parallel_plan.h"
#include "parallel/ulysses_attention.h"
#include "parallel/usp_attention.h"

namespace zimage {

struct DitConfig {
  int64_t dim = 0, heads = 0, head_dim = 0, layers = 0, refiner_layers = 0, in_channels = 0;
  int64_t patch = 2, cap_feat_dim = 0, ffn_hidden = 0, adaln_dim = 0;
  std::vector<int64_t> axes_dims;
  double rope_theta = 256.0, t_scale = 1000.0, norm_eps = 1e-5;
  static DitConfig from(const Config& c);
};

// Token layout of one forward call (computed on the host from the item sizes; exposed for tests and
// for the sequence-parallel planner).
struct DitLayout {
  static constexpr int64_t kSeqMultiple = 32;
  int64_t items = 0, grid_h = 0, grid_w = 0;  // latent patches per side
  int64_t image_tokens = 0, image_padded = 0;  // per item (equal for all items)
  std::vector<int64_t> cap_len, cap_padded;    // per item
  int64_t cap_max = 0, unified_max = 0;        // padded batch lengths
};
DitLayout dit_layout(int64_t items, int64_t latent_h, int64_t latent_w, int64_t patch,
                     const std::vector<int64_t>& cap_lengths);

// One transformer block (diffusers' ZImageTransformerBlock): the DiT's layers and refiners, and, with
// before_proj (the first one only) and after_proj, a ControlNet's control blocks.
struct DitBlock {
  Tensor norm1, norm2, ffn_norm1, ffn_norm2, norm_q, norm_k;
  Linear qkv, out, w13, w2;
  Linear before_proj, after_proj;  // control blocks only (w undefined otherwise)
  int64_t mod_offset = -1;  // column of this block's 4*dim modulation in its packed adaLN output; -1: none
};
// The tensors of the block under `prefix` ("layers.3."), as diffusers names them.
void add_dit_block_specs(std::vector<WeightSpec>& specs, const DitConfig& c, const std::string& prefix, bool modulated);
DitBlock load_dit_block(Backend& be, const DitConfig& c, const WeightSource& ws, const std::string& prefix);
// The adaLN Linears (A -> 4*dim) of the blocks under `prefixes` stacked into one, so the modulations of a
// whole forward are one [N, A] x [A, blocks*4*dim] GEMM; sets each block's mod_offset.
Linear load_adaln_stack(Backend& be, const DitConfig& c, const WeightSource& ws,
                        const std::vector<std::pair<DitBlock*, std::string>>& blocks);

class ZImageControlNet;

class ZImageDit {
 public:
  ZImageDit(Backend& be, const Config& cfg, const WeightSource& ws);
  const DitConfig& config() const { return cfg_; }
  // Every tensor the constructor loads, as diffusers stores it (`layers.12.attention.to_q.weight`, ...).
  static std::vector<WeightSpec> weight_specs(const Config& cfg);

  // latents [N, C, h, w] (float32 or activation dtype), t[N] the DiT time ((1000 - timestep) / 1000),
  // caps[N] caption features [len_i, cap_feat_dim]. Returns the raw model output [N, C, h, w] float32.
  Tensor forward(const Tensor& latents, const std::vector<float>& t, const std::vector<Tensor>& caps);

  // Row maps and RoPE tables of one token layout (batch, latent size, caption lengths), on the device.
  struct LayoutPlan;
  // The plan for these arguments (the last one is kept: a request's steps share it).
  std::shared_ptr<const LayoutPlan> layout_plan(const Tensor& latents, const std::vector<Tensor>& caps);
  // forward() with t as a float32 [N] backend tensor and the plan of the arguments' layout: device work
  // only, what a recorded graph replays (it holds the plan: the replays read its tensors).
  Tensor forward(const LayoutPlan& plan, const Tensor& latents, const Tensor& t, const std::vector<Tensor>& caps);
  // The same call on one rank of a sequence-parallel group: every rank passes the same arguments and
  // `plan` (for this latent grid, U = ulysses->size() and R = ring->size(), a null communicator counting
  // as one rank, and this model's heads); the rank holds shard ring->rank() * U + ulysses->rank(), and
  // every rank returns the whole output, equal to forward()'s.
  Tensor forward_sharded(const Tensor& latents, const std::vector<float>& t, const std::vector<Tensor>& caps,
                         const SequenceParallelPlan& plan, Communicator* ulysses, Communicator* ring);

  // Runtime LoRA (model/linear.h): an adapter set prepared on the device for this model's projections,
  // and the sets of the items of the following forward calls (an item without one: null). A call of
  // twice the items (CFG: [positives | negatives]) uses the list for both halves. Base weights never change.
  std::shared_ptr<const LoraSet> prepare_lora(const std::vector<ScaledLora>& adapters) const;
  void set_lora(LoraBatch batch) { lora_ = std::move(batch); }
  // The batch for `items` images grouped as `groups` (empty: no adapters); the prepared sets are kept by
  // adapters and scales (the kLoraSetsKept most recently used), so a request's steps and the requests that
  // repeat an adapter reuse them. Throws InvalidArgument when the counts do not sum to `items`.
  void set_lora(const std::vector<LoraGroup>& groups, int64_t items);
  static constexpr size_t kLoraSetsKept = 8;
  bool has_lora() const { return lora_.any(); }

  // The ControlNet of the following forward calls: control latents [Bc, in, h, w] (float32 on the device;
  // call item i uses latents i % Bc, so a CFG call's two halves share them) and the conditioning scale.
  // nullopt: none (the control blocks are skipped).
  struct Control {
    std::shared_ptr<const ZImageControlNet> net;
    Tensor latents;
    float scale = 0.75f;
  };
  void set_control(std::optional<Control> control) { control_ = std::move(control); }
  bool has_control() const { return control_.has_value(); }

 private:
  using Block = DitBlock;
  struct Sharding {  // this call's share of a sequence-parallel group
    const SequenceParallelPlan& plan;
    Communicator* ulysses;  // null when U = 1
    Communicator* ring;     // null when R = 1
    int shard() const { return (ring ? ring->rank() : 0) * plan.ulysses + (ulysses ? ulysses->rank() : 0); }
  };
  Tensor run(const LayoutPlan& plan, const Tensor& latents, const Tensor& t, const std::vector<Tensor>& caps,
             const Sharding* sp);
  std::shared_ptr<const LayoutPlan> plan_for(const Tensor& latents, const std::vector<Tensor>& caps,
                                             const Sharding* sp);
  struct Modulation {  // one block's adaLN chunks [B, dim]; none (on = false) in the context refiner
    Tensor scale_msa, gate_msa, scale_mlp, gate_mlp;
    bool on = false;
  };
  Modulation modulation(const Block& b, const Tensor* mod);
  struct Stage;
  // Runs `blocks` in order on x [n, rows, dim] in place. extra_after(i), when set, gives what to add to
  // the residual stream after block i (undefined: nothing): a ControlNet's hook.
  void run_blocks(std::span<const Block> blocks, Tensor& x, const Tensor* mod, const Stage& st, const Sharding* sp,
                  const LoraBatch* lora, const std::function<Tensor(size_t)>& extra_after = {});
  // The control latents of `control_` embedded as control tokens [n, image rows, dim] of this layout.
  Tensor control_tokens(const LayoutPlan& plan, int64_t n, int64_t lh, int64_t lw);
  // Control blocks `blocks` over c (the first adds before_proj(c) to `x`), in place; returns each block's
  // after_proj output times the scale.
  std::vector<Tensor> run_control_blocks(std::span<const Block> blocks, Tensor& c, const Tensor& x,
                                         const Tensor& cmod, const Stage& st, const Sharding* sp, size_t hints);

  Backend& be_;
  DitConfig cfg_;
  Linear t_mlp0_, t_mlp2_, cap_proj_, x_proj_, final_mod_, final_proj_;
  Tensor cap_norm_, x_pad_, cap_pad_;
  Linear mod_;  // every modulated block's adaLN Linear(A -> 4*dim) stacked: one GEMM per call
  std::vector<Block> noise_refiner_, context_refiner_, layers_;
  std::shared_ptr<const LayoutPlan> plan_;  // of the last call: a request's steps all share it
  LoraBatch lora_;
  std::vector<std::pair<std::string, std::shared_ptr<const LoraSet>>> lora_sets_;  // most recent first
  std::optional<Control> control_;
};

// What one sequence (image tokens, caption tokens, unified) attends with: RoPE tables of its rows,
// and key lengths per item on one rank, or when sharded the Ulysses row maps (R = 1) or the Ulysses x
// ring ones.
struct ZImageDit::Stage {
  Tensor cos, sin;
  std::vector<int> key_len;
  std::unique_ptr<UlyssesLayout> ulysses;
  std::unique_ptr<UspLayout> usp;
};

struct ZImageDit::LayoutPlan {
  std::vector<int64_t> key;  // items, grid h, grid w, degree, rank, caption lengths
  DitLayout layout;
  int64_t image_rows = 0;                   // image rows per item on this rank: image_padded, or the plan's local_len
  Tensor x_idx, cap_idx, u_idx, final_idx;  // int32 row maps (gather_rows) on the device
  Tensor gather_idx;  // sharded: every rank's final rows [U, n, image_rows] -> [n, N] in grid order
  Stage x, cap, u;
};

}  // namespace zimage
