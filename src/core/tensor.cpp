#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/error.h"

namespace zimage {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::vector<int64_t> contiguous_strides(const Shape& shape) {
  std::vector<int64_t> st(shape.size());
  int64_t acc = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    st[i] = acc;
    acc *= shape[i];
  }
  return st;
}

Tensor Tensor::empty(const Shape& shape, DType dtype) {
  for (int64_t d : shape)
    ZI_CHECK(d >= 0, ErrorKind::InvalidArgument, "negative dimension in shape " + shape_str(shape));
  size_t bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
  size_t alloc = (bytes + 63) / 64 * 64;
  void* p = alloc ? std::aligned_alloc(64, alloc) : nullptr;
  ZI_CHECK(p || !alloc, ErrorKind::OutOfMemory,
           "out of host memory allocating " + std::to_string(bytes) + " bytes for tensor " + shape_str(shape));
  Tensor t;
  t.data_ = p;
  t.dtype_ = dtype;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.owner_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype) {
  Tensor t = empty(shape, dtype);
  if (t.nbytes()) std::memset(t.data_, 0, t.nbytes());
  return t;
}

Tensor Tensor::from_f32(const Shape& shape, const std::vector<float>& values) {
  ZI_CHECK(int64_t(values.size()) == shape_numel(shape), ErrorKind::Internal,
           "from_f32: " + std::to_string(values.size()) + " values for shape " + shape_str(shape));
  Tensor t = empty(shape, DType::F32);
  if (!values.empty()) std::memcpy(t.data_, values.data(), values.size() * 4);
  return t;
}

Tensor Tensor::wrap(void* data, const Shape& shape, DType dtype, Device device, std::shared_ptr<void> owner) {
  Tensor t;
  t.data_ = data;
  t.dtype_ = dtype;
  t.device_ = device;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.owner_ = std::move(owner);
  return t;
}

int64_t Tensor::dim(int i) const {
  int n = ndim();
  int j = i < 0 ? i + n : i;
  ZI_ASSERT(j >= 0 && j < n);
  return shape_[size_t(j)];
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_); }

float* Tensor::f32() const {
  ZI_CHECK(dtype_ == DType::F32 && device_ == Device::Host, ErrorKind::Internal,
           std::string("expected a host f32 tensor, got ") + dtype_name(dtype_) +
               (device_ == Device::Host ? " on host" : " on device"));
  return static_cast<float*>(data_);
}

Tensor Tensor::reshape(const Shape& shape) const {
  ZI_ASSERT(is_contiguous());
  Shape s = shape;
  int64_t known = 1;
  int infer = -1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      ZI_ASSERT(infer < 0);
      infer = int(i);
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) {
    ZI_ASSERT(known > 0 && numel() % known == 0);
    s[size_t(infer)] = numel() / known;
  }
  ZI_CHECK(shape_numel(s) == numel(), ErrorKind::Internal,
           "reshape " + shape_str(shape_) + " -> " + shape_str(shape) + ": element counts differ");
  Tensor t = *this;
  t.shape_ = s;
  t.strides_ = contiguous_strides(s);
  return t;
}

Tensor Tensor::narrow0(int64_t start, int64_t len) const {
  ZI_ASSERT(ndim() >= 1 && start >= 0 && len >= 0 && start + len <= shape_[0]);
  Tensor t = *this;
  t.shape_[0] = len;
  t.data_ = static_cast<char*>(data_) + size_t(start * strides_[0]) * dtype_size(dtype_);
  return t;
}

Tensor Tensor::clone() const {
  ZI_ASSERT(device_ == Device::Host && is_contiguous());
  Tensor t = empty(shape_, dtype_);
  if (nbytes()) std::memcpy(t.data_, data_, nbytes());
  return t;
}

Tensor Tensor::to_f32() const {
  ZI_ASSERT(device_ == Device::Host && is_contiguous());
  Tensor t = empty(shape_, DType::F32);
  convert_to_f32(dtype_, data_, t.f32(), size_t(numel()));
  return t;
}

Tensor Tensor::to_dtype(DType dtype) const {
  if (dtype == dtype_) return clone();
  Tensor f = dtype_ == DType::F32 ? *this : to_f32();
  if (dtype == DType::F32) return f;
  Tensor t = empty(shape_, dtype);
  convert_from_f32(dtype, f.f32(), t.data_, size_t(numel()));
  return t;
}

std::vector<float> Tensor::to_vector() const {
  Tensor f = dtype_ == DType::F32 ? *this : to_f32();
  ZI_ASSERT(f.is_contiguous() && f.device_ == Device::Host);
  const float* p = static_cast<const float*>(f.data_);
  return std::vector<float>(p, p + numel());
}

}  // namespace zimage
