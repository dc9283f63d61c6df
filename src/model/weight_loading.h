// Helpers the model definitions use to bring named weights onto a backend, including the load-time
// packing of several matrices into one (QKV, w1|w3) so that one GEMM replaces several.
#pragma once

#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/weights.h"

namespace zimage {

// One tensor, checked against `shape`, converted to the backend's activation dtype.
Tensor load_weight(Backend& be, const WeightSource& ws, const std::string& name, const Shape& shape);

// Matrices [n_i, K] stacked along rows into one [sum n_i, K] (e.g. to_q|to_k|to_v).
Tensor load_packed_rows(Backend& be, const WeightSource& ws, const std::vector<std::string>& names,
                        const std::vector<Shape>& shapes);

// A host tensor (any float dtype) as float32: for load-time transforms done on the host.
Tensor host_f32(const WeightSource& ws, const std::string& name, const Shape& shape);

}  // namespace zimage
