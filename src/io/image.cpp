#include "io/image.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <climits>
#include <csetjmp>
#include <cstdio>  // before jpeglib.h, which uses FILE
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>

#include <jerror.h>
#include <jpeglib.h>
#include <png.h>
#include <webp/decode.h>
#include <webp/encode.h>

#include "core/error.h"

// libpng and libjpeg report fatal errors by longjmp. A longjmp that crosses a C++ frame holding an
// object with a destructor is undefined behavior, so the code that may longjmp is split into small
// "phase" functions: each calls setjmp first, holds only plain data (a state struct passed by
// pointer), and returns false on error. Their C++ callers own all vectors and release the C
// structures with guards, and allocate the pixel buffer between phases, once the size is checked.

namespace zimage {

namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = char(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string size_str(int64_t width, int64_t height) { return std::to_string(width) + "x" + std::to_string(height); }

void check_image(const ImageU8& image) {
  ZI_CHECK(image.width > 0 && image.height > 0, ErrorKind::InvalidArgument,
           "image has an empty size " + size_str(image.width, image.height));
  size_t expected = size_t(image.width) * size_t(image.height) * 3;
  ZI_CHECK(image.rgb.size() == expected, ErrorKind::InvalidArgument,
           "image is " + size_str(image.width, image.height) + " but holds " + std::to_string(image.rgb.size()) +
               " bytes of pixels instead of width*height*3 = " + std::to_string(expected));
}

// Runs before any pixel memory is allocated, so a forged header cannot make us allocate gigabytes.
void check_decode_size(int64_t width, int64_t height, const DecodeLimits& limits, const char* format) {
  ZI_CHECK(width > 0 && height > 0, ErrorKind::Format,
           std::string("invalid ") + format + " data: image size " + size_str(width, height));
  ZI_CHECK(width * height <= limits.max_pixels, ErrorKind::InvalidArgument,
           std::string(format) + " image is " + size_str(width, height) + " (" + std::to_string(width * height) +
               " pixels), more than the limit of " + std::to_string(limits.max_pixels) + " pixels");
}

ImageU8 blank_image(int64_t width, int64_t height) {
  ImageU8 image;
  image.width = int(width);
  image.height = int(height);
  try {
    image.rgb.resize(size_t(width) * size_t(height) * 3);
  } catch (const std::bad_alloc&) {
    throw Error(ErrorKind::OutOfMemory, "out of memory allocating a " + size_str(width, height) + " image");
  }
  return image;
}

// Appends without letting an exception escape into a C library's frames.
bool append_bytes(std::vector<uint8_t>* out, const uint8_t* bytes, size_t n) noexcept {
  try {
    out->insert(out->end(), bytes, bytes + n);
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------- PNG

constexpr uint8_t kPngSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

struct PngState {
  png_structp png = nullptr;
  png_infop info = nullptr;
  const uint8_t* data = nullptr;  // reading
  size_t size = 0, pos = 0;
  std::vector<uint8_t>* out = nullptr;  // writing
  char message[256] = {};
};

void png_on_error(png_structp png, png_const_charp message) {
  auto* state = static_cast<PngState*>(png_get_error_ptr(png));
  std::snprintf(state->message, sizeof state->message, "%s", message);
  png_longjmp(png, 1);
}

// Warnings are about things libpng recovered from (a bad ancillary chunk, a dubious color profile):
// the image is still good, and a library must not write to stderr.
void png_on_warning(png_structp, png_const_charp) {}

void png_read_memory(png_structp png, png_bytep dst, size_t n) {
  auto* state = static_cast<PngState*>(png_get_io_ptr(png));
  if (n > state->size - state->pos) png_error(png, "the data ends early (truncated file?)");
  std::memcpy(dst, state->data + state->pos, n);
  state->pos += n;
}

void png_write_memory(png_structp png, png_bytep src, size_t n) {
  auto* state = static_cast<PngState*>(png_get_io_ptr(png));
  if (!append_bytes(state->out, src, n)) png_error(png, "out of memory");
}

// libpng allocates a chunk's declared length before reading the chunk, even past its own 8 MB chunk limit
// (which reading only warns about): 200 bytes claiming a 1.4 GB text chunk would get 1.4 GB. Its
// allocations are capped instead, far above what a row of the largest image needs (1M pixels x 8 bytes);
// libpng treats a refused one as out of memory and the truncated chunk then fails the read.
constexpr size_t kMaxPngAllocation = size_t(64) << 20;

png_voidp png_malloc_capped(png_structp, png_alloc_size_t size) {
  return size <= kMaxPngAllocation ? std::malloc(size) : nullptr;
}

void png_free_plain(png_structp, png_voidp p) { std::free(p); }

// Given so that libpng never falls back to its default flush, which treats the I/O pointer as a FILE*.
void png_flush_memory(png_structp) {}

struct PngReadGuard {
  PngState* state;
  ~PngReadGuard() { png_destroy_read_struct(&state->png, &state->info, nullptr); }
};

struct PngWriteGuard {
  PngState* state;
  ~PngWriteGuard() { png_destroy_write_struct(&state->png, &state->info); }
};

void png_start_read(PngState& state, const uint8_t* data, size_t size) {
  ZI_CHECK(size >= 8 && std::memcmp(data, kPngSignature, 8) == 0, ErrorKind::Format,
           "invalid PNG data: the PNG signature is missing");
  state.data = data;
  state.size = size;
  state.png = png_create_read_struct_2(PNG_LIBPNG_VER_STRING, &state, png_on_error, png_on_warning, nullptr,
                                       png_malloc_capped, png_free_plain);
  ZI_CHECK(state.png, ErrorKind::OutOfMemory, "out of memory starting the PNG decoder");
}

Error png_format_error(const PngState& state) {
  return Error(ErrorKind::Format, std::string("invalid PNG data: ") + state.message);
}

// Phase: everything up to the first IDAT chunk.
bool png_read_header(PngState* state) {
  if (setjmp(png_jmpbuf(state->png))) return false;
  state->info = png_create_info_struct(state->png);
  if (!state->info) png_error(state->png, "out of memory");
  png_set_read_fn(state->png, state, png_read_memory);
  png_read_info(state->png, state->info);
  return true;
}

// Phase: converts any PNG to 8-bit RGB rows written to `out` (width*height*3 bytes).
bool png_read_pixels(PngState* state, uint8_t* out) {
  if (setjmp(png_jmpbuf(state->png))) return false;
  png_structp png = state->png;
  png_infop info = state->info;
  const int color_type = png_get_color_type(png, info);
  if (color_type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color_type == PNG_COLOR_TYPE_GRAY && png_get_bit_depth(png, info) < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (png_get_bit_depth(png, info) == 16) png_set_scale_16(png);
  if (color_type == PNG_COLOR_TYPE_GRAY || color_type == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  png_set_strip_alpha(png);  // also the alpha a palette's tRNS chunk expands to
  const int passes = png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const png_uint_32 width = png_get_image_width(png, info), height = png_get_image_height(png, info);
  const size_t stride = size_t(width) * 3;
  // Guards the buffer size: the transforms above must yield exactly 3 bytes per pixel.
  if (png_get_rowbytes(png, info) != stride) png_error(png, "libpng did not convert the rows to 8-bit RGB");
  for (int pass = 0; pass < passes; ++pass)
    for (png_uint_32 y = 0; y < height; ++y) png_read_row(png, out + size_t(y) * stride, nullptr);
  png_read_end(png, nullptr);
  return true;
}

// Phase: reads the remaining chunks, skipping the pixel data, to collect text stored after it.
bool png_read_trailing_chunks(PngState* state) {
  if (setjmp(png_jmpbuf(state->png))) return false;
  png_read_update_info(state->png, state->info);
  png_read_end(state->png, state->info);
  return true;
}

ImageU8 decode_png(const uint8_t* data, size_t size, const DecodeLimits& limits) {
  PngState state;
  png_start_read(state, data, size);
  PngReadGuard guard{&state};
  if (!png_read_header(&state)) throw png_format_error(state);
  const int64_t width = png_get_image_width(state.png, state.info);
  const int64_t height = png_get_image_height(state.png, state.info);
  check_decode_size(width, height, limits, "PNG");
  ImageU8 image = blank_image(width, height);
  if (!png_read_pixels(&state, image.rgb.data())) throw png_format_error(state);
  return image;
}

// Keys are Latin-1 in every text chunk; tEXt and zTXt values are Latin-1 too.
std::string latin1_to_utf8(const char* s) {
  std::string out;
  for (; *s; ++s) {
    auto c = static_cast<unsigned char>(*s);
    if (c < 0x80) {
      out += char(c);
    } else {
      out += char(0xC0 | (c >> 6));
      out += char(0x80 | (c & 0x3F));
    }
  }
  return out;
}

bool is_ascii(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
}

// libpng would silently rewrite a bad key (trim, collapse spaces, replace characters): reject it instead.
void check_png_text(const std::string& key, const std::string& value) {
  bool printable = std::all_of(key.begin(), key.end(), [](char c) { return c >= 0x20 && c <= 0x7e; });
  bool ok = !key.empty() && key.size() <= 79 && printable && key.front() != ' ' && key.back() != ' ' &&
            key.find("  ") == std::string::npos;
  ZI_CHECK(ok, ErrorKind::InvalidArgument,
           "PNG text key '" + key +
               "' is not valid: keys are 1 to 79 printable ASCII characters, without leading, trailing or "
               "repeated spaces");
  ZI_CHECK(value.find('\0') == std::string::npos, ErrorKind::InvalidArgument,
           "PNG text value for key '" + key + "' contains a NUL byte");
}

// Phase: the whole PNG file, text chunks before the pixel data so that readers stopping there see them.
bool png_write_all(PngState* state, const ImageU8* image, png_text* text, int text_count) {
  if (setjmp(png_jmpbuf(state->png))) return false;
  png_structp png = state->png;
  state->info = png_create_info_struct(png);
  if (!state->info) png_error(png, "out of memory");
  png_set_write_fn(png, state, png_write_memory, png_flush_memory);
  png_set_IHDR(png, state->info, png_uint_32(image->width), png_uint_32(image->height), 8, PNG_COLOR_TYPE_RGB,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  // zlib level 1 with the SUB filter: a 1024x1024 image encodes in ~47 ms instead of ~480 ms with
  // libpng's defaults (level 6, adaptive filters), for files ~24% larger: encoding sits on every
  // request's latency, so speed wins.
  png_set_compression_level(png, 1);
  png_set_filter(png, 0, PNG_FILTER_SUB);
  if (text_count > 0) png_set_text(png, state->info, text, text_count);
  png_write_info(png, state->info);
  const size_t stride = size_t(image->width) * 3;
  for (int y = 0; y < image->height; ++y) png_write_row(png, image->rgb.data() + size_t(y) * stride);
  png_write_end(png, nullptr);
  return true;
}

std::vector<uint8_t> encode_png(const ImageU8& image, const EncodeOptions& options) {
  std::vector<png_text> text(options.text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const auto& [key, value] = options.text[i];
    check_png_text(key, value);
    // tEXt holds Latin-1, so anything beyond ASCII goes to iTXt, which holds UTF-8.
    text[i].compression = is_ascii(value) ? PNG_TEXT_COMPRESSION_NONE : PNG_ITXT_COMPRESSION_NONE;
    // png_set_text copies the strings; it takes non-const pointers but does not write through them.
    text[i].key = const_cast<char*>(key.c_str());
    text[i].text = const_cast<char*>(value.c_str());
  }
  std::vector<uint8_t> out;
  PngState state;
  state.out = &out;
  state.png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &state, png_on_error, png_on_warning);
  ZI_CHECK(state.png, ErrorKind::OutOfMemory, "out of memory starting the PNG encoder");
  PngWriteGuard guard{&state};
  if (!png_write_all(&state, &image, text.data(), int(text.size())))
    throw Error(ErrorKind::Internal, std::string("PNG encoding failed: ") + state.message);
  return out;
}

// --------------------------------------------------------------------------------------------- JPEG

struct JpegErrorState {
  jpeg_error_mgr mgr;  // first member: libjpeg's callbacks get a pointer to it
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

[[noreturn]] void jpeg_on_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrorState*>(cinfo->err);
  cinfo->err->format_message(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// libjpeg recovers from corrupt data with a warning, as browsers do, and such files are common.
// A file that ends early, though, would come out padded with gray: that one is an error.
void jpeg_on_message(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_on_error(cinfo);
}

void jpeg_init_errors(j_common_ptr cinfo, JpegErrorState* err) {
  cinfo->err = jpeg_std_error(&err->mgr);
  err->mgr.error_exit = jpeg_on_error;
  err->mgr.emit_message = jpeg_on_message;
}

// A progressive JPEG can hold thousands of tiny scans, each costing a pass over the whole image (a known
// denial of service); real files have a few dozen at most.
constexpr int kMaxJpegScans = 1000;

void jpeg_on_progress(j_common_ptr cinfo) {
  auto* d = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (d->input_scan_number <= kMaxJpegScans) return;
  auto* err = reinterpret_cast<JpegErrorState*>(cinfo->err);
  std::snprintf(err->message, sizeof err->message, "more than %d progressive scans", kMaxJpegScans);
  std::longjmp(err->jump, 1);
}

struct JpegDecoder {
  jpeg_decompress_struct cinfo;
  JpegErrorState err;
  jpeg_progress_mgr progress;
};

// jpeg_destroy is a no-op on a struct that jpeg_create never initialized (it is zeroed).
struct JpegDecoderGuard {
  JpegDecoder* decoder;
  ~JpegDecoderGuard() { jpeg_destroy_decompress(&decoder->cinfo); }
};

bool jpeg_read_header_phase(JpegDecoder* d, const uint8_t* data, size_t size) {
  if (setjmp(d->err.jump)) return false;
  jpeg_create_decompress(&d->cinfo);
  d->progress.progress_monitor = jpeg_on_progress;
  d->cinfo.progress = &d->progress;
  jpeg_mem_src(&d->cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&d->cinfo, TRUE);
  // CMYK and YCCK cannot be converted to RGB by libjpeg; they are read as CMYK and converted below.
  const bool cmyk = d->cinfo.jpeg_color_space == JCS_CMYK || d->cinfo.jpeg_color_space == JCS_YCCK;
  d->cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  return true;
}

// Adobe applications write CMYK JPEGs with inverted values (0 = full ink), and flag them with their
// APP14 marker; without it the values are taken as plain ink amounts.
void cmyk_to_rgb(const uint8_t* cmyk, uint8_t* rgb, size_t width, bool inverted) {
  for (size_t x = 0; x < width; ++x, cmyk += 4, rgb += 3) {
    const int k = inverted ? cmyk[3] : 255 - cmyk[3];
    for (int c = 0; c < 3; ++c) {
      const int ink = inverted ? cmyk[c] : 255 - cmyk[c];
      rgb[c] = uint8_t((ink * k + 127) / 255);
    }
  }
}

// Phase: decodes into `out` (width*height*3 bytes); `cmyk_row` (width*4 bytes) is needed for CMYK files.
bool jpeg_read_pixels_phase(JpegDecoder* d, uint8_t* out, uint8_t* cmyk_row) {
  if (setjmp(d->err.jump)) return false;
  j_decompress_ptr c = &d->cinfo;
  jpeg_start_decompress(c);
  if (c->output_components != (cmyk_row ? 4 : 3)) {
    std::snprintf(d->err.message, sizeof d->err.message, "unexpected %d components per pixel",
                  c->output_components);
    return false;
  }
  const size_t stride = size_t(c->output_width) * 3;
  while (c->output_scanline < c->output_height) {
    uint8_t* dst = out + size_t(c->output_scanline) * stride;
    JSAMPROW row = cmyk_row ? cmyk_row : dst;
    if (jpeg_read_scanlines(c, &row, 1) != 1) {
      std::snprintf(d->err.message, sizeof d->err.message, "the decoder stopped before the last row");
      return false;
    }
    if (cmyk_row) cmyk_to_rgb(cmyk_row, dst, c->output_width, c->saw_Adobe_marker);
  }
  jpeg_finish_decompress(c);
  return true;
}

ImageU8 decode_jpeg(const uint8_t* data, size_t size, const DecodeLimits& limits) {
  JpegDecoder d{};
  jpeg_init_errors(reinterpret_cast<j_common_ptr>(&d.cinfo), &d.err);
  JpegDecoderGuard guard{&d};
  auto format_error = [&] { return Error(ErrorKind::Format, std::string("invalid JPEG data: ") + d.err.message); };
  if (!jpeg_read_header_phase(&d, data, size)) throw format_error();
  check_decode_size(d.cinfo.image_width, d.cinfo.image_height, limits, "JPEG");
  ImageU8 image = blank_image(d.cinfo.image_width, d.cinfo.image_height);
  std::vector<uint8_t> cmyk_row(d.cinfo.out_color_space == JCS_CMYK ? size_t(image.width) * 4 : 0);
  if (!jpeg_read_pixels_phase(&d, image.rgb.data(), cmyk_row.empty() ? nullptr : cmyk_row.data()))
    throw format_error();
  return image;
}

struct JpegEncoder {
  jpeg_compress_struct cinfo;
  JpegErrorState err;
  jpeg_destination_mgr dest;
  std::vector<uint8_t>* out;
  uint8_t chunk[4096];  // libjpeg writes here; full chunks are appended to *out
};

struct JpegEncoderGuard {
  JpegEncoder* encoder;
  ~JpegEncoderGuard() { jpeg_destroy_compress(&encoder->cinfo); }
};

JpegEncoder* jpeg_encoder_of(j_compress_ptr cinfo) { return static_cast<JpegEncoder*>(cinfo->client_data); }

void jpeg_dest_init(j_compress_ptr cinfo) {
  JpegEncoder* e = jpeg_encoder_of(cinfo);
  e->dest.next_output_byte = e->chunk;
  e->dest.free_in_buffer = sizeof e->chunk;
}

boolean jpeg_dest_flush(j_compress_ptr cinfo) {
  JpegEncoder* e = jpeg_encoder_of(cinfo);
  if (!append_bytes(e->out, e->chunk, sizeof e->chunk)) ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 0);
  jpeg_dest_init(cinfo);
  return TRUE;
}

void jpeg_dest_term(j_compress_ptr cinfo) {
  JpegEncoder* e = jpeg_encoder_of(cinfo);
  if (!append_bytes(e->out, e->chunk, sizeof e->chunk - e->dest.free_in_buffer))
    ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 0);
}

bool jpeg_encode_phase(JpegEncoder* e, const ImageU8* image, int quality) {
  if (setjmp(e->err.jump)) return false;
  j_compress_ptr c = &e->cinfo;
  jpeg_create_compress(c);
  c->client_data = e;
  e->dest.init_destination = jpeg_dest_init;
  e->dest.empty_output_buffer = jpeg_dest_flush;
  e->dest.term_destination = jpeg_dest_term;
  c->dest = &e->dest;
  c->image_width = JDIMENSION(image->width);
  c->image_height = JDIMENSION(image->height);
  c->input_components = 3;
  c->in_color_space = JCS_RGB;
  jpeg_set_defaults(c);
  jpeg_set_quality(c, quality, TRUE);
  c->optimize_coding = TRUE;  // smaller files for the same pixels, at little cost
  jpeg_start_compress(c, TRUE);
  const size_t stride = size_t(image->width) * 3;
  while (c->next_scanline < c->image_height) {
    // libjpeg takes non-const rows but only reads them.
    JSAMPROW row = const_cast<uint8_t*>(image->rgb.data() + size_t(c->next_scanline) * stride);
    jpeg_write_scanlines(c, &row, 1);
  }
  jpeg_finish_compress(c);
  return true;
}

std::vector<uint8_t> encode_jpeg(const ImageU8& image, int quality) {
  std::vector<uint8_t> out;
  JpegEncoder e{};
  e.out = &out;
  jpeg_init_errors(reinterpret_cast<j_common_ptr>(&e.cinfo), &e.err);
  JpegEncoderGuard guard{&e};
  if (!jpeg_encode_phase(&e, &image, quality))
    throw Error(ErrorKind::Internal, std::string("JPEG encoding failed: ") + e.err.message);
  return out;
}

// --------------------------------------------------------------------------------------------- WebP

const char* webp_status_text(VP8StatusCode status) {
  switch (status) {
    case VP8_STATUS_OUT_OF_MEMORY: return "out of memory";
    case VP8_STATUS_INVALID_PARAM: return "invalid parameter";
    case VP8_STATUS_BITSTREAM_ERROR: return "corrupt bitstream";
    case VP8_STATUS_UNSUPPORTED_FEATURE: return "unsupported feature";
    case VP8_STATUS_SUSPENDED:
    case VP8_STATUS_NOT_ENOUGH_DATA: return "the data ends early (truncated file?)";
    default: return "decoding failed";
  }
}

ImageU8 decode_webp(const uint8_t* data, size_t size, const DecodeLimits& limits) {
  WebPDecoderConfig config;
  ZI_CHECK(WebPInitDecoderConfig(&config), ErrorKind::Internal, "libwebp version mismatch");
  VP8StatusCode status = WebPGetFeatures(data, size, &config.input);
  ZI_CHECK(status == VP8_STATUS_OK, ErrorKind::Format, std::string("invalid WebP data: ") + webp_status_text(status));
  ZI_CHECK(!config.input.has_animation, ErrorKind::Format, "animated WebP images are not supported");
  check_decode_size(config.input.width, config.input.height, limits, "WebP");
  ImageU8 image = blank_image(config.input.width, config.input.height);
  // RGB output drops alpha without compositing, as for the other formats.
  config.output.colorspace = MODE_RGB;
  config.output.is_external_memory = 1;
  config.output.u.RGBA.rgba = image.rgb.data();
  config.output.u.RGBA.stride = image.width * 3;
  config.output.u.RGBA.size = image.rgb.size();
  status = WebPDecode(data, size, &config);
  WebPFreeDecBuffer(&config.output);
  ZI_CHECK(status == VP8_STATUS_OK, ErrorKind::Format, std::string("invalid WebP data: ") + webp_status_text(status));
  return image;
}

std::vector<uint8_t> encode_webp(const ImageU8& image, int quality) {
  uint8_t* bytes = nullptr;
  const int stride = image.width * 3;
  size_t n = quality == 100 ? WebPEncodeLosslessRGB(image.rgb.data(), image.width, image.height, stride, &bytes)
                            : WebPEncodeRGB(image.rgb.data(), image.width, image.height, stride, float(quality), &bytes);
  std::unique_ptr<uint8_t, void (*)(void*)> owner(bytes, WebPFree);
  ZI_CHECK(n > 0, ErrorKind::Internal, "WebP encoding of a " + size_str(image.width, image.height) + " image failed");
  return std::vector<uint8_t>(bytes, bytes + n);
}

// --------------------------------------------------------------------------------------------- files

Error os_error(const std::string& path, const char* what, int err, ErrorKind kind = ErrorKind::Io) {
  return Error(kind, path + ": " + what + ": " + std::strerror(err));
}

std::vector<uint8_t> read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw os_error(path, "cannot open", errno, errno == ENOENT ? ErrorKind::NotFound : ErrorKind::Io);
  struct FdGuard {
    int fd;
    ~FdGuard() { ::close(fd); }
  } fd_guard{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw os_error(path, "cannot stat", errno);
  ZI_CHECK(S_ISREG(st.st_mode), ErrorKind::Io, path + ": not a regular file");
  std::vector<uint8_t> bytes(size_t(st.st_size));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw os_error(path, "cannot read", errno);
    if (n == 0) break;  // the file shrank since fstat
    done += size_t(n);
  }
  bytes.resize(done);
  return bytes;
}

void write_file_atomically(const std::string& path, const std::vector<uint8_t>& bytes) {
  static std::atomic<unsigned> counter{0};
  // Unique per process and call, and in the same folder as `path` so that rename() is atomic.
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) throw os_error(path, "cannot create the file", errno);
  auto fail = [&](int err, bool close_fd) {
    if (close_fd) ::close(fd);
    ::unlink(tmp.c_str());
    return os_error(path, "cannot write", err);
  };
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw fail(errno, true);
    done += size_t(n);
  }
  if (::close(fd) != 0) throw fail(errno, false);
  if (::rename(tmp.c_str(), path.c_str()) != 0) throw fail(errno, false);
}

}  // namespace

// ------------------------------------------------------------------------------------------- public

ImageFormat image_format_from_path(const std::string& path) {
  const std::string ext = lower(std::filesystem::path(path).extension().string());
  const char* supported = "use .png, .jpg, .jpeg or .webp";
  ZI_CHECK(!ext.empty(), ErrorKind::InvalidArgument,
           "'" + path + "' has no file extension to choose the image format: " + supported);
  if (ext == ".png") return ImageFormat::Png;
  if (ext == ".jpg" || ext == ".jpeg") return ImageFormat::Jpeg;
  if (ext == ".webp") return ImageFormat::Webp;
  throw Error(ErrorKind::InvalidArgument, "unsupported image file extension '" + ext + "' in '" + path + "': " + supported);
}

const char* image_format_name(ImageFormat format) {
  switch (format) {
    case ImageFormat::Png: return "png";
    case ImageFormat::Jpeg: return "jpeg";
    case ImageFormat::Webp: return "webp";
  }
  return "unknown";
}

std::optional<ImageFormat> image_format_from_name(std::string_view name) {
  const std::string n = lower(name);
  if (n == "png") return ImageFormat::Png;
  if (n == "jpeg" || n == "jpg") return ImageFormat::Jpeg;
  if (n == "webp") return ImageFormat::Webp;
  return std::nullopt;
}

std::vector<uint8_t> encode_image(const ImageU8& image, ImageFormat format, const EncodeOptions& options) {
  check_image(image);
  ZI_CHECK(options.quality >= 1 && options.quality <= 100, ErrorKind::InvalidArgument,
           "image quality must be between 1 and 100, got " + std::to_string(options.quality));
  // The largest side each library accepts.
  const int64_t max_side = format == ImageFormat::Png    ? PNG_USER_WIDTH_MAX
                           : format == ImageFormat::Jpeg ? JPEG_MAX_DIMENSION
                                                         : WEBP_MAX_DIMENSION;
  ZI_CHECK(image.width <= max_side && image.height <= max_side, ErrorKind::InvalidArgument,
           "cannot encode a " + size_str(image.width, image.height) + " image as " + image_format_name(format) +
               ": the format allows at most " + std::to_string(max_side) + " pixels per side");
  switch (format) {
    case ImageFormat::Png: return encode_png(image, options);
    case ImageFormat::Jpeg: return encode_jpeg(image, options.quality);
    case ImageFormat::Webp: return encode_webp(image, options.quality);
  }
  throw Error(ErrorKind::Internal, "unknown image format " + std::to_string(int(format)));
}

void write_image(const std::string& path, const ImageU8& image, const EncodeOptions& options) {
  const ImageFormat format = image_format_from_path(path);
  write_file_atomically(path, encode_image(image, format, options));
}

ImageU8 decode_image(const uint8_t* data, size_t size, const DecodeLimits& limits) {
  ZI_CHECK(size > 0, ErrorKind::Format, "empty image data: there are no bytes to decode");
  if (size >= 8 && std::memcmp(data, kPngSignature, 8) == 0) return decode_png(data, size, limits);
  if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) return decode_jpeg(data, size, limits);
  if (size >= 12 && std::memcmp(data, "RIFF", 4) == 0 && std::memcmp(data + 8, "WEBP", 4) == 0)
    return decode_webp(data, size, limits);
  // The first bytes tell e.g. an HTML error page or a text file apart from a damaged image.
  std::string head;
  for (size_t i = 0; i < std::min<size_t>(size, 8); ++i) {
    char hex[4];
    std::snprintf(hex, sizeof hex, " %02x", data[i]);
    head += hex;
  }
  throw Error(ErrorKind::Format, "unrecognized image data: not a PNG, JPEG or WebP file (it starts with" + head + ")");
}

ImageU8 read_image(const std::string& path, const DecodeLimits& limits) {
  std::vector<uint8_t> bytes = read_file(path);
  try {
    return decode_image(bytes.data(), bytes.size(), limits);
  } catch (const Error& e) {
    throw Error(e.kind(), path + ": " + e.what());
  }
}

std::map<std::string, std::string> read_png_text(const uint8_t* data, size_t size) {
  PngState state;
  png_start_read(state, data, size);
  PngReadGuard guard{&state};
  if (!png_read_header(&state) || !png_read_trailing_chunks(&state)) throw png_format_error(state);
  png_textp text = nullptr;
  const int count = png_get_text(state.png, state.info, &text, nullptr);
  std::map<std::string, std::string> result;
  for (int i = 0; i < count; ++i) {
    const bool utf8 = text[i].compression >= PNG_ITXT_COMPRESSION_NONE;  // iTXt
    result.emplace(latin1_to_utf8(text[i].key), utf8 ? std::string(text[i].text) : latin1_to_utf8(text[i].text));
  }
  return result;
}

Tensor image_to_tensor(const ImageU8& image) {
  check_image(image);
  Tensor t = Tensor::empty({image.height, image.width, 3}, DType::U8);
  std::memcpy(t.data(), image.rgb.data(), image.rgb.size());
  return t;
}

ImageU8 tensor_to_image(const Tensor& tensor) {
  ZI_CHECK(tensor.dtype() == DType::U8 && tensor.ndim() == 3 && tensor.dim(2) == 3, ErrorKind::InvalidArgument,
           std::string("an image tensor must be uint8 [H, W, 3], got ") + dtype_name(tensor.dtype()) + " " +
               shape_str(tensor.shape()));
  ZI_CHECK(tensor.device() == Device::Host, ErrorKind::InvalidArgument, "an image tensor must be on the host");
  ZI_CHECK(tensor.dim(0) > 0 && tensor.dim(1) > 0 && tensor.dim(0) <= INT_MAX && tensor.dim(1) <= INT_MAX,
           ErrorKind::InvalidArgument, "image tensor has an unusable size " + shape_str(tensor.shape()));
  const Tensor t = tensor.is_contiguous() ? tensor : tensor.clone();
  ImageU8 image = blank_image(t.dim(1), t.dim(0));
  std::memcpy(image.rgb.data(), t.data(), image.rgb.size());
  return image;
}

}  // namespace zimage
