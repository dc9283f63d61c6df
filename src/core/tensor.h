// Tensor: a typed, shaped view of bytes that live on the host or on a device.
// Storage is reference counted and shared between views (reshape, narrow); the bytes may belong to
// the tensor (allocated here), to a memory-mapped file (weights read in place) or to a backend allocator.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace zimage {

enum class Device : uint8_t { Host, Cuda };

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 3, 4]"
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;

  // Host allocations (64-byte aligned). `empty` leaves the bytes uninitialized.
  static Tensor empty(const Shape& shape, DType dtype);
  static Tensor zeros(const Shape& shape, DType dtype);
  static Tensor from_f32(const Shape& shape, const std::vector<float>& values);
  // Wrap bytes owned elsewhere; `owner` keeps them alive (a file mapping, a device buffer).
  static Tensor wrap(void* data, const Shape& shape, DType dtype, Device device, std::shared_ptr<void> owner);

  bool defined() const { return data_ != nullptr || numel() == 0; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }
  int ndim() const { return int(shape_.size()); }
  int64_t dim(int i) const;  // negative i counts from the end
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  bool is_contiguous() const;

  void* data() const { return data_; }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data_);
  }
  float* f32() const;  // checked: host f32 tensor

  // Views sharing storage. reshape needs a contiguous tensor; one dimension may be -1.
  Tensor reshape(const Shape& shape) const;
  // Rows [start, start+len) along dimension 0.
  Tensor narrow0(int64_t start, int64_t len) const;

  // Host copies.
  Tensor clone() const;                // same dtype, contiguous host copy (host tensors only)
  Tensor to_f32() const;               // host float32 copy (host tensors of any dtype)
  Tensor to_dtype(DType dtype) const;  // host conversion through float32 (float types)
  std::vector<float> to_vector() const;

  const std::shared_ptr<void>& owner() const { return owner_; }

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::F32;
  Device device_ = Device::Host;
  Shape shape_;
  std::vector<int64_t> strides_;  // in elements
  std::shared_ptr<void> owner_;
};

std::vector<int64_t> contiguous_strides(const Shape& shape);

}  // namespace zimage
