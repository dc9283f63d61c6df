// What the fuzz targets share: the one outcome bad input may have. A target runs the real parsing code
// on the input; an Error of any kind but Internal is the clear message a user gets, and passes. Anything
// else is a finding that stops the run: another exception type (escaping a parser that should have
// turned it into an Error), an Internal error (an invariant of the engine broken by input it should
// have rejected), a broken property checked with FUZZ_CHECK, or a sanitizer report, crash or timeout.
#pragma once

#include <cstdio>
#include <cstdlib>

#include "core/error.h"

#define FUZZ_CHECK(cond)                                                                       \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      std::fprintf(stderr, "fuzz: property failed: %s at %s:%d\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                            \
    }                                                                                          \
  } while (0)

namespace zimage::fuzz {

template <typename F>
void expect_clean_errors(F&& body) {
  try {
    body();
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::Internal) {
      std::fprintf(stderr, "fuzz: internal error from input: %s\n", e.what());
      std::abort();
    }
  }
  // Any other exception escapes to libFuzzer, which reports it as a crash ("uncaught exception").
}

}  // namespace zimage::fuzz
