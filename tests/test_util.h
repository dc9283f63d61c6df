// Shared helpers for the tests: golden data paths and numeric comparisons.
#pragma once

#include <string>

#include "core/tensor.h"

namespace zimage::testing {

std::string golden_path(const std::string& rel);  // tests/golden/<rel>
std::string assets_path(const std::string& rel);  // assets/<rel>
std::string temp_path(const std::string& name);   // a fresh path under the test temp folder

double max_abs_diff(const Tensor& a, const Tensor& b);  // any float dtypes, same numel
double rel_l2_error(const Tensor& out, const Tensor& ref);  // ‖out − ref‖ / ‖ref‖
bool all_finite(const Tensor& t);

}  // namespace zimage::testing
