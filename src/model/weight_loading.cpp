#include "model/weight_loading.h"

#include <cstring>

#include "core/error.h"

namespace zimage {

Tensor load_weight(Backend& be, const WeightSource& ws, const std::string& name, const Shape& shape) {
  return be.upload(ws.get(name, shape));
}

Tensor load_packed_rows(Backend& be, const WeightSource& ws, const std::vector<std::string>& names,
                        const std::vector<Shape>& shapes) {
  ZI_ASSERT(names.size() == shapes.size() && !names.empty());
  int64_t rows = 0, k = shapes[0].back();
  DType dt = DType::F32;
  std::vector<Tensor> parts;
  for (size_t i = 0; i < names.size(); ++i) {
    ZI_ASSERT(shapes[i].size() == 2 && shapes[i][1] == k);
    parts.push_back(ws.get(names[i], shapes[i]));
    dt = parts.back().dtype();
    rows += shapes[i][0];
  }
  // Stack in the source dtype when all parts agree (no precision change), else through float32.
  bool same = true;
  for (const auto& p : parts) same = same && p.dtype() == dt;
  Tensor packed = Tensor::empty({rows, k}, same ? dt : DType::F32);
  char* dst = static_cast<char*>(packed.data());
  for (const auto& p : parts) {
    Tensor src = same ? p : p.to_f32();
    std::memcpy(dst, src.data(), src.nbytes());
    dst += src.nbytes();
  }
  return be.upload(packed);
}

Tensor host_f32(const WeightSource& ws, const std::string& name, const Shape& shape) {
  return ws.get(name, shape).to_f32();
}

}  // namespace zimage
