#include "model/weight_loading.h"

#include "core/error.h"

namespace zimage {

Tensor load_weight(Backend& be, const WeightSource& ws, const std::string& name, const Shape& shape) {
  return be.upload(ws.get(name, shape));
}

Tensor load_packed_rows(Backend& be, const WeightSource& ws, const std::vector<std::string>& names,
                        const std::vector<Shape>& shapes) {
  ZI_ASSERT(names.size() == shapes.size() && !names.empty());
  std::vector<Tensor> parts;
  for (size_t i = 0; i < names.size(); ++i) {
    ZI_ASSERT(shapes[i].size() == 2 && shapes[i][1] == shapes[0][1]);
    parts.push_back(ws.get(names[i], shapes[i]));
  }
  return be.upload_rows(parts, be.activation_dtype());
}

Tensor host_f32(const WeightSource& ws, const std::string& name, const Shape& shape) {
  return ws.get(name, shape).to_f32();
}

}  // namespace zimage
