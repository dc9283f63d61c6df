#include "model/zimage_dit.h"

#include <algorithm>
#include <array>
#include <cmath>

#include "core/error.h"
#include "model/rope.h"
#include "model/weight_loading.h"
#include "model/zimage_controlnet.h"

namespace zimage {

namespace {
constexpr float kQkNormEps = 1e-5f;     // diffusers builds the q/k RMSNorms with eps 1e-5 regardless of norm_eps
constexpr float kFinalNormEps = 1e-6f;  // FinalLayer's LayerNorm
constexpr int64_t kAdalnMax = 256;      // ADALN_EMBED_DIM
// Far above any DiT's width, small enough that products of sizes cannot overflow.
constexpr int64_t kMaxSize = int64_t(1) << 20;
constexpr int64_t kTimeMlpHidden = 1024;
constexpr int64_t kTimeFeatures = 256;
constexpr float kTimeMaxPeriod = 10000.0f;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
}  // namespace

DitConfig DitConfig::from(const Config& c) {
  DitConfig d;
  d.dim = c.integer_in("dim", 1, kMaxSize);
  d.heads = c.integer_in("n_heads", 1, 1024);
  ZI_CHECK(c.integer_or("n_kv_heads", d.heads) == d.heads, ErrorKind::Format,
           c.where() + ": n_kv_heads different from n_heads is not a Z-Image configuration");
  ZI_CHECK(d.dim % d.heads == 0, ErrorKind::Format, c.where() + ": dim is not a multiple of n_heads");
  d.head_dim = d.dim / d.heads;
  d.layers = c.integer_in("n_layers", 1, 1024);
  d.refiner_layers = c.integer_in("n_refiner_layers", 0, 1024);
  d.in_channels = c.integer_in("in_channels", 1, kMaxSize);
  auto patches = c.integers("all_patch_size");
  auto f_patches = c.integers("all_f_patch_size");
  ZI_CHECK(patches.size() == 1 && f_patches.size() == 1 && f_patches[0] == 1, ErrorKind::Format,
           c.where() + ": only one patch size with f_patch_size 1 is supported");
  ZI_CHECK(patches[0] >= 1 && patches[0] <= 64, ErrorKind::Format,
           c.where() + ": all_patch_size " + std::to_string(patches[0]) + " is outside 1 to 64");
  d.patch = patches[0];
  d.cap_feat_dim = c.integer_in("cap_feat_dim", 1, kMaxSize);
  d.ffn_hidden = int64_t(double(d.dim) / 3.0 * 8.0);
  d.adaln_dim = std::min(d.dim, kAdalnMax);
  d.axes_dims = c.integers("axes_dims");
  // Each axis is checked before the sum, which could otherwise overflow.
  const auto& axes = d.axes_dims;
  bool axes_ok = axes.size() == 3;
  for (int64_t a : axes) axes_ok = axes_ok && a > 0 && a <= d.head_dim && a % 2 == 0;  // RoPE rotates pairs
  ZI_CHECK(axes_ok && axes[0] + axes[1] + axes[2] == d.head_dim, ErrorKind::Format,
           c.where() + ": axes_dims must be 3 even values summing to the head dim");
  d.rope_theta = c.number("rope_theta");
  d.t_scale = c.number("t_scale");
  d.norm_eps = c.number("norm_eps");
  ZI_CHECK(d.rope_theta > 0 && d.norm_eps > 0, ErrorKind::Format,
           c.where() + ": rope_theta and norm_eps must be positive");
  ZI_CHECK(c.boolean_or("qk_norm", true), ErrorKind::Format, c.where() + ": qk_norm false is not supported");
  return d;
}

DitLayout dit_layout(int64_t items, int64_t latent_h, int64_t latent_w, int64_t patch,
                     const std::vector<int64_t>& cap_lengths) {
  ZI_ASSERT(int64_t(cap_lengths.size()) == items && latent_h % patch == 0 && latent_w % patch == 0);
  DitLayout l;
  l.items = items;
  l.grid_h = latent_h / patch;
  l.grid_w = latent_w / patch;
  l.image_tokens = l.grid_h * l.grid_w;
  l.image_padded = round_up(l.image_tokens, DitLayout::kSeqMultiple);
  for (int64_t n : cap_lengths) {
    ZI_CHECK(n >= 1, ErrorKind::InvalidArgument, "a caption has no tokens");
    l.cap_len.push_back(n);
    l.cap_padded.push_back(round_up(n, DitLayout::kSeqMultiple));
    l.cap_max = std::max(l.cap_max, l.cap_padded.back());
    l.unified_max = std::max(l.unified_max, l.image_padded + l.cap_padded.back());
  }
  return l;
}

std::vector<WeightSpec> ZImageDit::weight_specs(const Config& cfg) {
  const DitConfig c = DitConfig::from(cfg);
  const int64_t a = c.adaln_dim, patch_dim = c.patch * c.patch * c.in_channels;
  const std::string px = "all_x_embedder." + std::to_string(c.patch) + "-1.";
  const std::string pf = "all_final_layer." + std::to_string(c.patch) + "-1.";
  std::vector<WeightSpec> s = {
      {"t_embedder.mlp.0.weight", {kTimeMlpHidden, kTimeFeatures}},
      {"t_embedder.mlp.0.bias", {kTimeMlpHidden}},
      {"t_embedder.mlp.2.weight", {a, kTimeMlpHidden}},
      {"t_embedder.mlp.2.bias", {a}},
      {"cap_embedder.0.weight", {c.cap_feat_dim}},
      {"cap_embedder.1.weight", {c.dim, c.cap_feat_dim}},
      {"cap_embedder.1.bias", {c.dim}},
      {px + "weight", {c.dim, patch_dim}},
      {px + "bias", {c.dim}},
      {"x_pad_token", {1, c.dim}},
      {"cap_pad_token", {1, c.dim}},
      {pf + "adaLN_modulation.1.weight", {c.dim, a}},
      {pf + "adaLN_modulation.1.bias", {c.dim}},
      {pf + "linear.weight", {patch_dim, c.dim}},
      {pf + "linear.bias", {patch_dim}},
  };
  for (int64_t i = 0; i < c.refiner_layers; ++i) add_dit_block_specs(s, c, "noise_refiner." + std::to_string(i) + ".", true);
  for (int64_t i = 0; i < c.refiner_layers; ++i)
    add_dit_block_specs(s, c, "context_refiner." + std::to_string(i) + ".", false);
  for (int64_t i = 0; i < c.layers; ++i) add_dit_block_specs(s, c, "layers." + std::to_string(i) + ".", true);
  return s;
}

void add_dit_block_specs(std::vector<WeightSpec>& s, const DitConfig& c, const std::string& p, bool modulated) {
  for (const char* n : {"attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"})
    s.push_back({p + n + ".weight", {c.dim}});
  for (const char* n : {"to_q", "to_k", "to_v", "to_out.0"}) s.push_back({p + "attention." + n + ".weight", {c.dim, c.dim}});
  s.push_back({p + "attention.norm_q.weight", {c.head_dim}});
  s.push_back({p + "attention.norm_k.weight", {c.head_dim}});
  s.push_back({p + "feed_forward.w1.weight", {c.ffn_hidden, c.dim}});
  s.push_back({p + "feed_forward.w3.weight", {c.ffn_hidden, c.dim}});
  s.push_back({p + "feed_forward.w2.weight", {c.dim, c.ffn_hidden}});
  if (modulated) {
    s.push_back({p + "adaLN_modulation.0.weight", {4 * c.dim, c.adaln_dim}});
    s.push_back({p + "adaLN_modulation.0.bias", {4 * c.dim}});
  }
}

DitBlock load_dit_block(Backend& be, const DitConfig& c, const WeightSource& ws, const std::string& p) {
  DitBlock b;
  b.norm1 = load_weight(be, ws, p + "attention_norm1.weight", {c.dim});
  b.norm2 = load_weight(be, ws, p + "attention_norm2.weight", {c.dim});
  b.ffn_norm1 = load_weight(be, ws, p + "ffn_norm1.weight", {c.dim});
  b.ffn_norm2 = load_weight(be, ws, p + "ffn_norm2.weight", {c.dim});
  b.qkv = load_packed_linear(be, ws,
                             {p + "attention.to_q.weight", p + "attention.to_k.weight", p + "attention.to_v.weight"},
                             {{c.dim, c.dim}, {c.dim, c.dim}, {c.dim, c.dim}});
  b.norm_q = load_weight(be, ws, p + "attention.norm_q.weight", {c.head_dim});
  b.norm_k = load_weight(be, ws, p + "attention.norm_k.weight", {c.head_dim});
  b.out = load_linear(be, ws, p + "attention.to_out.0.weight", {c.dim, c.dim});
  b.w13 = load_packed_linear(be, ws, {p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"},
                             {{c.ffn_hidden, c.dim}, {c.ffn_hidden, c.dim}});
  b.w2 = load_linear(be, ws, p + "feed_forward.w2.weight", {c.dim, c.ffn_hidden});
  return b;
}

Linear load_adaln_stack(Backend& be, const DitConfig& c, const WeightSource& ws,
                        const std::vector<std::pair<DitBlock*, std::string>>& blocks) {
  std::vector<std::string> names;
  std::vector<Shape> shapes;
  for (const auto& [b, p] : blocks) {
    b->mod_offset = int64_t(names.size()) * 4 * c.dim;
    names.push_back(p + "adaLN_modulation.0.weight");
    shapes.push_back({4 * c.dim, c.adaln_dim});
  }
  Linear l = load_packed_linear(be, ws, names, shapes);
  // The biases stack the same way, into one [blocks * 4 * dim] vector.
  Tensor packed_bias = Tensor::empty({int64_t(blocks.size()) * 4 * c.dim}, DType::F32);
  for (size_t i = 0; i < blocks.size(); ++i) {
    Tensor bias = host_f32(ws, blocks[i].second + "adaLN_modulation.0.bias", {4 * c.dim});
    std::copy(bias.f32(), bias.f32() + 4 * c.dim, packed_bias.f32() + int64_t(i) * 4 * c.dim);
  }
  l.bias = be.upload(packed_bias);
  return l;
}

ZImageDit::ZImageDit(Backend& be, const Config& cfg, const WeightSource& ws) : be_(be), cfg_(DitConfig::from(cfg)) {
  const auto& c = cfg_;
  const int64_t a = c.adaln_dim, patch_dim = c.patch * c.patch * c.in_channels;
  const std::string px = "all_x_embedder." + std::to_string(c.patch) + "-1.";
  const std::string pf = "all_final_layer." + std::to_string(c.patch) + "-1.";
  t_mlp0_ = load_linear(be, ws, "t_embedder.mlp.0.weight", {kTimeMlpHidden, kTimeFeatures}, "t_embedder.mlp.0.bias");
  t_mlp2_ = load_linear(be, ws, "t_embedder.mlp.2.weight", {a, kTimeMlpHidden}, "t_embedder.mlp.2.bias");
  cap_norm_ = load_weight(be, ws, "cap_embedder.0.weight", {c.cap_feat_dim});
  cap_proj_ = load_linear(be, ws, "cap_embedder.1.weight", {c.dim, c.cap_feat_dim}, "cap_embedder.1.bias");
  x_proj_ = load_linear(be, ws, px + "weight", {c.dim, patch_dim}, px + "bias");
  x_pad_ = load_weight(be, ws, "x_pad_token", {1, c.dim});
  cap_pad_ = load_weight(be, ws, "cap_pad_token", {1, c.dim});
  final_mod_ = load_linear(be, ws, pf + "adaLN_modulation.1.weight", {c.dim, a}, pf + "adaLN_modulation.1.bias");
  final_proj_ = load_linear(be, ws, pf + "linear.weight", {patch_dim, c.dim}, pf + "linear.bias");

  // Modulated blocks (noise_refiner, layers): their adaLN weights are stacked into one GEMM per call.
  for (int64_t i = 0; i < c.refiner_layers; ++i)
    noise_refiner_.push_back(load_dit_block(be, c, ws, "noise_refiner." + std::to_string(i) + "."));
  for (int64_t i = 0; i < c.refiner_layers; ++i)
    context_refiner_.push_back(load_dit_block(be, c, ws, "context_refiner." + std::to_string(i) + "."));
  for (int64_t i = 0; i < c.layers; ++i) layers_.push_back(load_dit_block(be, c, ws, "layers." + std::to_string(i) + "."));
  std::vector<std::pair<DitBlock*, std::string>> modulated;
  for (size_t i = 0; i < noise_refiner_.size(); ++i)
    modulated.emplace_back(&noise_refiner_[i], "noise_refiner." + std::to_string(i) + ".");
  for (size_t i = 0; i < layers_.size(); ++i) modulated.emplace_back(&layers_[i], "layers." + std::to_string(i) + ".");
  mod_ = load_adaln_stack(be, c, ws, modulated);
}

std::shared_ptr<const LoraSet> ZImageDit::prepare_lora(const std::vector<ScaledLora>& adapters) const {
  std::vector<const Linear*> all = {&t_mlp0_, &t_mlp2_, &cap_proj_, &x_proj_, &final_mod_, &final_proj_, &mod_};
  for (const auto* blocks : {&noise_refiner_, &context_refiner_, &layers_})
    for (const Block& b : *blocks)
      for (const Linear* l : {&b.qkv, &b.out, &b.w13, &b.w2}) all.push_back(l);
  return std::make_shared<const LoraSet>(be_, adapters, all);
}

void ZImageDit::set_lora(const std::vector<LoraGroup>& groups, int64_t items) {
  LoraBatch batch;
  for (const auto& g : groups) {
    std::shared_ptr<const LoraSet> set;
    if (!g.adapters.empty()) {
      std::string key;  // the adapters' identities and scales
      for (const auto& a : g.adapters)
        key += std::to_string(reinterpret_cast<uintptr_t>(a.adapter.get())) + ":" + std::to_string(a.scale) + ";";
      auto it = std::find_if(lora_sets_.begin(), lora_sets_.end(), [&](const auto& e) { return e.first == key; });
      set = it != lora_sets_.end() ? it->second : prepare_lora(g.adapters);
      if (it != lora_sets_.end()) lora_sets_.erase(it);
      lora_sets_.insert(lora_sets_.begin(), {key, set});
      if (lora_sets_.size() > kLoraSetsKept) lora_sets_.pop_back();
    }
    batch.items.insert(batch.items.end(), size_t(g.count), set);
  }
  ZI_CHECK(
      groups.empty() || int64_t(batch.items.size()) == items, ErrorKind::InvalidArgument,
      "LoRA groups cover " + std::to_string(batch.items.size()) + " images of a batch of " + std::to_string(items));
  lora_ = std::move(batch);
}

ZImageDit::Modulation ZImageDit::modulation(const Block& b, const Tensor* mod) {
  Modulation m;
  if (!mod) return m;
  const int64_t d = cfg_.dim;
  // chunk4 of this block's columns: scale_msa, gate_msa, scale_mlp, gate_mlp. One item's row is
  // contiguous, so its chunks are views; a batch's are column slices (copies).
  auto chunk = [&](int64_t i) {
    const int64_t col = b.mod_offset + i * d;
    if (mod->dim(0) == 1) return mod->reshape({mod->dim(1)}).narrow0(col, d).reshape({1, d});
    return be_.slice_cols(*mod, col, d);
  };
  m.scale_msa = chunk(0);
  m.gate_msa = chunk(1);
  m.scale_mlp = chunk(2);
  m.gate_mlp = chunk(3);
  m.on = true;
  return m;
}

// Each block's residual update and the next norm run as one kernel (gated_residual_then_rms_norm_):
//   hn = norm1(x)·(1 + scale_msa);  x += tanh(gate_msa)·norm2(attention(hn))
//   fn = ffn_norm1(x)·(1 + scale_mlp);  x += tanh(gate_mlp)·ffn_norm2(FFN(fn)) (+ extra_after(i))
void ZImageDit::run_blocks(std::span<const Block> blocks, Tensor& x, const Tensor* mod, const Stage& st,
                           const Sharding* sp, const LoraBatch* lora, const std::function<Tensor(size_t)>& extra_after) {
  if (blocks.empty()) return;
  const auto& c = cfg_;
  const float eps = float(c.norm_eps);
  const int h = int(c.heads), d = int(c.head_dim);
  const float scale = float(1.0 / std::sqrt(double(d)));
  auto opt = [](const Modulation& m, const Tensor& t) { return m.on ? &t : nullptr; };
  const std::vector<int64_t> rows(size_t(x.dim(0)), x.dim(1));  // per item, for the adapters
  // The norms and SwiGLU write an FP8 linear's input as e4m3 rows themselves (input_for).
  Modulation m = modulation(blocks[0], mod);
  LinearInput hn = input_for(
      blocks[0].qkv, lora, [&] { return be_.modulated_rms_norm(x, blocks[0].norm1, opt(m, m.scale_msa), eps); },
      [&] { return be_.modulated_rms_norm_fp8(x, blocks[0].norm1, opt(m, m.scale_msa), eps); });
  for (size_t i = 0; i < blocks.size(); ++i) {
    const Block& b = blocks[i];
    Tensor qkv = apply(be_, b.qkv, hn, lora, &rows);
    be_.qk_norm_rope_(qkv, h, h, d, b.norm_q, b.norm_k, kQkNormEps, st.cos, st.sin, RopeStyle::Interleaved);
    Tensor attn = st.usp       ? usp_attention(be_, sp->ulysses, *sp->ring, *st.usp, qkv, h, d, scale)
                  : st.ulysses ? ulysses_attention(be_, *sp->ulysses, *st.ulysses, qkv, h, d, scale)
                               : be_.attention(qkv, h, h, d, scale, /*causal=*/false, st.key_len);
    const Tensor o = apply(be_, b.out, attn, lora, &rows);
    const LinearInput fn = input_for(
        b.w13, lora,
        [&] { return be_.gated_residual_then_rms_norm_(x, o, b.norm2, opt(m, m.gate_msa), b.ffn_norm1, opt(m, m.scale_mlp), eps); },
        [&] {
          return be_.gated_residual_then_rms_norm_fp8_(x, o, b.norm2, opt(m, m.gate_msa), b.ffn_norm1,
                                                       opt(m, m.scale_mlp), eps);
        });
    const Tensor up = apply(be_, b.w13, fn, lora, &rows);
    const Tensor ff = apply(be_, b.w2, input_for(b.w2, lora, [&] { return be_.swiglu(up); }, [&] { return be_.swiglu_fp8(up); }),
                            lora, &rows);
    const Tensor extra = extra_after ? extra_after(i) : Tensor();
    const Tensor* e = extra.defined() ? &extra : nullptr;
    if (i + 1 == blocks.size()) {
      be_.gated_residual_rms_norm_(x, ff, b.ffn_norm2, opt(m, m.gate_mlp), eps, e);
      break;
    }
    Modulation next = modulation(blocks[i + 1], mod);
    hn = input_for(
        blocks[i + 1].qkv, lora,
        [&] {
          return be_.gated_residual_then_rms_norm_(x, ff, b.ffn_norm2, opt(m, m.gate_mlp), blocks[i + 1].norm1,
                                                   opt(next, next.scale_msa), eps, e);
        },
        [&] {
          return be_.gated_residual_then_rms_norm_fp8_(x, ff, b.ffn_norm2, opt(m, m.gate_mlp), blocks[i + 1].norm1,
                                                       opt(next, next.scale_msa), eps, e);
        });
    m = std::move(next);
  }
}

Tensor ZImageDit::control_tokens(const LayoutPlan& plan, int64_t n, int64_t lh, int64_t lw) {
  const ZImageControlNet& net = *control_->net;
  const Tensor& lat = control_->latents;
  const int64_t cin = net.config().in_channels;
  ZI_ASSERT(lat.ndim() == 4 && lat.dim(1) == cin && lat.dim(2) == lh && lat.dim(3) == lw && n % lat.dim(0) == 0);
  Tensor act = be_.cast(lat, be_.activation_dtype());
  Tensor patches;
  for (int64_t i = 0; i < n; ++i) {
    Tensor p = be_.patchify(act.narrow0(i % lat.dim(0), 1).reshape({cin, lh, lw}), int(cfg_.patch));
    patches = i == 0 ? p : be_.concat_rows(patches, p);
  }
  // Pad rows take the DiT's x_pad_token, as the image tokens do.
  Tensor src = be_.concat_rows(apply(be_, net.embed_, patches), x_pad_);
  return be_.gather_rows(src, plan.x_idx).reshape({n, plan.image_rows, cfg_.dim});
}

// diffusers' ZImageControlTransformerBlock chain: c = before_proj(c) + x at the first block, then each
// block on c, its after_proj(c) (times the scale) the hint it hands over.
std::vector<Tensor> ZImageDit::run_control_blocks(std::span<const Block> blocks, Tensor& c, const Tensor& x,
                                                  const Tensor& cmod, const Stage& st, const Sharding* sp,
                                                  size_t hints) {
  std::vector<Tensor> out;
  for (size_t k = 0; k < blocks.size(); ++k) {
    if (k == 0) {
      c = apply(be_, blocks[0].before_proj, c);
      be_.add_(c, x);
    }
    run_blocks(blocks.subspan(k, 1), c, &cmod, st, sp, nullptr);
    if (k < hints) out.push_back(be_.scale_shift(apply(be_, blocks[k].after_proj, c), control_->scale, 0.0f));
  }
  return out;
}

// Everything about a call that depends only on its token layout (and, sharded, on the rank): the row
// maps that build the padded sequences, and the RoPE tables (uploaded once). The denoising loop repeats
// one layout every step.
std::shared_ptr<const ZImageDit::LayoutPlan> ZImageDit::plan_for(const Tensor& latents, const std::vector<Tensor>& caps,
                                                                 const Sharding* sp) {
  const auto& c = cfg_;
  ZI_ASSERT(latents.ndim() == 4 && latents.dim(1) == c.in_channels && int64_t(caps.size()) == latents.dim(0));
  std::vector<int64_t> cap_lengths;
  for (const auto& cap : caps) {
    ZI_ASSERT(cap.ndim() == 2 && cap.dim(1) == c.cap_feat_dim);
    cap_lengths.push_back(cap.dim(0));
  }
  const DitLayout lay = dit_layout(latents.dim(0), latents.dim(2), latents.dim(3), c.patch, cap_lengths);
  const int rank = sp ? sp->shard() : 0;
  // A sharded call of degree 1 differs from forward() (its output is gathered): sp is part of the key.
  // So is the attention path (a ring of one rank runs the ring's code).
  std::vector<int64_t> key = {lay.items, lay.grid_h, lay.grid_w, sp ? sp->plan.degree : 0, sp ? sp->plan.ulysses : 0,
                              sp && sp->ring ? 1 : 0, rank};
  key.insert(key.end(), lay.cap_len.begin(), lay.cap_len.end());
  if (plan_ && plan_->key == key) return plan_;
  const int64_t n = lay.items, ni = lay.image_tokens;
  auto p = std::make_shared<LayoutPlan>();
  p->key = key;
  p->layout = lay;
  std::vector<int32_t> x_idx, cap_idx, u_idx, final_idx, gather_idx;
  // One rank holds every image token, then pad tokens up to image_padded; a sharded rank holds its
  // band's tokens (in row-major order over the band), then pad tokens up to the plan's local_len.
  const int64_t nip = sp ? sp->plan.local_len : lay.image_padded;
  const int64_t um = nip + lay.cap_max;
  p->image_rows = nip;
  auto grid_token = [&](int64_t r) -> int64_t {  // global token of image row r, -1 for a pad row
    if (!sp) return r < ni ? r : -1;
    return r < sp->plan.ranks[size_t(rank)].tokens ? sp->plan.global_token(rank, r) : -1;
  };
  int64_t cap_rows = 0;
  for (int64_t len : lay.cap_len) cap_rows += len;

  // Image rows: item i's patches, then the pad token (source row n*ni). Position ids
  // (cap_padded + 1, row, col), the token's own grid row and column on every rank; pad rows (0, 0, 0).
  std::vector<std::array<int64_t, 3>> x_pos, cap_pos, u_pos;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < nip; ++r) {
      int64_t g = grid_token(r);
      x_idx.push_back(g >= 0 ? int32_t(i * ni + g) : int32_t(n * ni));
      x_pos.push_back(g >= 0 ? std::array<int64_t, 3>{lay.cap_padded[size_t(i)] + 1, g / lay.grid_w, g % lay.grid_w}
                             : std::array<int64_t, 3>{0, 0, 0});
    }
  // Caption rows: item i's tokens, cap_pad_token (source row cap_rows) up to its multiple of 32, zero
  // rows (masked) up to the batch's longest. Position ids (1 + k, 0, 0).
  int64_t cap_base = 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t len = lay.cap_len[size_t(i)], padded = lay.cap_padded[size_t(i)];
    for (int64_t r = 0; r < lay.cap_max; ++r) {
      cap_idx.push_back(r < len ? int32_t(cap_base + r) : r < padded ? int32_t(cap_rows) : -1);
      cap_pos.push_back(r < padded ? std::array<int64_t, 3>{1 + r, 0, 0} : std::array<int64_t, 3>{0, 0, 0});
    }
    cap_base += len;
    p->cap.key_len.push_back(int(padded));
  }
  // Unified rows per item: [image (nip), caption (cap_padded)], zero rows beyond; the source is the
  // refined image rows followed by the refined caption rows.
  for (int64_t i = 0; i < n; ++i) {
    int64_t cp = lay.cap_padded[size_t(i)];
    for (int64_t r = 0; r < um; ++r) {
      if (r < nip) {
        u_idx.push_back(int32_t(i * nip + r));
        u_pos.push_back(x_pos[size_t(i * nip + r)]);
      } else if (r < nip + cp) {
        u_idx.push_back(int32_t(n * nip + i * lay.cap_max + (r - nip)));
        u_pos.push_back(cap_pos[size_t(i * lay.cap_max + (r - nip))]);
      } else {
        u_idx.push_back(-1);
        u_pos.push_back({0, 0, 0});
      }
    }
    p->u.key_len.push_back(int(nip + cp));
    for (int64_t r = 0; r < nip; ++r) final_idx.push_back(int32_t(i * um + r));  // the final layer's rows
  }
  p->x.key_len.assign(size_t(n), int(nip));
  if (sp) {
    // Sharded: the image tokens attend through Ulysses (the caption rows replicated in the unified
    // layers), and the output is every rank's final rows put back in grid order, pad rows cropped.
    const std::vector<int64_t> none(static_cast<size_t>(n), 0);  // the noise refiner has no replicated rows
    if (sp->ring) {  // a ring (of one rank too: the one-GPU test of this path)
      p->x.usp = std::make_unique<UspLayout>(usp_layout(sp->plan, rank, n, 0, none));
      p->u.usp = std::make_unique<UspLayout>(usp_layout(sp->plan, rank, n, lay.cap_max, lay.cap_padded));
    } else {
      p->x.ulysses = std::make_unique<UlyssesLayout>(ulysses_layout(sp->plan, rank, n, 0, none));
      p->u.ulysses = std::make_unique<UlyssesLayout>(ulysses_layout(sp->plan, rank, n, lay.cap_max, lay.cap_padded));
    }
    const auto owners = sp->plan.token_owners();
    for (int64_t i = 0; i < n; ++i)
      for (const auto& [s, k] : owners) gather_idx.push_back(int32_t((s * n + i) * nip + k));
  }
  p->x_idx = be_.upload_i32(x_idx);
  p->cap_idx = be_.upload_i32(cap_idx);
  p->u_idx = be_.upload_i32(u_idx);
  p->final_idx = be_.upload_i32(final_idx);
  if (sp) p->gather_idx = be_.upload_i32(gather_idx);
  auto upload = [&](const std::vector<std::array<int64_t, 3>>& pos, Stage& st) {
    RopeTables t = rope_tables_3d(pos, c.axes_dims, c.rope_theta);
    st.cos = be_.upload(t.cos, DType::F32);
    st.sin = be_.upload(t.sin, DType::F32);
  };
  upload(x_pos, p->x);
  upload(cap_pos, p->cap);
  upload(u_pos, p->u);
  plan_ = std::move(p);
  return plan_;
}

std::shared_ptr<const ZImageDit::LayoutPlan> ZImageDit::layout_plan(const Tensor& latents,
                                                                    const std::vector<Tensor>& caps) {
  return plan_for(latents, caps, nullptr);
}

Tensor ZImageDit::forward(const Tensor& latents, const std::vector<float>& t, const std::vector<Tensor>& caps) {
  ZI_ASSERT(int64_t(t.size()) == latents.dim(0));
  return run(*plan_for(latents, caps, nullptr), latents,
             be_.upload(Tensor::from_f32({int64_t(t.size())}, t), DType::F32), caps, nullptr);
}

Tensor ZImageDit::forward(const LayoutPlan& plan, const Tensor& latents, const Tensor& t,
                          const std::vector<Tensor>& caps) {
  return run(plan, latents, t, caps, nullptr);
}

Tensor ZImageDit::forward_sharded(const Tensor& latents, const std::vector<float>& t, const std::vector<Tensor>& caps,
                                  const SequenceParallelPlan& plan, Communicator* ulysses, Communicator* ring) {
  ZI_ASSERT(latents.ndim() == 4 && int64_t(t.size()) == latents.dim(0));
  ZI_ASSERT(plan.ulysses == (ulysses ? ulysses->size() : 1) && plan.ring == (ring ? ring->size() : 1) &&
            plan.heads == cfg_.heads && plan.grid_h == latents.dim(2) / cfg_.patch &&
            plan.grid_w == latents.dim(3) / cfg_.patch);
  const Sharding sp{plan, ulysses, ring};
  return run(*plan_for(latents, caps, &sp), latents, be_.upload(Tensor::from_f32({int64_t(t.size())}, t), DType::F32),
             caps, &sp);
}

Tensor ZImageDit::run(const LayoutPlan& plan, const Tensor& latents, const Tensor& t, const std::vector<Tensor>& caps,
                      const Sharding* sp) {
  const auto& c = cfg_;
  const DitLayout& lay = plan.layout;
  const int64_t n = lay.items, lh = latents.dim(2), lw = latents.dim(3);
  ZI_ASSERT(latents.ndim() == 4 && latents.dim(0) == n && lh == lay.grid_h * c.patch && lw == lay.grid_w * c.patch);
  ZI_ASSERT(t.numel() == n && int64_t(caps.size()) == n);
  for (int64_t i = 0; i < n; ++i) ZI_ASSERT(caps[size_t(i)].dim(0) == lay.cap_len[size_t(i)]);
  const int64_t ni = lay.image_tokens, nip = plan.image_rows, um = nip + lay.cap_max;

  // Time conditioning: adaln_input [N, A] and every block's modulation at once.
  Tensor tf = be_.timestep_embedding(t, float(c.t_scale), int(kTimeFeatures), kTimeMaxPeriod);
  Tensor adaln = apply(be_, t_mlp2_, be_.silu(apply(be_, t_mlp0_, tf, &lora_)), &lora_);
  Tensor mod = apply(be_, mod_, adaln, &lora_);

  // Image tokens: patchify each item, embed, then lay out this rank's [N, nip, dim] with x_pad_token rows.
  Tensor lat = be_.cast(latents, be_.activation_dtype());
  Tensor patches;
  for (int64_t i = 0; i < n; ++i) {
    Tensor p = be_.patchify(lat.narrow0(i, 1).reshape({c.in_channels, lh, lw}), int(c.patch));
    patches = i == 0 ? p : be_.concat_rows(patches, p);
  }
  const std::vector<int64_t> per_item_tokens(size_t(n), ni);
  Tensor x_src =
      be_.concat_rows(apply(be_, x_proj_, patches, &lora_, &per_item_tokens), x_pad_);  // last row: the pad token
  Tensor x = be_.gather_rows(x_src, plan.x_idx).reshape({n, nip, c.dim});

  // Caption tokens: RMSNorm + Linear, then [N, cap_max, dim] with pad-token and zero rows.
  Tensor cap_all;
  for (int64_t i = 0; i < n; ++i) {
    Tensor ci = be_.cast(caps[size_t(i)], be_.activation_dtype());
    cap_all = i == 0 ? ci : be_.concat_rows(cap_all, ci);
  }
  Tensor cap_src = be_.concat_rows(
      apply(be_, cap_proj_, be_.rms_norm(cap_all, &cap_norm_, float(c.norm_eps)), &lora_, &lay.cap_len), cap_pad_);
  Tensor cap = be_.gather_rows(cap_src, plan.cap_idx).reshape({n, lay.cap_max, c.dim});

  // ControlNet (diffusers' ZImageControlNetModel.forward): control tokens refined over the image tokens'
  // layout; v2.x first runs control blocks beside the embedded image tokens, whose hints go into its own
  // pass of the noise refiner (x_ctrl), which then stands in for the refined image tokens.
  const ZImageControlNet* net = control_ ? control_->net.get() : nullptr;
  Tensor cmod, ctl, x_ctrl;
  if (net) {
    const ControlNetConfig& cc = net->config();
    cmod = apply(be_, net->mod_, adaln);
    ctl = control_tokens(plan, n, lh, lw);
    if (cc.refiner == ControlRefiner::Plain) {
      run_blocks(net->refiner_, ctl, &cmod, plan.x, sp, nullptr);
    } else {
      const auto& blocks = cc.refiner == ControlRefiner::ControlLayers ? net->layers_ : net->refiner_;
      const std::vector<Tensor> hints =
          run_control_blocks(blocks, ctl, x, cmod, plan.x, sp, cc.refiner_places.size());
      x_ctrl = be_.gather_rows(x_src, plan.x_idx).reshape({n, nip, c.dim});
      run_blocks(noise_refiner_, x_ctrl, &mod, plan.x, sp, &lora_, [&](size_t i) {
        auto at = std::find(cc.refiner_places.begin(), cc.refiner_places.end(), int64_t(i));
        return at == cc.refiner_places.end() ? Tensor() : hints[size_t(at - cc.refiner_places.begin())];
      });
    }
  }

  run_blocks(noise_refiner_, x, &mod, plan.x, sp, &lora_);
  run_blocks(context_refiner_, cap, nullptr, plan.cap, nullptr, &lora_);  // replicated when sharded

  const Tensor cap_rows = cap.reshape({n * lay.cap_max, c.dim});
  auto unified = [&](const Tensor& image) {
    return be_.gather_rows(be_.concat_rows(image.reshape({n * nip, c.dim}), cap_rows), plan.u_idx)
        .reshape({n, um, c.dim});
  };
  Tensor u = unified(x);
  std::function<Tensor(size_t)> hook;
  Tensor cu;
  size_t next = 0;  // the next control block
  if (net) {
    // Control block k runs when main layer places[k] is reached (the chain does not depend on the main
    // layers, so only one hint is alive at a time); block 0's input is taken before the layers run.
    cu = unified(ctl);
    cu = apply(be_, net->layers_[0].before_proj, cu);
    be_.add_(cu, x_ctrl.defined() ? unified(x_ctrl) : u);
    hook = [&](size_t i) {
      const auto& places = net->config().layer_places;
      if (next == places.size() || places[next] != int64_t(i)) return Tensor();
      run_blocks(std::span<const Block>(net->layers_).subspan(next, 1), cu, &cmod, plan.u, sp, nullptr);
      return be_.scale_shift(apply(be_, net->layers_[next++].after_proj, cu), control_->scale, 0.0f);
    };
  }
  run_blocks(layers_, u, &mod, plan.u, sp, &lora_, hook);

  // Final layer on this rank's image rows: LayerNorm * (1 + Linear(SiLU(adaln))) -> Linear(dim -> patch
  // values). Sharded, every rank's rows are gathered and put in grid order. Then each item's
  // image_tokens rows back to a latent.
  Tensor fscale = apply(be_, final_mod_, be_.silu(adaln), &lora_);
  Tensor img = be_.gather_rows(u, plan.final_idx).reshape({n, nip, c.dim});
  const std::vector<int64_t> final_rows(size_t(n), nip);
  Tensor flat = apply(be_, final_proj_, be_.modulated_layer_norm(img, fscale, kFinalNormEps), &lora_, &final_rows)
                    .reshape({n * nip, c.patch * c.patch * c.in_channels});
  int64_t stride = nip;  // rows per item in `flat`
  if (sp) {  // Ulysses group first, then the ring: shard r*U + u lands at row block r*U + u
    Tensor all = flat;
    for (Communicator* group : {sp->ulysses, sp->ring}) {
      if (!group) continue;
      Tensor gathered = be_.empty({int64_t(group->size()), all.numel()}, all.dtype());
      group->all_gather(all, gathered);
      all = gathered;
    }
    flat = be_.gather_rows(all.reshape({sp->plan.degree * n * nip, flat.dim(1)}), plan.gather_idx);
    stride = ni;
  }
  Tensor out;
  for (int64_t i = 0; i < n; ++i) {
    Tensor li = be_.unpatchify(flat.narrow0(i * stride, ni), int(c.in_channels), int(lh), int(lw), int(c.patch));
    li = li.reshape({c.in_channels * lh, lw});
    out = i == 0 ? li : be_.concat_rows(out, li);
  }
  return be_.cast(out, DType::F32).reshape({n, c.in_channels, lh, lw});
}

}  // namespace zimage
