#include "core/error.h"

namespace zimage {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::InvalidArgument: return "invalid_argument";
    case ErrorKind::NotFound: return "not_found";
    case ErrorKind::Format: return "format";
    case ErrorKind::Io: return "io";
    case ErrorKind::OutOfMemory: return "out_of_memory";
    case ErrorKind::Numerical: return "numerical";
    case ErrorKind::Backend: return "backend";
    case ErrorKind::Internal: return "internal";
  }
  return "unknown";
}

}  // namespace zimage
