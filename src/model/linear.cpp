#include "model/linear.h"

#include <cstring>
#include <optional>

#include "core/error.h"
#include "model/weight_loading.h"

namespace zimage {

namespace {
// The adapters' rank dimension R is padded with zero rows of A / columns of B to this multiple, so
// the low-rank GEMMs see aligned leading dimensions on every backend (cuBLASLt wants 16-byte rows).
constexpr int64_t kRankMultiple = 16;
// Rows [r0, r0 + len) of x [rows, in] as a GEMM input: a view when its start keeps the 16-byte alignment
// the GEMM libraries plan for (cuBLASLt picks its algorithm for aligned pointers), else a copy.
Tensor rows_of(Backend& be, const Tensor& x, int64_t r0, int64_t len) {
  if ((r0 * x.dim(1) * int64_t(dtype_size(x.dtype()))) % 16 == 0) return x.narrow0(r0, len);
  std::vector<int32_t> idx(static_cast<size_t>(len));
  for (int64_t i = 0; i < len; ++i) idx[size_t(i)] = int32_t(r0 + i);
  return be.gather_rows(x, idx);
}

// A host StoredWeight on the backend in its stored form, its scale in float32.
StoredWeight upload_stored(Backend& be, const StoredWeight& host) {
  StoredWeight w = host;
  w.data = be.upload(host.data, host.data.dtype());
  if (host.scale.defined()) w.scale = be.upload(host.scale, DType::F32);
  return w;
}

// Quantized parts stacked along rows in their stored form, or nullopt when they do not share one: GGUF
// blocks of one type, or FP8 of one kind whose scales (per tensor, per row or none) become one per row.
std::optional<StoredWeight> pack_quantized(Backend& be, const std::vector<StoredWeight>& parts) {
  const StoredWeight& first = parts[0];
  bool any_scale = false;
  int64_t rows = 0;
  for (const auto& p : parts) {
    if (p.data.dtype() != first.data.dtype() || p.ggml_type != first.ggml_type || p.shape[1] != first.shape[1])
      return std::nullopt;
    any_scale = any_scale || p.scale.defined();
    rows += p.shape[0];
  }
  std::vector<Tensor> data;
  for (const auto& p : parts) data.push_back(p.data);
  StoredWeight w;
  w.data = be.upload_rows(data, first.data.dtype());
  w.ggml_type = first.ggml_type;
  w.shape = {rows, first.shape[1]};
  if (any_scale) {
    Tensor scale = Tensor::empty({rows}, DType::F32);
    float* s = scale.f32();
    for (const auto& p : parts) {
      const Tensor ps = p.scale.defined() ? p.scale.to_f32() : Tensor();
      for (int64_t r = 0; r < p.shape[0]; ++r) *s++ = !ps.defined() ? 1.0f : ps.f32()[ps.numel() == 1 ? 0 : r];
    }
    w.scale = be.upload(scale, DType::F32);
  }
  return w;
}

// A stored weight the W8A8 GEMM takes as it is: e4m3 codes with a float32 scale per row.
bool fp8_rows(const StoredWeight& w) {
  return w.data.defined() && w.data.dtype() == DType::F8E4M3 && w.scale.defined() && w.scale.numel() == w.shape[0];
}

}  // namespace

Linear load_linear(Backend& be, const WeightSource& ws, const std::string& name, const Shape& shape,
                   const std::string& bias_name) {
  Linear l;
  if (std::optional<StoredWeight> q = ws.quantized(name, shape)) l.stored = upload_stored(be, *q);
  else l.w = load_weight(be, ws, name, shape);
  if (!bias_name.empty()) l.bias = load_weight(be, ws, bias_name, {shape[0]});
  l.fp8 = ws.fp8_linear(name, shape) && fp8_rows(l.stored);
  l.parts = {name};
  l.part_rows = {shape[0]};
  return l;
}

Linear load_packed_linear(Backend& be, const WeightSource& ws, const std::vector<std::string>& names,
                          const std::vector<Shape>& shapes) {
  Linear l;
  std::vector<StoredWeight> quantized;
  for (size_t i = 0; i < names.size(); ++i)
    if (std::optional<StoredWeight> q = ws.quantized(names[i], shapes[i])) quantized.push_back(std::move(*q));
  std::optional<StoredWeight> packed;
  if (quantized.size() == names.size()) packed = pack_quantized(be, quantized);
  if (packed) l.stored = std::move(*packed);
  else l.w = load_packed_rows(be, ws, names, shapes);
  l.fp8 = fp8_rows(l.stored);
  for (size_t i = 0; i < names.size(); ++i) l.fp8 = l.fp8 && ws.fp8_linear(names[i], shapes[i]);
  l.parts = names;
  for (const auto& s : shapes) l.part_rows.push_back(s[0]);
  return l;
}

LoraSet::LoraSet(Backend& be, const std::vector<ScaledLora>& adapters, const std::vector<const Linear*>& linears)
    : adapters_(adapters) {
  for (const Linear* l : linears) {
    // Every factor on one of this Linear's parts: (factor, scale, first row of its part in w).
    struct Hit {
      const LoraFactor* f;
      float scale;
      int64_t row;
    };
    std::vector<Hit> hits;
    int64_t rank = 0;
    for (const auto& sa : adapters) {
      for (const auto& f : sa.adapter->factors) {
        int64_t row = 0;
        for (size_t p = 0; p < l->parts.size(); ++p) {
          if (l->parts[p] == f.target) {
            hits.push_back({&f, sa.scale, row + f.row_offset});
            rank += f.down.dim(0);
          }
          row += l->part_rows[p];
        }
      }
    }
    if (hits.empty()) continue;
    const int64_t out = l->out_features(), in = l->in_features();
    const int64_t padded = (rank + kRankMultiple - 1) / kRankMultiple * kRankMultiple;
    Tensor a = Tensor::zeros({padded, in}, DType::F32), b = Tensor::zeros({out, padded}, DType::F32);
    int64_t col = 0;
    for (const Hit& h : hits) {
      const int64_t r = h.f->down.dim(0), rows = h.f->up.dim(0);
      ZI_ASSERT(h.f->down.dim(1) == in && h.row + rows <= out);
      std::memcpy(a.f32() + col * in, h.f->down.f32(), size_t(r * in) * sizeof(float));
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t k = 0; k < r; ++k) b.f32()[(h.row + i) * padded + col + k] = h.scale * h.f->up.f32()[i * r + k];
      col += r;
    }
    LowRank lr{be.upload(a), be.upload(b)};
    bytes_ += int64_t(lr.a.nbytes() + lr.b.nbytes());
    low_rank_.emplace(l, std::move(lr));
  }
}

const LoraSet::LowRank* LoraSet::find(const Linear& l) const {
  auto it = low_rank_.find(&l);
  return it == low_rank_.end() ? nullptr : &it->second;
}

bool LoraBatch::any() const {
  for (const auto& s : items)
    if (s) return true;
  return false;
}

bool takes_fp8_rows(const Linear& l, const LoraBatch* lora) { return l.fp8 && !(lora && lora->any()); }

Tensor apply(Backend& be, const Linear& l, const LinearInput& in, const LoraBatch* lora,
             const std::vector<int64_t>* item_rows) {
  if (!in.q.q.defined()) return apply(be, l, in.x, lora, item_rows);
  ZI_ASSERT(takes_fp8_rows(l, lora));
  return be.linear_fp8(in.q, l.stored, l.bias_or_null());
}

Tensor apply(Backend& be, const Linear& l, const Tensor& x, const LoraBatch* lora,
             const std::vector<int64_t>* item_rows) {
  Tensor y = l.fp8         ? be.linear_fp8(be.quantize_fp8_rows(x), l.stored, l.bias_or_null())
             : l.w.defined() ? be.linear(x, l.w, l.bias_or_null())
                             : be.linear(x, be.dequantize(l.stored), l.bias_or_null());  // its buffer freed here
  if (!lora || !lora->any()) return y;
  const int64_t in = x.dim(-1), out = y.dim(-1), rows = x.numel() / in;
  const int64_t n_sets = int64_t(lora->items.size());
  const int64_t n = item_rows ? int64_t(item_rows->size()) : (x.ndim() == 3 ? x.dim(0) : rows);
  ZI_CHECK(n == n_sets || n == 2 * n_sets, ErrorKind::Internal,
           "LoRA adapters for " + std::to_string(n_sets) + " items given to a call of " + std::to_string(n));
  std::vector<int64_t> first(size_t(n) + 1, 0);  // item i's rows: [first[i], first[i + 1])
  for (int64_t i = 0; i < n; ++i)
    first[size_t(i) + 1] = first[size_t(i)] + (item_rows ? (*item_rows)[size_t(i)] : rows / n);
  ZI_ASSERT(first[size_t(n)] == rows);
  const Tensor x2 = x.reshape({rows, in});
  Tensor y2 = y.reshape({rows, out});
  for (int64_t i = 0; i < n;) {
    const LoraSet* set = lora->items[size_t(i % n_sets)].get();
    int64_t j = i + 1;
    while (j < n && lora->items[size_t(j % n_sets)].get() == set) ++j;
    const LoraSet::LowRank* lr = set ? set->find(l) : nullptr;
    if (lr) {
      const int64_t r0 = first[size_t(i)], len = first[size_t(j)] - r0;
      Tensor ys = y2.narrow0(r0, len);
      be.add_(ys, be.linear(be.linear(rows_of(be, x2, r0, len), lr->a), lr->b));
    }
    i = j;
  }
  return y;
}

}  // namespace zimage
