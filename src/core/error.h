// Engine errors: one exception type carrying a kind and a message a user understands.
// Raised at the edge where bad input enters; the CLI maps kinds to exit codes, the server to HTTP statuses.
#pragma once

#include <stdexcept>
#include <string>

namespace zimage {

enum class ErrorKind {
  InvalidArgument,  // the user asked for something that cannot be done (bad size, bad flag)
  NotFound,         // a file, folder, tensor or config key is missing
  Format,           // a file exists but its contents are malformed
  Io,               // the operating system refused a read or a write
  OutOfMemory,      // host or device memory exhausted
  Numerical,        // NaN/Inf appeared in a stage
  Backend,          // a device library (CUDA, cuBLAS, cuDNN, NCCL) failed
  Internal,         // a bug: an invariant of the engine itself was broken
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// ZI_CHECK(cond, kind, msg): throw Error(kind, msg) when cond is false. msg is only evaluated on failure.
#define ZI_CHECK(cond, kind, msg)                      \
  do {                                                 \
    if (!(cond)) throw ::zimage::Error((kind), (msg)); \
  } while (0)

// Internal invariants: a failure is a bug in the engine, reported with the location.
#define ZI_ASSERT(cond)                                                                                   \
  do {                                                                                                    \
    if (!(cond))                                                                                          \
      throw ::zimage::Error(::zimage::ErrorKind::Internal,                                               \
                            std::string("internal error: ") + #cond + " at " + __FILE__ + ":" +          \
                                std::to_string(__LINE__));                                                \
  } while (0)

}  // namespace zimage
