// Where a command's files go, checked and prepared before any work: a generation that ends with
// "cannot write" after minutes of compute, or that replaces an earlier image without asking, is a bug.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace zimage::cli {

// The files for n images from --output-path `target` (sglang's convention):
// - a folder (an existing one, a path ending in '/', or a path without an extension: `outputs`) is
//   created if missing and gets zimage_<seed>_<i>.png. These default names never replace a file: when
//   any of the n names is taken, all n get the smallest free counter, zimage_<seed>_<i>-<k>.png;
// - a file name with an image extension (.png, .jpg, .jpeg, .webp) is used as given for one image, and
//   gets _<i> before its extension for several; its folder is created if missing. Files named
//   explicitly are replaced.
// Throws Error(InvalidArgument) for an unknown extension, a folder that cannot be made or written.
std::vector<std::string> prepare_image_paths(const std::string& target, int64_t n, uint64_t seed);

// Checks, before any work, that `path` (named by `flag` in messages) can be written, and creates its
// folder if missing. `in_place`: the file is opened and written where it is (write_text_file), so an
// existing file need only be writable; else it is written beside a temporary and renamed
// (write_safetensors, write_image), so its folder must be writable. A folder is refused. Throws
// Error(InvalidArgument).
void prepare_output_file(const std::string& path, const std::string& flag, bool in_place);

// Writes `text` to `path` in place (so a device such as /dev/stdout works), checking every write and
// the close: a full disk (ENOSPC) is Error(Io), not a silently truncated file.
void write_text_file(const std::string& path, const std::string& text);

}  // namespace zimage::cli
