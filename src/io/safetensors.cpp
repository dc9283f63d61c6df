#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "core/parallel.h"
#include "io/untrusted_json.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older C libraries lack the name
#endif

namespace zimage {

namespace fs = std::filesystem;
using json = nlohmann::json;

static Error format_error(const std::string& path, const std::string& what) {
  return Error(ErrorKind::Format, path + ": " + what);
}

static Error too_short(const std::string& path, size_t size) {
  return format_error(path, "file is " + std::to_string(size) + " bytes, too short for a safetensors header");
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    throw Error(e == ENOENT ? ErrorKind::NotFound : ErrorKind::Io,
                path + ": cannot open: " + std::strerror(e));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(ErrorKind::Io, path + ": not a regular file");
  }
  size_t size = size_t(st.st_size);
  if (size < 8) {  // mmap refuses an empty file
    ::close(fd);
    throw too_short(path, size);
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) throw Error(ErrorKind::Io, path + ": mmap failed: " + std::strerror(errno));

  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = map;
  f->map_bytes_ = size;
  f->self_ = f;
  f->parse(static_cast<const unsigned char*>(map), size);
  return f;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::from_bytes(std::vector<uint8_t> bytes, const std::string& name) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = name;
  f->bytes_ = std::move(bytes);
  f->self_ = f;
  f->parse(f->bytes_.data(), f->bytes_.size());
  return f;
}

void SafetensorsFile::parse(const unsigned char* bytes, size_t size) {
  const std::string& path = path_;
  if (size < 8) throw too_short(path, size);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > kMaxHeaderBytes)
    throw format_error(path, "header length " + std::to_string(header_len) + " exceeds the limit of " +
                                 std::to_string(kMaxHeaderBytes) + " bytes");
  if (header_len > size - 8)
    throw format_error(path, "header length " + std::to_string(header_len) + " runs past the end of the file (" +
                                 std::to_string(size) + " bytes)");
  const char* hdr = reinterpret_cast<const char*>(bytes + 8);
  json j = parse_untrusted_json(std::string_view(hdr, size_t(header_len)), path + ": the header");
  if (!j.is_object()) throw format_error(path, "header is not a JSON object");
  const size_t tensors = j.size() - j.count("__metadata__");
  if (tensors > kMaxTensors)
    throw format_error(path, "header lists " + std::to_string(tensors) + " tensors, more than the limit of " +
                                 std::to_string(kMaxTensors));

  data_ = hdr + header_len;
  size_t data_size = size - 8 - size_t(header_len);

  std::vector<std::pair<std::pair<size_t, size_t>, std::string>> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw format_error(path, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw format_error(path, "__metadata__ value '" + m.key() + "' is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& what) { return format_error(path, "tensor '" + name + "': " + what); };
    if (!v.is_object()) throw bad("entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) throw bad("missing or non-string dtype");
    auto dt = dtype_from_safetensors(v["dtype"].get<std::string>());
    if (!dt) throw bad("unknown dtype '" + v["dtype"].get<std::string>() + "'");
    if (!v.contains("shape") || !v["shape"].is_array()) throw bad("missing or non-array shape");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      throw bad("data_offsets must be an array of two integers");
    SafetensorsEntry e;
    e.dtype = *dt;
    // Bytes with overflow checks: a hostile header may claim absurd shapes. The product of the non-zero
    // dimensions (saturated) bounds every partial product, so numel() cannot overflow even for an empty tensor.
    unsigned __int128 nonzero = 1;
    bool empty = false;
    for (const json& d : v["shape"]) {
      if (!d.is_number_unsigned()) throw bad("shape has a negative or non-integer dimension");
      uint64_t dim = d.get<uint64_t>();
      if (dim > uint64_t(std::numeric_limits<int64_t>::max())) throw bad("shape dimension too large");
      e.shape.push_back(int64_t(dim));
      if (dim == 0)
        empty = true;
      else
        nonzero = std::min(nonzero * dim, (unsigned __int128)(kMaxTensorBytes) + 1);
    }
    if (nonzero * dtype_size(*dt) > kMaxTensorBytes)
      throw bad("shape " + shape_str(e.shape) + " x " + dtype_name(*dt) + " is over the limit of " +
                std::to_string(kMaxTensorBytes) + " bytes per tensor");
    const unsigned __int128 bytes_needed = empty ? 0 : nonzero * dtype_size(*dt);
    for (const json& o : v["data_offsets"])
      if (!o.is_number_unsigned()) throw bad("data_offsets must be non-negative integers");
    uint64_t b = v["data_offsets"][0].get<uint64_t>(), en = v["data_offsets"][1].get<uint64_t>();
    if (b > en) throw bad("data_offsets begin " + std::to_string(b) + " is after end " + std::to_string(en));
    if (en > data_size)
      throw bad("data_offsets end " + std::to_string(en) + " is outside the data section (" +
                std::to_string(data_size) + " bytes)");
    if (bytes_needed != (unsigned __int128)(en - b))
      throw bad("shape " + shape_str(e.shape) + " x " + dtype_name(*dt) + " does not match the byte range of " +
                std::to_string(en - b) + " bytes");
    e.begin = size_t(b);
    e.end = size_t(en);
    ranges.push_back({{e.begin, e.end}, name});
    entries_.emplace(name, std::move(e));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    const auto& prev = ranges[i - 1];
    const auto& cur = ranges[i];
    bool empty = cur.first.first == cur.first.second || prev.first.first == prev.first.second;
    if (!empty && cur.first.first < prev.first.second)
      throw format_error(path, "tensors '" + prev.second + "' and '" + cur.second + "' have overlapping byte ranges");
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_bytes_);
}

Tensor SafetensorsFile::get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw Error(ErrorKind::NotFound, path_ + ": no tensor named '" + name + "'");
  const SafetensorsEntry& e = it->second;
  const char* bytes = data_ + e.begin;
  if (e.end > e.begin && reinterpret_cast<uintptr_t>(bytes) % dtype_size(e.dtype) != 0) {
    Tensor copy = Tensor::empty(e.shape, e.dtype);
    std::memcpy(copy.data(), bytes, e.end - e.begin);
    return copy;
  }
  auto self = self_.lock();
  ZI_ASSERT(self);
  return Tensor::wrap(const_cast<char*>(bytes), e.shape, e.dtype, Device::Host, std::shared_ptr<void>(self, nullptr));
}

namespace {
volatile char g_prefetch_sink;  // where the page-touching fallback of prefetch() leaves its reads
}  // namespace

void SafetensorsFile::prefetch(size_t offset, size_t len) const {
  if (offset >= map_bytes_) return;
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  const size_t begin = offset / page * page, end = std::min(map_bytes_, offset + std::min(len, map_bytes_));
  char* p = static_cast<char*>(map_) + begin;
  const size_t n = end - begin;
  // WILLNEED queues the disk reads of the whole range at once (no-op for cached pages); POPULATE_READ
  // then waits for them and fills the page tables.
  ::madvise(p, n, MADV_WILLNEED);
  if (::madvise(p, n, MADV_POPULATE_READ) == 0) return;
  // Kernels before 5.14 refuse POPULATE_READ: touch one byte per page instead.
  const volatile char* q = p;
  char acc = 0;
  for (size_t i = 0; i < n; i += page) acc = char(acc ^ q[i]);
  g_prefetch_sink = acc;
}

// Workers take 64 MiB pieces of the files in order until none is left or the owner goes away.
class Checkpoint::Prefetch {
 public:
  explicit Prefetch(std::vector<std::shared_ptr<SafetensorsFile>> files) : files_(std::move(files)) {
    for (size_t f = 0; f < files_.size(); ++f)
      for (size_t off = 0; off < files_[f]->size_bytes(); off += kPiece) pieces_.push_back({f, off});
    // A few readers per checkpoint: enough to keep an NVMe queue busy and to spread the page faults,
    // few enough to leave the cores to the loads that run meanwhile.
    size_t threads = std::min(pieces_.size(), size_t(std::clamp(num_threads() / 4, 1, 4)));
    try {
      for (size_t i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
    } catch (...) {  // no thread to spare: the loads read the files themselves
      stop();
    }
  }
  ~Prefetch() { stop(); }
  Prefetch(const Prefetch&) = delete;
  Prefetch& operator=(const Prefetch&) = delete;

 private:
  static constexpr size_t kPiece = size_t(64) << 20;
  struct Piece {
    size_t file, offset;
  };
  void run() {
    for (size_t i = next_++; !stop_ && i < pieces_.size(); i = next_++)
      files_[pieces_[i].file]->prefetch(pieces_[i].offset, kPiece);
  }
  void stop() {
    stop_ = true;
    for (auto& t : threads_) t.join();
    threads_.clear();
  }
  std::vector<std::shared_ptr<SafetensorsFile>> files_;  // keep the mappings alive while reading them
  std::vector<Piece> pieces_;
  std::atomic<size_t> next_{0};
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

void Checkpoint::prefetch() {
  if (!prefetch_) prefetch_ = std::make_shared<Prefetch>(files_);
}

Checkpoint Checkpoint::open_file(const std::string& path) {
  Checkpoint c;
  c.description_ = path;
  c.files_.push_back(SafetensorsFile::open(path));
  for (const auto& kv : c.files_[0]->entries()) c.where_[kv.first] = 0;
  return c;
}

Checkpoint Checkpoint::open_index(const std::string& index_path) {
  std::ifstream in(index_path, std::ios::binary);
  if (!in) throw Error(ErrorKind::NotFound, index_path + ": cannot open the checkpoint index");
  std::stringstream text;
  text << in.rdbuf();
  json j = parse_untrusted_json(text.str(), index_path);
  if (!j.is_object()) throw format_error(index_path, "not a JSON object");
  if (!j.contains("weight_map") || !j["weight_map"].is_object())
    throw format_error(index_path, "missing the 'weight_map' object");
  Checkpoint c;
  c.description_ = index_path;
  fs::path dir = fs::path(index_path).parent_path();
  std::map<std::string, size_t> shard_index;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) throw format_error(index_path, "weight_map entry '" + it.key() + "' is not a string");
    std::string shard = it.value().get<std::string>();
    // A file name in the index's folder, nothing else (a NUL would cut the name the OS sees).
    if (shard.empty() || shard.find_first_of(std::string("/\0", 2)) != std::string::npos ||
        shard.find("..") != std::string::npos)
      throw format_error(index_path, "weight_map entry '" + it.key() + "' names an invalid shard '" + shard + "'");
    auto s = shard_index.find(shard);
    if (s == shard_index.end()) {
      fs::path p = dir / shard;
      std::error_code ec;  // e.g. a name too long for the file system: an error to report, not an exception
      if (!fs::exists(p, ec))
        throw Error(ErrorKind::NotFound, index_path + ": shard '" + shard + "' (holding '" + it.key() +
                                             "') is missing" + (ec ? " (" + ec.message() + ")" : ""));
      c.files_.push_back(SafetensorsFile::open(p.string()));
      s = shard_index.emplace(shard, c.files_.size() - 1).first;
    }
    if (!c.files_[s->second]->has(it.key()))
      throw format_error(index_path, "tensor '" + it.key() + "' is listed in the index but not in shard '" + shard + "'");
    c.where_[it.key()] = s->second;
  }
  return c;
}

Checkpoint Checkpoint::open_dir(const std::string& dir) {
  if (!fs::is_directory(dir)) throw Error(ErrorKind::NotFound, dir + ": not a folder");
  std::vector<fs::path> indexes, files;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::string n = e.path().filename().string();
    if (n.size() > 16 && n.ends_with(".safetensors.index.json")) indexes.push_back(e.path());
    else if (n.ends_with(".safetensors")) files.push_back(e.path());
  }
  if (indexes.size() > 1) throw Error(ErrorKind::Format, dir + ": more than one *.safetensors.index.json");
  if (indexes.size() == 1) return open_index(indexes[0].string());
  if (files.empty()) throw Error(ErrorKind::NotFound, dir + ": no .safetensors files");
  std::sort(files.begin(), files.end());
  Checkpoint c;
  c.description_ = dir;
  for (const auto& p : files) {
    c.files_.push_back(SafetensorsFile::open(p.string()));
    for (const auto& kv : c.files_.back()->entries()) {
      if (c.where_.count(kv.first))
        throw Error(ErrorKind::Format, dir + ": tensor '" + kv.first + "' appears in more than one file");
      c.where_[kv.first] = c.files_.size() - 1;
    }
  }
  return c;
}

Tensor Checkpoint::get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error(ErrorKind::NotFound, description_ + ": no tensor named '" + name + "'");
  return files_[it->second]->get(name);
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> v;
  for (const auto& kv : where_) v.push_back(kv.first);
  return v;
}

namespace {

// A file written under `<path>.tmp` and renamed to `path` by finish(); the temporary is removed if
// finish() is never reached (an exception on the way), so no half-written file keeps the real name.
class FileWriter {
 public:
  explicit FileWriter(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) throw os_error("cannot open for writing");
  }
  ~FileWriter() {
    if (fd_ < 0) return;
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
  FileWriter(const FileWriter&) = delete;
  FileWriter& operator=(const FileWriter&) = delete;

  void write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n) {
      ssize_t w = ::write(fd_, p, std::min(n, size_t(1) << 30));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) throw os_error("write failed");
      p += w;
      n -= size_t(w);
    }
  }
  void finish() {
    int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) {
      Error e = os_error("write failed");
      ::unlink(tmp_.c_str());
      throw e;
    }
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
      Error e = os_error("cannot rename the written file");
      ::unlink(tmp_.c_str());
      throw e;
    }
  }

 private:
  Error os_error(const std::string& what) const {
    return Error(ErrorKind::Io, path_ + ": " + what + ": " + std::strerror(errno ? errno : EIO));
  }
  std::string path_, tmp_;
  int fd_ = -1;
};

// The length prefix and JSON header of a file holding `entries` back to back in this order, padded with
// spaces so that the data section starts 8-byte aligned (as the reference implementation writes it).
std::string safetensors_header(const std::vector<CheckpointEntry>& entries,
                               const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& e : entries) {
    h[e.name] = {
        {"dtype", dtype_to_safetensors(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.nbytes()}}};
    offset += e.nbytes();
  }
  std::string header = h.dump();
  while ((header.size() + 8) % 8) header.push_back(' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char((uint64_t(header.size()) >> (8 * i)) & 0xff);
  return out + header;
}

bool by_name(const CheckpointEntry& a, const CheckpointEntry& b) { return a.name < b.name; }

}  // namespace

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, Tensor>> sorted = tensors;
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<CheckpointEntry> entries;
  for (const auto& [name, t] : sorted) {
    ZI_CHECK(t.device() == Device::Host && t.is_contiguous(), ErrorKind::Internal,
             "write_safetensors: tensor '" + name + "' is not a contiguous host tensor");
    entries.push_back({name, t.dtype(), t.shape()});
  }
  FileWriter out(path);
  std::string header = safetensors_header(entries, metadata);
  out.write(header.data(), header.size());
  for (const auto& kv : sorted) out.write(kv.second.data(), kv.second.nbytes());
  out.finish();
}

WrittenCheckpoint write_checkpoint(const std::string& dir, const std::string& stem,
                                   const std::vector<CheckpointEntry>& entries, uint64_t max_shard_bytes,
                                   const std::function<Tensor(const CheckpointEntry&)>& tensor) {
  ZI_CHECK(max_shard_bytes > 0, ErrorKind::InvalidArgument, "the shard size must be at least 1 byte");
  std::set<std::string> names;
  for (const auto& e : entries)
    ZI_CHECK(names.insert(e.name).second, ErrorKind::Internal, dir + ": tensor '" + e.name + "' is listed twice");
  // In order, a new shard whenever the next tensor would overflow the current one (huggingface_hub's
  // split_torch_state_dict_into_shards).
  std::vector<std::vector<CheckpointEntry>> shards(1);
  uint64_t in_shard = 0;
  WrittenCheckpoint out;
  for (const auto& e : entries) {
    if (!shards.back().empty() && in_shard + e.nbytes() > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(e);
    in_shard += e.nbytes();
    out.total_bytes += e.nbytes();
  }
  const size_t n = shards.size();
  json weight_map = json::object();
  for (size_t k = 0; k < n; ++k) {
    char numbered[32];
    std::snprintf(numbered, sizeof numbered, "-%05zu-of-%05zu", k + 1, n);
    std::string file = stem + (n == 1 ? "" : numbered) + ".safetensors";
    std::string path = (fs::path(dir) / file).string();
    std::vector<CheckpointEntry>& shard = shards[k];
    std::sort(shard.begin(), shard.end(), by_name);
    FileWriter w(path);
    std::string header = safetensors_header(shard, {{"format", "pt"}});
    w.write(header.data(), header.size());
    uint64_t bytes = 0;
    for (const auto& e : shard) {
      Tensor t = tensor(e);
      ZI_CHECK(t.device() == Device::Host && t.is_contiguous() && t.dtype() == e.dtype && t.shape() == e.shape,
               ErrorKind::Internal,
               path + ": tensor '" + e.name + "' came as a " + dtype_name(t.dtype()) + " " + shape_str(t.shape()) +
                   " tensor, not the contiguous host " + dtype_name(e.dtype) + " " + shape_str(e.shape) + " declared");
      w.write(t.data(), t.nbytes());
      weight_map[e.name] = file;
      bytes += t.nbytes();
    }
    w.finish();
    out.files.push_back(file);
    log_debug("wrote " + path + " (" + std::to_string(shard.size()) + " tensors, " + std::to_string(bytes >> 20) +
              " MiB)");
  }
  if (n > 1) {
    std::string file = stem + ".safetensors.index.json";
    std::string text = json{{"metadata", {{"total_size", out.total_bytes}}}, {"weight_map", weight_map}}.dump(2) + "\n";
    FileWriter w((fs::path(dir) / file).string());
    w.write(text.data(), text.size());
    w.finish();
    out.files.push_back(file);
  }
  return out;
}

}  // namespace zimage
