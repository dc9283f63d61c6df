#include "cli/output_files.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "io/image.h"

namespace zimage::cli {

namespace fs = std::filesystem;

namespace {

Error bad(const std::string& message) { return Error(ErrorKind::InvalidArgument, message); }

// Creates `dir` (and its parents) if missing and checks that files can be created in it.
void prepare_folder(const fs::path& dir, const std::string& flag) {
  if (dir.empty()) return prepare_folder(".", flag);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    if (fs::exists(dir, ec)) throw bad(flag + " '" + dir.string() + "' is a file, not a folder");
    fs::create_directories(dir, ec);
    if (ec) throw bad(flag + ": cannot create the folder '" + dir.string() + "': " + ec.message());
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    throw bad(flag + ": cannot write in the folder '" + dir.string() + "': " + std::strerror(errno));
}

// A file written beside a temporary and renamed replaces whatever has its name: a device or a pipe
// (/dev/null, /dev/full) would be replaced by a plain file, which root is allowed to do. (A symbolic
// link is replaced as a link, its target untouched.)
void check_replaceable(const fs::path& p, const std::string& flag) {
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(p, ec);
  if (fs::exists(st) && !fs::is_regular_file(st) && !fs::is_symlink(st))
    throw bad(flag + " '" + p.string() + "' is not a regular file (it would be replaced)");
}

bool is_folder_target(const std::string& target) {
  std::error_code ec;
  return target.ends_with('/') || fs::is_directory(target, ec) || !fs::path(target).has_extension();
}

}  // namespace

std::vector<std::string> prepare_image_paths(const std::string& target, int64_t n, uint64_t seed) {
  const std::string flag = "--output-path";
  std::vector<std::string> out;
  if (is_folder_target(target)) {
    prepare_folder(target, flag);
    auto names = [&](int64_t k) {  // zimage_<seed>_<i>[-<k>].png
      std::vector<std::string> v;
      for (int64_t i = 0; i < n; ++i) {
        std::string name = "zimage_";
        name.append(std::to_string(seed)).append("_").append(std::to_string(i));
        if (k) name.append("-").append(std::to_string(k));
        v.push_back((fs::path(target) / name.append(".png")).string());
      }
      return v;
    };
    auto any_taken = [](const std::vector<std::string>& v) {
      std::error_code ec;
      for (const auto& p : v)
        if (fs::exists(fs::symlink_status(p, ec))) return true;
      return false;
    };
    for (int64_t k = 0;; ++k) {
      out = names(k);
      if (!any_taken(out)) return out;
    }
  }
  const fs::path p(target);
  for (int64_t i = 0; i < n; ++i)
    out.push_back(
        n == 1 ? target
               : (p.parent_path() / (p.stem().string() + "_" + std::to_string(i) + p.extension().string())).string());
  for (const auto& path : out) image_format_from_path(path);  // an unknown extension fails here
  prepare_folder(p.parent_path(), flag);
  for (const auto& path : out) {
    std::error_code ec;
    if (fs::is_directory(path, ec)) throw bad(flag + " '" + path + "' is a folder");
    check_replaceable(path, flag);
  }
  return out;
}

void prepare_output_file(const std::string& path, const std::string& flag, bool in_place) {
  const fs::path p(path);
  std::error_code ec;
  if (path.empty() || path.ends_with('/') || fs::is_directory(p, ec))
    throw bad(flag + " '" + path + "' is a folder; give a file name");
  if (fs::exists(p, ec)) {
    if (::access(path.c_str(), W_OK) != 0) throw bad(flag + ": cannot write '" + path + "': " + std::strerror(errno));
    if (in_place) return;
    check_replaceable(p, flag);
  }
  prepare_folder(p.parent_path(), flag);
}

void write_text_file(const std::string& path, const std::string& text) {
  auto fail = [&](const char* what, int err) {
    return Error(ErrorKind::Io, path + ": " + what + ": " + std::strerror(err));
  };
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) throw fail("cannot open for writing", errno);
  for (size_t done = 0; done < text.size();) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = n < 0 ? errno : EIO;
      ::close(fd);
      throw fail("write failed", err);
    }
    done += size_t(n);
  }
  if (::close(fd) != 0) throw fail("write failed", errno);
}

}  // namespace zimage::cli
