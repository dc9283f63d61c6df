// The tensors a model reads from its checkpoint, derived from its config alone: the name the model
// asks for and the shape as stored (PyTorch layouts: Linear [out, in], Conv2d [O, C, kh, kw]).
// `zimage save-model` writes checkpoints from these lists, so a saved folder holds exactly what the
// model loads; tests/save_model_test.cpp checks every list against what the constructors really load.
#pragma once

#include <string>
#include <vector>

#include "core/tensor.h"

namespace zimage {

struct WeightSpec {
  std::string name;
  Shape shape;
};

}  // namespace zimage
