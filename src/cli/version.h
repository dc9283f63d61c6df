// What `zimage --version` prints and what the files the CLI writes record as their software.
#pragma once

#include <string>

namespace zimage::cli {

// The commit the binary was built from: "1a2b3c4d5e6f", with "-dirty" when tracked files differed from
// it, "unknown" when built outside git (defined in the build folder's generated/git_commit.cpp).
const char* git_commit();

// "0.1.0": the CMake project's version.
const char* version();

// "zimage 0.1.0": the PNG text chunk "software".
std::string software_name();

}  // namespace zimage::cli
