#include "text/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <shared_mutex>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "core/log.h"
#include "io/untrusted_json.h"

namespace zimage {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------------------
// UTF-8 helpers
// ---------------------------------------------------------------------------------------------------

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

// Length of the well-formed UTF-8 sequence at s[i], or 0 when the bytes there are ill-formed; `bad` is then
// the length of the maximal ill-formed subpart (Unicode 15, section 3.9, table 3-7), which becomes one U+FFFD.
size_t utf8_sequence(std::string_view s, size_t i, size_t& bad) {
  const auto b = uint8_t(s[i]);
  if (b < 0x80) return 1;
  size_t len;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    len = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    len = 3;
    if (b == 0xE0) lo = 0xA0;
    if (b == 0xED) hi = 0x9F;  // no UTF-16 surrogates
  } else if (b >= 0xF0 && b <= 0xF4) {
    len = 4;
    if (b == 0xF0) lo = 0x90;
    if (b == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    bad = 1;
    return 0;
  }
  for (size_t k = 1; k < len; ++k) {
    if (i + k >= s.size()) {
      bad = k;
      return 0;
    }
    const auto c = uint8_t(s[i + k]);
    const bool ok = k == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
    if (!ok) {
      bad = k;
      return 0;
    }
  }
  return len;
}

// Replaces ill-formed UTF-8 with U+FFFD. Returns false (leaving `out` untouched) when `s` is already valid,
// which is the common case and costs no copy.
bool replace_invalid_utf8(std::string_view s, std::string& out) {
  size_t i = 0;
  while (i < s.size()) {
    if (uint8_t(s[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t bad = 0;
    size_t len = utf8_sequence(s, i, bad);
    if (len == 0) break;
    i += len;
  }
  if (i == s.size()) return false;
  out.assign(s.substr(0, i));
  while (i < s.size()) {
    size_t bad = 0;
    size_t len = utf8_sequence(s, i, bad);
    if (len) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out.append("\xEF\xBF\xBD");
      i += bad;
    }
  }
  return true;
}

// Code point at s[i] of valid UTF-8; `len` receives its byte length.
uint32_t decode_cp(std::string_view s, size_t i, size_t& len) {
  const auto b = uint8_t(s[i]);
  if (b < 0x80) {
    len = 1;
    return b;
  }
  len = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2;
  uint32_t cp = b & (0x7F >> len);
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (uint8_t(s[i + k]) & 0x3F);
  return cp;
}

// Start of the character that ends at s[end) (valid UTF-8, end > 0).
size_t prev_char_start(std::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (uint8_t(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

bool is_ascii(std::string_view s) {
  for (char c : s)
    if (uint8_t(c) >= 0x80) return false;
  return true;
}

// Unicode White_Space, the set Rust's char::is_whitespace uses for added tokens' lstrip/rstrip.
bool is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// A "word" character for single_word added tokens, as the reference's regex \w: letters, marks, decimal
// digits, connector punctuation ('_') and the joiners.
bool is_word_char(uint32_t cp) {
  if (cp < 0x80) return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || (cp >= '0' && cp <= '9') || cp == '_';
  if (cp == 0x200C || cp == 0x200D) return true;
  switch (utf8proc_category(utf8proc_int32_t(cp))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_PC: return true;
    default: return false;
  }
}

// ---------------------------------------------------------------------------------------------------
// The GPT-2 byte alphabet: every byte gets a printable code point so BPE works on text, never on raw bytes.
// Printable Latin-1 bytes stand for themselves; the other 68 take U+0100.. in byte order.
// ---------------------------------------------------------------------------------------------------

struct ByteAlphabet {
  std::array<uint32_t, 256> byte_to_cp{};
  std::array<int16_t, 324> cp_to_byte{};  // -1 where the code point stands for no byte

  ByteAlphabet() {
    cp_to_byte.fill(-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_cp[size_t(b)] = printable ? uint32_t(b) : next++;
      cp_to_byte[byte_to_cp[size_t(b)]] = int16_t(b);
    }
  }

  // The alphabet spelling of raw bytes (what the vocabulary stores).
  std::string encode(std::string_view bytes) const {
    std::string out;
    out.reserve(bytes.size() * 2);
    for (char c : bytes) append_utf8(out, byte_to_cp[uint8_t(c)]);
    return out;
  }

  // Raw bytes of an alphabet spelling; nullopt when some character is outside the alphabet.
  std::optional<std::string> decode(std::string_view text) const {
    std::string out;
    size_t i = 0;
    while (i < text.size()) {
      size_t bad = 0, len = utf8_sequence(text, i, bad);
      if (len == 0) return std::nullopt;
      uint32_t cp = decode_cp(text, i, len);
      if (cp >= cp_to_byte.size() || cp_to_byte[cp] < 0) return std::nullopt;
      out.push_back(char(cp_to_byte[cp]));
      i += len;
    }
    return out;
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// ---------------------------------------------------------------------------------------------------
// PCRE2 regex with JIT. The reference uses Oniguruma; the patterns tokenizers ship (\p{L}, \p{N}, \s,
// (?i:...), (?!...)) mean the same in PCRE2 with UTF + UCP.
// ---------------------------------------------------------------------------------------------------

// Per-call matching state (match data and JIT stack are not shareable between threads).
class MatchScratch {
 public:
  MatchScratch() {
    data_ = pcre2_match_data_create(1, nullptr);
    context_ = pcre2_match_context_create(nullptr);
    // Long runs of one character class backtrack deeply; the default 32 KiB JIT stack is too small for them.
    stack_ = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    if (!data_ || !context_ || !stack_) {
      release();
      throw Error(ErrorKind::OutOfMemory, "tokenizer: cannot allocate regex match state");
    }
    pcre2_jit_stack_assign(context_, nullptr, stack_);
  }
  ~MatchScratch() { release(); }
  MatchScratch(const MatchScratch&) = delete;
  MatchScratch& operator=(const MatchScratch&) = delete;

  pcre2_match_data* data() const { return data_; }
  pcre2_match_context* context() const { return context_; }

 private:
  void release() {
    if (data_) pcre2_match_data_free(data_);
    if (context_) pcre2_match_context_free(context_);
    if (stack_) pcre2_jit_stack_free(stack_);
    data_ = nullptr;
    context_ = nullptr;
    stack_ = nullptr;
  }
  pcre2_match_data* data_ = nullptr;
  pcre2_match_context* context_ = nullptr;
  pcre2_jit_stack* stack_ = nullptr;
};

struct Span {
  size_t begin, end;
  bool is_match;
};

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof(buf));
  return reinterpret_cast<const char*>(buf);
}

class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& where) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);  // UCP is refused with LITERAL
    code_ =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options, &err, &offset, nullptr);
    if (!code_)
      throw Error(ErrorKind::Format, where + ": cannot compile the pre-tokenizer pattern at offset " +
                                         std::to_string(offset) + ": " + pcre2_message(err));
    // Without JIT (a PCRE2 built without it) matching still works, only slower.
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // The reference's find_matches: spans covering all of `text`, alternating gaps and matches in order.
  // Empty matches are dropped (they would only produce empty pieces, which the reference filters out).
  void find_spans(std::string_view text, MatchScratch& scratch, std::vector<Span>& spans) const {
    spans.clear();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t prev = 0, offset = 0;
    while (offset < text.size()) {
      // The text is valid UTF-8 (invalid input was replaced first), so PCRE2 need not re-check it on each call,
      // which would make a long text quadratic.
      int rc = pcre2_match(code_, subject, text.size(), offset, PCRE2_NO_UTF_CHECK, scratch.data(), scratch.context());
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT || rc == PCRE2_ERROR_NOMEMORY)
        rc = pcre2_match(code_, subject, text.size(), offset, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, scratch.data(),
                         scratch.context());
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0)
        throw Error(ErrorKind::InvalidArgument,
                    "tokenizer: the pre-tokenizer pattern failed on the text: " + pcre2_message(rc));
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(scratch.data());
      size_t begin = ov[0], end = ov[1];
      if (end == begin) {  // an empty match: step over one character and search again
        size_t len = 1;
        decode_cp(text, end, len);
        offset = end + len;
        continue;
      }
      if (begin > prev) spans.push_back({prev, begin, false});
      spans.push_back({begin, end, true});
      prev = offset = end;
    }
    if (prev < text.size()) spans.push_back({prev, text.size(), false});
  }

 private:
  pcre2_code* code_ = nullptr;
};

// ---------------------------------------------------------------------------------------------------
// BPE merge table: (left id, right id) -> (rank, merged id), open addressing on one flat array because this
// lookup is the inner loop of encoding.
// ---------------------------------------------------------------------------------------------------

class MergeTable {
 public:
  struct Entry {
    int32_t rank;
    int32_t id;
  };

  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    slots_.assign(cap, Slot{kEmpty, {0, 0}});
    mask_ = cap - 1;
  }

  // A pair listed twice keeps its last rank, as the reference's hash map does.
  void insert(int32_t left, int32_t right, Entry e) {
    const uint64_t k = key(left, right);
    for (size_t i = hash(k) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmpty || slots_[i].key == k) {
        slots_[i] = Slot{k, e};
        return;
      }
    }
  }

  const Entry* find(int32_t left, int32_t right) const {
    const uint64_t k = key(left, right);
    for (size_t i = hash(k) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == k) return &slots_[i].entry;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  struct Slot {
    uint64_t key;
    Entry entry;
  };
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  static uint64_t hash(uint64_t k) {  // murmur3 finalizer: ids are small and dense, so mix them
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

// Token spelling -> id over spellings stored elsewhere (the id -> token table), open addressing on one flat
// array: building it for 151,643 tokens and the 450,000 look-ups that resolving the merges takes are a
// large share of loading time with a node-based map.
class TokenIndex {
 public:
  void build(const std::vector<std::string>& tokens, const std::vector<int32_t>& ids) {
    tokens_ = &tokens;
    size_t cap = 16;
    while (cap < ids.size() * 2) cap <<= 1;
    slots_.assign(cap, Slot{0, -1});
    mask_ = cap - 1;
    for (int32_t id : ids) {
      const std::string& tok = tokens[size_t(id)];
      const size_t h = StringHash{}(tok);
      for (size_t i = h & mask_;; i = (i + 1) & mask_) {
        Slot& slot = slots_[i];
        if (slot.id < 0 || (slot.hash == uint32_t(h) && tokens[size_t(slot.id)] == tok)) {
          slot = Slot{uint32_t(h), id};  // a spelling listed twice keeps its last id
          break;
        }
      }
    }
  }

  int32_t find(std::string_view tok) const {  // -1 when absent
    if (slots_.empty()) return -1;
    const size_t h = StringHash{}(tok);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& slot = slots_[i];
      if (slot.id < 0) return -1;
      if (slot.hash == uint32_t(h) && (*tokens_)[size_t(slot.id)] == tok) return slot.id;
    }
  }

 private:
  struct Slot {
    uint32_t hash;  // low bits of the hash, to skip most string comparisons
    int32_t id;     // -1: empty
  };
  const std::vector<std::string>* tokens_ = nullptr;
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

// ---------------------------------------------------------------------------------------------------
// Pieces of the tokenizer.json pipeline
// ---------------------------------------------------------------------------------------------------

enum class NormalForm { NFC, NFD, NFKC, NFKD };

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct PreTokenizerStep {
  std::unique_ptr<Regex> regex;  // null: no splitting (ByteLevel with use_regex false)
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel: prepend ' ' to each piece not starting with one
};

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
  bool operator==(const AddedToken& o) const {  // the id aside, as the reference compares them
    return content == o.content && single_word == o.single_word && lstrip == o.lstrip && rstrip == o.rstrip &&
           normalized == o.normalized && special == o.special;
  }
};

// Added tokens matched leftmost-longest, as the reference's Aho-Corasick automaton does. Candidates are
// bucketed by first byte, longest first; a scan touches only positions whose byte starts some token.
class AddedTokenMatcher {
 public:
  void add(const AddedToken* token) {
    if (token->content.empty()) return;
    auto& bucket = by_first_byte_[uint8_t(token->content[0])];
    bucket.push_back(token);
    std::stable_sort(bucket.begin(), bucket.end(),
                     [](const AddedToken* a, const AddedToken* b) { return a->content.size() > b->content.size(); });
    empty_ = false;
  }

  // Calls on_text(piece) for the stretches between tokens and on_token(id) for each token, in order.
  template <typename OnText, typename OnToken>
  void split(std::string_view text, OnText&& on_text, OnToken&& on_token) const {
    if (empty_) {
      if (!text.empty()) on_text(text);
      return;
    }
    size_t emitted = 0;  // text before this offset has been handed out
    size_t i = 0;
    while (i < text.size()) {
      const auto& bucket = by_first_byte_[uint8_t(text[i])];
      const AddedToken* hit = nullptr;
      for (const AddedToken* t : bucket) {
        if (text.compare(i, t->content.size(), t->content) == 0) {
          hit = t;
          break;
        }
      }
      if (!hit) {
        ++i;
        continue;
      }
      size_t start = i, stop = i + hit->content.size();
      i = stop;  // the automaton resumes after the match whether or not the match is kept
      if (hit->single_word) {
        size_t len = 0;
        bool word_before = start > 0 && is_word_char(decode_cp(text, prev_char_start(text, start), len));
        bool word_after = stop < text.size() && is_word_char(decode_cp(text, stop, len));
        if (word_before || word_after) continue;
      }
      if (hit->lstrip) {
        while (start > emitted) {
          size_t p = prev_char_start(text, start), len = 0;
          if (!is_white_space(decode_cp(text, p, len))) break;
          start = p;
        }
      }
      if (hit->rstrip) {
        while (stop < text.size()) {
          size_t len = 0;
          if (!is_white_space(decode_cp(text, stop, len))) break;
          stop += len;
        }
        i = stop;
      }
      if (start > emitted) on_text(text.substr(emitted, start - emitted));
      on_token(hit->id);
      emitted = stop;
    }
    if (emitted < text.size()) on_text(text.substr(emitted));
  }

 private:
  std::array<std::vector<const AddedToken*>, 256> by_first_byte_;
  bool empty_ = true;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The loaded tokenizer
// ---------------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string path;
  std::vector<NormalForm> normalizers;
  std::vector<PreTokenizerStep> pre_tokenizer;
  bool ignore_merges = false;

  std::vector<std::string> id_to_token;  // model tokens; "" where an id is unused
  TokenIndex vocab;                      // model token (alphabet spelling) -> id
  size_t model_vocab_size = 0;           // entries of model.vocab
  std::vector<std::string> id_to_bytes;  // what decode emits for each id, added tokens included
  std::vector<uint8_t> id_used;          // ids that decode accepts
  std::array<int32_t, 256> byte_id{};    // the single-byte tokens BPE starts from
  MergeTable merges;

  std::vector<AddedToken> added;  // owns the tokens the matchers point at
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> added_ids;
  AddedTokenMatcher raw_added;         // normalized = false: matched in the raw text
  AddedTokenMatcher normalized_added;  // normalized = true: matched after normalization
  int32_t pad = -1;

  // Word -> ids cache. Prompts repeat most words, and a cached word skips BPE entirely.
  static constexpr size_t kCacheMaxEntries = 100000;
  static constexpr size_t kCacheMaxWordBytes = 128;
  mutable std::shared_mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache;

  std::string normalize(std::string_view text) const;
  void pre_tokenize(size_t step, std::string_view piece, MatchScratch& scratch, std::vector<std::vector<Span>>& spans,
                    const std::function<void(std::string_view)>& sink) const;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void bpe_uncached(std::string_view word, std::vector<int32_t>& out) const;
};

std::string Tokenizer::Impl::normalize(std::string_view text) const {
  std::string current(text);
  for (NormalForm form : normalizers) {
    if (is_ascii(current)) break;  // ASCII is invariant under every normal form
    if (form == NormalForm::NFC) {
      // Below U+0300 nothing decomposes, reorders or composes under NFC: skip the library call.
      bool low = true;
      for (size_t i = 0; i < current.size() && low;) {
        size_t len = 1;
        low = decode_cp(current, i, len) < 0x300;
        i += len;
      }
      if (low) continue;
    }
    int options = UTF8PROC_STABLE;
    switch (form) {
      case NormalForm::NFC: options |= UTF8PROC_COMPOSE; break;
      case NormalForm::NFD: options |= UTF8PROC_DECOMPOSE; break;
      case NormalForm::NFKC: options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
      case NormalForm::NFKD: options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
    }
    utf8proc_uint8_t* out = nullptr;
    utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(current.data()),
                                      utf8proc_ssize_t(current.size()), &out, utf8proc_option_t(options));
    if (n < 0)
      throw Error(ErrorKind::InvalidArgument,
                  std::string("tokenizer: cannot normalize the text: ") + utf8proc_errmsg(n));
    current.assign(reinterpret_cast<const char*>(out), size_t(n));
    std::free(out);
  }
  return current;
}

void Tokenizer::Impl::pre_tokenize(size_t step, std::string_view piece, MatchScratch& scratch,
                                   std::vector<std::vector<Span>>& spans,
                                   const std::function<void(std::string_view)>& sink) const {
  if (piece.empty()) return;
  if (step == pre_tokenizer.size()) {
    sink(piece);
    return;
  }
  const PreTokenizerStep& s = pre_tokenizer[step];
  std::string prefixed;
  if (s.add_prefix_space && piece[0] != ' ') {
    prefixed.reserve(piece.size() + 1);
    prefixed.push_back(' ');
    prefixed.append(piece);
    piece = prefixed;
  }
  if (!s.regex) {
    pre_tokenize(step + 1, piece, scratch, spans, sink);
    return;
  }

  std::vector<Span>& sp = spans[step];
  s.regex->find_spans(piece, scratch, sp);
  if (s.invert)
    for (Span& x : sp) x.is_match = !x.is_match;

  // Merge spans into pieces as the reference's SplitDelimiterBehavior does; is_match now means "drop".
  std::vector<Span> pieces;
  pieces.reserve(sp.size());
  switch (s.behavior) {
    case SplitBehavior::Isolated:
      for (const Span& x : sp) pieces.push_back({x.begin, x.end, false});
      break;
    case SplitBehavior::Removed: pieces = sp; break;
    case SplitBehavior::Contiguous: {
      bool previous_match = false;
      for (const Span& x : sp) {
        if (x.is_match == previous_match && !pieces.empty())
          pieces.back().end = x.end;
        else
          pieces.push_back({x.begin, x.end, false});
        previous_match = x.is_match;
      }
      break;
    }
    case SplitBehavior::MergedWithPrevious: {
      bool previous_match = false;
      for (const Span& x : sp) {
        if (x.is_match && !previous_match && !pieces.empty())
          pieces.back().end = x.end;
        else
          pieces.push_back({x.begin, x.end, false});
        previous_match = x.is_match;
      }
      break;
    }
    case SplitBehavior::MergedWithNext: {
      bool previous_match = false;
      for (auto it = sp.rbegin(); it != sp.rend(); ++it) {
        if (it->is_match && !previous_match && !pieces.empty())
          pieces.back().begin = it->begin;
        else
          pieces.push_back({it->begin, it->end, false});
        previous_match = it->is_match;
      }
      std::reverse(pieces.begin(), pieces.end());
      break;
    }
  }
  for (const Span& x : pieces)
    if (!x.is_match && x.end > x.begin)
      pre_tokenize(step + 1, piece.substr(x.begin, x.end - x.begin), scratch, spans, sink);
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() == 1) {
    out.push_back(byte_id[uint8_t(word[0])]);
    return;
  }
  const bool cacheable = word.size() <= kCacheMaxWordBytes;
  if (cacheable) {
    std::shared_lock lock(cache_mutex);
    auto it = cache.find(word);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = out.size();
  bpe_uncached(word, out);
  if (cacheable) {
    std::unique_lock lock(cache_mutex);
    if (cache.size() < kCacheMaxEntries)
      cache.emplace(std::string(word), std::vector<int32_t>(out.begin() + long(first), out.end()));
  }
}

void Tokenizer::Impl::bpe_uncached(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges) {  // the file asks for whole-word vocabulary hits to bypass the merges
    if (int32_t id = vocab.find(byte_alphabet().encode(word)); id >= 0) {
      out.push_back(id);
      return;
    }
  }
  // Symbols form a linked list over the word's bytes; a min-heap holds candidate merges ordered by
  // (rank, position), exactly the reference's order. Stale candidates are recognised by their ids.
  struct Symbol {
    int32_t id, prev, next;
  };
  struct Candidate {
    int32_t rank, pos, left, right, merged;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const int32_t n = int32_t(word.size());
  std::vector<Symbol> sym(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) sym[size_t(i)] = {byte_id[uint8_t(word[size_t(i)])], i - 1, i + 1 < n ? i + 1 : -1};

  std::vector<Candidate> heap;
  heap.reserve(size_t(n));
  auto consider = [&](int32_t pos) {
    if (pos < 0) return;
    int32_t next = sym[size_t(pos)].next;
    if (next < 0) return;
    const MergeTable::Entry* e = merges.find(sym[size_t(pos)].id, sym[size_t(next)].id);
    if (!e) return;
    heap.push_back({e->rank, pos, sym[size_t(pos)].id, sym[size_t(next)].id, e->id});
    std::push_heap(heap.begin(), heap.end(), std::greater<>());
  };
  for (int32_t i = 0; i + 1 < n; ++i) consider(i);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    const Candidate c = heap.back();
    heap.pop_back();
    Symbol& left = sym[size_t(c.pos)];
    if (left.id != c.left || left.next < 0) continue;
    Symbol& right = sym[size_t(left.next)];
    if (right.id != c.right) continue;
    left.id = c.merged;
    right.id = -1;  // dead
    left.next = right.next;
    if (left.next >= 0) sym[size_t(left.next)].prev = c.pos;
    consider(left.prev);
    consider(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = sym[size_t(i)].next) out.push_back(sym[size_t(i)].id);
}

// ---------------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------------

namespace {

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorKind::Io, path.string() + ": cannot open for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error(ErrorKind::Io, path.string() + ": read failed");
  return std::move(ss).str();
}

// The largest token id accepted: eight times the largest vocabularies in use (~256k ids).
constexpr int64_t kMaxTokenId = (int64_t(1) << 21) - 1;

struct MergeSpec {
  std::string left, right;
};

// Reads tokenizer.json in one pass. model.vocab and model.merges (300,000 entries in Qwen's file) stream
// straight into flat vectors; everything else, a few kilobytes, becomes a json tree. A tree of the whole file
// costs more to build and free than all the rest of loading.
class TokenizerJsonReader final : public nlohmann::json_sax<json> {
 public:
  json root;
  std::vector<std::pair<std::string, int64_t>> vocab;
  std::vector<MergeSpec> merges;
  std::string error;  // set when a handler stops the parse

  bool null() override { return scalar(json(nullptr)); }
  bool boolean(bool v) override { return scalar(json(v)); }
  bool number_integer(number_integer_t v) override {
    if (mode_ == Mode::Vocab) return vocab_id(int64_t(v));
    return scalar(json(v));
  }
  bool number_unsigned(number_unsigned_t v) override {
    if (mode_ == Mode::Vocab) return vocab_id(v > uint64_t(std::numeric_limits<int64_t>::max()) ? -1 : int64_t(v));
    return scalar(json(v));
  }
  bool number_float(number_float_t v, const string_t&) override { return scalar(json(v)); }
  bool binary(binary_t&) override { return stop("contains a binary value, which JSON text cannot hold"); }

  bool string(string_t& v) override {
    if (mode_ == Mode::Merges) {  // the older "left right" form
      const size_t space = v.find(' ');
      if (space == std::string::npos || v.find(' ', space + 1) != std::string::npos)
        return stop("model.merges[" + std::to_string(merges.size()) + "] = \"" + v +
                    "\" is not two tokens separated by one space");
      merges.push_back({v.substr(0, space), v.substr(space + 1)});
      return true;
    }
    if (mode_ == Mode::MergePair) {  // the newer ["left", "right"] form, which allows spaces in tokens
      pair_.push_back(std::move(v));
      return true;
    }
    return scalar(json(std::move(v)));
  }

  bool key(string_t& k) override {
    key_ = std::move(k);
    return true;
  }

  bool start_object(std::size_t) override {
    if (mode_ == Mode::Dom) {
      if (at_model_member("vocab")) {
        put(json::object());  // a placeholder: the entries go to `vocab`
        mode_ = Mode::Vocab;
        return true;
      }
      return open(json::object());
    }
    return mode_ == Mode::Vocab ? bad_vocab_entry() : bad_merge();
  }
  bool end_object() override {
    if (mode_ == Mode::Vocab) {
      mode_ = Mode::Dom;
      return true;
    }
    stack_.pop_back();
    return true;
  }

  bool start_array(std::size_t) override {
    switch (mode_) {
      case Mode::Dom:
        if (at_model_member("merges")) {
          put(json::array());  // a placeholder: the entries go to `merges`
          mode_ = Mode::Merges;
          return true;
        }
        return open(json::array());
      case Mode::Merges:
        pair_.clear();
        mode_ = Mode::MergePair;
        return true;
      case Mode::Vocab: return bad_vocab_entry();
      case Mode::MergePair: return bad_merge();
    }
    return false;
  }
  bool end_array() override {
    switch (mode_) {
      case Mode::Merges: mode_ = Mode::Dom; return true;
      case Mode::MergePair:
        if (pair_.size() != 2) return bad_merge();
        merges.push_back({std::move(pair_[0]), std::move(pair_[1])});
        mode_ = Mode::Merges;
        return true;
      default: stack_.pop_back(); return true;
    }
  }

  bool parse_error(std::size_t, const std::string&, const nlohmann::json::exception& e) override {
    error = std::string("not valid JSON: ") + e.what();
    return false;
  }

 private:
  enum class Mode { Dom, Vocab, Merges, MergePair };

  bool stop(std::string message) {
    error = std::move(message);
    return false;
  }
  bool vocab_id(int64_t v) {
    if (v < 0) return stop("model.vocab[\"" + key_ + "\"] = " + std::to_string(v) + " is not a valid id");
    // The id -> token tables are as long as the largest id: bounded, so that a tiny file cannot claim gigabytes.
    if (v > kMaxTokenId)
      return stop("model.vocab[\"" + key_ + "\"] = " + std::to_string(v) + " is above the limit of " +
                  std::to_string(kMaxTokenId) + " for ids");
    vocab.emplace_back(std::move(key_), v);
    return true;
  }
  bool bad_vocab_entry() { return stop("model.vocab[\"" + key_ + "\"] is not an integer id"); }
  bool bad_merge() {
    return stop("model.merges[" + std::to_string(merges.size()) + "] is neither \"a b\" nor [\"a\", \"b\"]");
  }
  bool scalar(json v) {
    if (mode_ == Mode::Vocab) return bad_vocab_entry();
    if (mode_ != Mode::Dom) return bad_merge();
    put(std::move(v));
    return true;
  }
  // True when the value about to start is root.model.<name>.
  bool at_model_member(const char* name) const {
    return stack_.size() == 2 && names_[1] == "model" && stack_.back()->is_object() && key_ == name;
  }
  json* put(json v) {
    if (stack_.empty()) {
      root = std::move(v);
      return &root;
    }
    json& top = *stack_.back();
    if (top.is_array()) {
      top.push_back(std::move(v));
      return &top.back();
    }
    json& slot = top[key_];
    slot = std::move(v);
    return &slot;
  }
  bool open(json container) {
    if (stack_.size() >= size_t(kMaxJsonDepth))
      return stop("nests deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    std::string name = stack_.empty() || stack_.back()->is_array() ? std::string() : key_;
    stack_.push_back(put(std::move(container)));
    names_.resize(stack_.size());
    names_.back() = std::move(name);
    return true;
  }

  Mode mode_ = Mode::Dom;
  std::vector<json*> stack_;        // open containers of the tree
  std::vector<std::string> names_;  // the key each open container sits under ("" in arrays and at the root)
  std::string key_;
  std::vector<std::string> pair_;
};

class Loader {
 public:
  explicit Loader(std::string path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& what) const { throw Error(ErrorKind::Format, path_ + ": " + what); }

  const json& member(const json& obj, const char* key, const std::string& where) const {
    auto it = obj.find(key);
    if (it == obj.end()) fail(where + " has no \"" + key + "\"");
    return *it;
  }
  std::string string_member(const json& obj, const char* key, const std::string& where) const {
    const json& v = member(obj, key, where);
    if (!v.is_string()) fail(where + "." + key + " is not a string");
    return v.get<std::string>();
  }
  bool bool_member(const json& obj, const char* key, bool fallback, const std::string& where) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) fail(where + "." + key + " is not a boolean");
    return it->get<bool>();
  }
  int32_t id_value(const json& v, const std::string& where) const {
    if (!v.is_number_integer()) fail(where + " is not an integer id");
    auto x = v.get<int64_t>();
    if (x < 0 || x > std::numeric_limits<int32_t>::max())
      fail(where + " = " + std::to_string(x) + " is not a valid id");
    return int32_t(x);
  }
  std::string type_of(const json& obj, const std::string& where) const {
    if (!obj.is_object()) fail(where + " is not an object");
    return string_member(obj, "type", where);
  }

  void normalizer(const json& j, Tokenizer::Impl& t) const {
    if (j.is_null()) return;
    const std::string type = type_of(j, "normalizer");
    if (type == "Sequence") {
      const json& list = member(j, "normalizers", "normalizer");
      if (!list.is_array()) fail("normalizer.normalizers is not an array");
      for (const json& n : list) normalizer(n, t);
    } else if (type == "NFC") {
      t.normalizers.push_back(NormalForm::NFC);
    } else if (type == "NFD") {
      t.normalizers.push_back(NormalForm::NFD);
    } else if (type == "NFKC") {
      t.normalizers.push_back(NormalForm::NFKC);
    } else if (type == "NFKD") {
      t.normalizers.push_back(NormalForm::NFKD);
    } else {
      fail("normalizer type \"" + type + "\" is not supported (supported: NFC, NFD, NFKC, NFKD, Sequence)");
    }
  }

  void pre_tokenizer(const json& j, Tokenizer::Impl& t, bool& byte_level) const {
    if (j.is_null())
      fail("pre_tokenizer is null; only byte-level BPE tokenizers (a ByteLevel pre_tokenizer) are supported");
    const std::string type = type_of(j, "pre_tokenizer");
    if (type == "Sequence") {
      const json& list = member(j, "pretokenizers", "pre_tokenizer");
      if (!list.is_array()) fail("pre_tokenizer.pretokenizers is not an array");
      for (const json& p : list) pre_tokenizer(p, t, byte_level);
    } else if (type == "Split") {
      PreTokenizerStep step;
      const json& pattern = member(j, "pattern", "Split pre_tokenizer");
      if (!pattern.is_object()) fail("Split pre_tokenizer pattern is not an object");
      if (pattern.contains("Regex"))
        step.regex = std::make_unique<Regex>(string_member(pattern, "Regex", "Split pattern"), false, path_);
      else if (pattern.contains("String"))
        step.regex = std::make_unique<Regex>(string_member(pattern, "String", "Split pattern"), true, path_);
      else
        fail("Split pre_tokenizer pattern has neither \"Regex\" nor \"String\"");
      const std::string behavior = string_member(j, "behavior", "Split pre_tokenizer");
      if (behavior == "Isolated")
        step.behavior = SplitBehavior::Isolated;
      else if (behavior == "Removed")
        step.behavior = SplitBehavior::Removed;
      else if (behavior == "MergedWithPrevious")
        step.behavior = SplitBehavior::MergedWithPrevious;
      else if (behavior == "MergedWithNext")
        step.behavior = SplitBehavior::MergedWithNext;
      else if (behavior == "Contiguous")
        step.behavior = SplitBehavior::Contiguous;
      else
        fail("Split pre_tokenizer behavior \"" + behavior + "\" is not supported");
      step.invert = bool_member(j, "invert", false, "Split pre_tokenizer");
      t.pre_tokenizer.push_back(std::move(step));
    } else if (type == "ByteLevel") {
      PreTokenizerStep step;
      step.add_prefix_space = bool_member(j, "add_prefix_space", true, "ByteLevel pre_tokenizer");
      if (bool_member(j, "use_regex", true, "ByteLevel pre_tokenizer"))  // the GPT-2 pattern, built in
        step.regex = std::make_unique<Regex>(
            R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", false, path_);
      t.pre_tokenizer.push_back(std::move(step));
      byte_level = true;
    } else {
      fail("pre_tokenizer type \"" + type + "\" is not supported (supported: Sequence, Split, ByteLevel)");
    }
  }

  // The model's options; its vocab and merges arrive separately, streamed by TokenizerJsonReader.
  void model_options(const json& j, Tokenizer::Impl& t) const {
    const std::string type = type_of(j, "model");
    if (type != "BPE") fail("model type \"" + type + "\" is not supported (only BPE)");
    if (auto it = j.find("dropout"); it != j.end() && !it->is_null() && !(it->is_number() && it->get<double>() == 0.0))
      fail("model.dropout is set; BPE dropout (a training-time randomisation) is not supported");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      auto it = j.find(key);
      if (it != j.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty()))
        fail(std::string("model.") + key + " is set; only byte-level BPE without affixes is supported");
    }
    t.ignore_merges = bool_member(j, "ignore_merges", false, "model");
    if (!member(j, "vocab", "model").is_object()) fail("model.vocab is not an object");
    if (!member(j, "merges", "model").is_array()) fail("model.merges is not an array");
  }

  void added_tokens(const json& j, Tokenizer::Impl& t) const {
    if (j.is_null()) return;
    if (!j.is_array()) fail("added_tokens is not an array");
    t.added.reserve(j.size());
    for (size_t i = 0; i < j.size(); ++i) {
      const std::string where = "added_tokens[" + std::to_string(i) + "]";
      const json& a = j[i];
      if (!a.is_object()) fail(where + " is not an object");
      AddedToken tok;
      tok.content = string_member(a, "content", where);
      if (tok.content.empty()) continue;  // the reference ignores these too
      tok.id = id_value(member(a, "id", where), where + ".id");
      tok.single_word = bool_member(a, "single_word", false, where);
      tok.lstrip = bool_member(a, "lstrip", false, where);
      tok.rstrip = bool_member(a, "rstrip", false, where);
      tok.special = bool_member(a, "special", false, where);
      tok.normalized = bool_member(a, "normalized", !tok.special, where);
      t.added.push_back(std::move(tok));
    }
  }

  // Fills the id -> token table and its index from model.vocab.
  void model_vocab(std::vector<std::pair<std::string, int64_t>>& vocab, Tokenizer::Impl& t) const {
    int64_t max_id = -1;
    for (const auto& v : vocab) max_id = std::max(max_id, v.second);
    t.id_to_token.assign(size_t(max_id + 1), std::string());
    std::vector<uint8_t> used(size_t(max_id + 1), 0);
    std::vector<int32_t> model_ids;
    model_ids.reserve(vocab.size());
    for (auto& [token, id64] : vocab) {
      const auto id = size_t(id64);
      if (used[id])
        fail("model.vocab gives id " + std::to_string(id) + " to both \"" + t.id_to_token[id] + "\" and \"" + token +
             "\"");
      t.id_to_token[id] = std::move(token);
      used[id] = 1;
      model_ids.push_back(int32_t(id));
    }
    t.vocab.build(t.id_to_token, model_ids);
    t.model_vocab_size = model_ids.size();
    t.id_used = std::move(used);
  }

  // Gives each added token its id the way the reference does when it reads the file: a token already in
  // the vocabulary keeps that id, a new one takes the next id after the vocabulary and the previous added
  // tokens. The declared "id" is only checked: a file whose ids disagree is tokenized as the reference
  // tokenizes it, with the same warning.
  void assign_added_ids(Tokenizer::Impl& t) const {
    std::vector<AddedToken> kept;
    int64_t max_added = -1;
    for (AddedToken& a : t.added) {
      const bool duplicate = std::any_of(kept.begin(), kept.end(), [&](const AddedToken& k) { return k == a; });
      if (duplicate) continue;
      int64_t id = -1;
      if (auto it = t.added_ids.find(a.content); it != t.added_ids.end())
        id = it->second;
      else if (int32_t v = t.vocab.find(a.content); v >= 0)
        id = v;
      else if (max_added < 0)
        id = int64_t(t.model_vocab_size);
      else
        id = max_added >= int64_t(t.model_vocab_size) || t.model_vocab_size == 0 ? max_added + 1
                                                                                 : int64_t(t.model_vocab_size);
      if (id > std::numeric_limits<int32_t>::max()) fail("too many added tokens");
      if (id != a.id)
        log_warn(path_ + ": added token \"" + a.content + "\" declares id " + std::to_string(a.id) + " but gets id " +
                 std::to_string(id) + " (as in the reference tokenizer)");
      a.id = int32_t(id);
      t.added_ids[a.content] = a.id;
      max_added = std::max(max_added, id);
      // A later entry with the same content replaces the earlier one.
      kept.erase(std::remove_if(kept.begin(), kept.end(), [&](const AddedToken& k) { return k.content == a.content; }),
                 kept.end());
      kept.push_back(a);
    }
    t.added = std::move(kept);
  }

  void byte_tokens(Tokenizer::Impl& t) const {  // BPE starts from one token per byte: all 256 must exist
    const ByteAlphabet& alphabet = byte_alphabet();
    for (int b = 0; b < 256; ++b) {
      std::string ch;
      append_utf8(ch, alphabet.byte_to_cp[size_t(b)]);
      int32_t id = t.vocab.find(ch);
      if (id < 0)
        fail("model.vocab lacks the byte-level token \"" + ch + "\" for byte " + std::to_string(b) +
             "; not a byte-level BPE vocabulary");
      t.byte_id[size_t(b)] = id;
    }
  }

  void merge_table(const std::vector<MergeSpec>& merges, Tokenizer::Impl& t) const {
    t.merges.reserve(merges.size());
    std::string joined;
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const MergeSpec& m = merges[rank];
      joined.assign(m.left).append(m.right);
      const int32_t l = t.vocab.find(m.left), r = t.vocab.find(m.right), merged = t.vocab.find(joined);
      if (l < 0 || r < 0 || merged < 0)
        fail("model.merges[" + std::to_string(rank) + "] (\"" + m.left + "\", \"" + m.right +
             "\") uses a token missing from model.vocab");
      t.merges.insert(l, r, {int32_t(rank), merged});
    }
  }

 private:
  std::string path_;
};

}  // namespace

Tokenizer Tokenizer::load(const std::string& tokenizer_dir_or_json) {
  fs::path json_path = tokenizer_dir_or_json;
  std::error_code ec;
  if (fs::is_directory(json_path, ec)) json_path /= "tokenizer.json";
  if (!fs::exists(json_path, ec)) throw Error(ErrorKind::NotFound, json_path.string() + ": tokenizer file not found");
  const fs::path config_path = json_path.parent_path() / "tokenizer_config.json";
  const bool has_config = fs::exists(config_path, ec);
  return from_json(read_file(json_path), json_path.string(), has_config ? read_file(config_path) : std::string(),
                   config_path.string());
}

Tokenizer Tokenizer::from_json(std::string_view tokenizer_json, const std::string& source, std::string_view config_json,
                               const std::string& config_source) {
  const std::string& path = source;
  auto impl = std::make_shared<Impl>();
  impl->path = path;
  Loader load(path);

  TokenizerJsonReader reader;
  if (!json::sax_parse(tokenizer_json.begin(), tokenizer_json.end(), &reader))
    load.fail(reader.error.empty() ? "not valid JSON" : reader.error);
  const json& j = reader.root;
  if (!j.is_object()) load.fail("not a JSON object");

  load.normalizer(j.value("normalizer", json()), *impl);
  bool byte_level = false;
  load.pre_tokenizer(j.value("pre_tokenizer", json()), *impl, byte_level);
  if (!byte_level) load.fail("pre_tokenizer has no ByteLevel step; only byte-level BPE tokenizers are supported");
  load.model_options(load.member(j, "model", "tokenizer.json"), *impl);
  load.model_vocab(reader.vocab, *impl);
  load.byte_tokens(*impl);
  load.added_tokens(j.value("added_tokens", json()), *impl);
  load.assign_added_ids(*impl);
  load.merge_table(reader.merges, *impl);

  // The decoder must undo the byte alphabet; a ByteLevel post_processor only adjusts offsets. Anything
  // else (a template adding BOS/EOS, another decoder) would change ids or text in ways not implemented here.
  if (const json d = j.value("decoder", json()); !d.is_null()) {
    const std::string type = load.type_of(d, "decoder");
    if (type != "ByteLevel") load.fail("decoder type \"" + type + "\" is not supported (only ByteLevel)");
  }
  if (const json p = j.value("post_processor", json()); !p.is_null()) {
    const std::string type = load.type_of(p, "post_processor");
    if (type != "ByteLevel") load.fail("post_processor type \"" + type + "\" is not supported (only ByteLevel)");
  }
  // "truncation" and "padding" are ignored on purpose: transformers overrides them per call, as
  // tokenize_prompts does.

  for (AddedToken& a : impl->added) {
    if (a.normalized) {
      a.content = impl->normalize(a.content);  // matched against normalized text, so normalize it too
      impl->normalized_added.add(&a);
    } else {
      impl->raw_added.add(&a);
    }
  }

  // Decoded bytes per id, as the reference's ByteLevel decoder does: a token spelled entirely in the byte
  // alphabet becomes those bytes; any other token (e.g. a special token with a space) is taken verbatim.
  // An added token's content takes precedence over a model token with the same id.
  const ByteAlphabet& alphabet = byte_alphabet();
  auto decoded = [&](const std::string& tok) {
    auto bytes = alphabet.decode(tok);
    return bytes ? std::move(*bytes) : tok;
  };
  size_t n_ids = impl->id_to_token.size();
  for (const AddedToken& a : impl->added) n_ids = std::max(n_ids, size_t(a.id) + 1);
  impl->id_to_bytes.assign(n_ids, std::string());
  impl->id_used.resize(n_ids, 0);
  for (size_t id = 0; id < impl->id_to_token.size(); ++id)
    if (impl->id_used[id]) impl->id_to_bytes[id] = decoded(impl->id_to_token[id]);
  for (const auto& [content, id] : impl->added_ids) {
    impl->id_to_bytes[size_t(id)] = decoded(content);
    impl->id_used[size_t(id)] = 1;
  }

  // Pad token: tokenizer_config.json's pad_token (a string or an AddedToken object), else the Qwen2 default.
  bool pad_declared = false;
  if (!config_json.empty()) {
    const std::string& cpath = config_source;
    json c = parse_untrusted_json(config_json, cpath);
    if (!c.is_object()) throw Error(ErrorKind::Format, cpath + ": not a JSON object");
    if (auto it = c.find("pad_token"); it != c.end()) {
      pad_declared = true;
      std::optional<std::string> name;
      if (it->is_string())
        name = it->get<std::string>();
      else if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
        name = (*it)["content"].get<std::string>();
      else if (!it->is_null())
        throw Error(ErrorKind::Format, cpath + ": pad_token is neither a string, a token object nor null");
      if (name) {
        auto a = impl->added_ids.find(*name);
        if (a != impl->added_ids.end())
          impl->pad = a->second;
        else if (int32_t v = impl->vocab.find(*name); v >= 0)
          impl->pad = v;
        else
          throw Error(ErrorKind::Format, cpath + ": pad_token \"" + *name + "\" is not in " + path);
      }
    }
  }
  if (!pad_declared) {
    if (auto a = impl->added_ids.find("<|endoftext|>"); a != impl->added_ids.end()) impl->pad = a->second;
  }
  return Tokenizer(std::move(impl));
}

// ---------------------------------------------------------------------------------------------------
// Encoding, decoding
// ---------------------------------------------------------------------------------------------------

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  const Impl& t = *impl_;
  std::string replaced;
  if (replace_invalid_utf8(text, replaced)) text = replaced;

  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 8);
  // Match state is per thread and kept between calls: creating it (a JIT stack mapping) costs more than
  // encoding a short prompt.
  thread_local MatchScratch scratch;
  std::vector<std::vector<Span>> spans(t.pre_tokenizer.size());
  const std::function<void(std::string_view)> to_bpe = [&](std::string_view word) { t.bpe(word, ids); };
  auto on_token = [&](int32_t id) { ids.push_back(id); };
  auto on_normalized = [&](std::string_view piece) { t.pre_tokenize(0, piece, scratch, spans, to_bpe); };

  t.raw_added.split(
      text,
      [&](std::string_view piece) {
        if (t.normalizers.empty()) {
          t.normalized_added.split(piece, on_normalized, on_token);
        } else {
          const std::string normalized = t.normalize(piece);
          t.normalized_added.split(normalized, on_normalized, on_token);
        }
      },
      on_token);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const Impl& t = *impl_;
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || size_t(id) >= t.id_used.size() || !t.id_used[size_t(id)])
      throw Error(ErrorKind::InvalidArgument,
                  "tokenizer: id " + std::to_string(id) + " is not in the vocabulary of " + t.path);
    bytes += t.id_to_bytes[size_t(id)];
  }
  std::string out;
  return replace_invalid_utf8(bytes, out) ? out : bytes;
}

int32_t Tokenizer::pad_id() const {
  if (impl_->pad < 0) throw Error(ErrorKind::NotFound, impl_->path + ": no pad token is declared");
  return impl_->pad;
}

int32_t Tokenizer::token_id(std::string_view token) const {
  if (auto a = impl_->added_ids.find(token); a != impl_->added_ids.end()) return a->second;
  if (int32_t id = impl_->vocab.find(token); id >= 0) return id;
  throw Error(ErrorKind::NotFound, impl_->path + ": no token \"" + std::string(token) + "\"");
}

size_t Tokenizer::vocab_size() const {
  size_t n = 0;
  for (uint8_t used : impl_->id_used) n += used;
  return n;
}

const std::string& Tokenizer::source() const { return impl_->path; }

// ---------------------------------------------------------------------------------------------------
// Z-Image prompts
// ---------------------------------------------------------------------------------------------------

std::string zimage_chat_template(std::string_view prompt) {
  std::string out;
  out.reserve(prompt.size() + 64);
  out += "<|im_start|>user\n";
  out += prompt;
  out += "<|im_end|>\n<|im_start|>assistant\n";
  return out;
}

void check_prompt(std::string_view prompt, const std::string& what) {
  if (prompt.size() > kMaxPromptBytes)
    throw Error(ErrorKind::InvalidArgument, what + " is " + std::to_string(prompt.size()) +
                                                " bytes, above the limit of " + std::to_string(kMaxPromptBytes) +
                                                " bytes (the text encoder reads at most a few thousand tokens)");
  if (prompt.find('\0') != std::string_view::npos)
    throw Error(ErrorKind::InvalidArgument, what + " contains a NUL character");
}

TokenizedBatch tokenize_prompts(const Tokenizer& tokenizer, const std::vector<std::string>& prompts, int64_t max_len) {
  if (max_len < 1)
    throw Error(ErrorKind::InvalidArgument, "max_sequence_length must be at least 1, got " + std::to_string(max_len));
  for (const std::string& p : prompts) check_prompt(p, "prompt");
  const auto batch = int64_t(prompts.size());
  const int64_t pad = tokenizer.pad_id();
  TokenizedBatch out;
  out.input_ids = Tensor::zeros({batch, max_len}, DType::I64);
  out.attention_mask = Tensor::zeros({batch, max_len}, DType::I64);
  int64_t* ids = out.input_ids.data_as<int64_t>();
  int64_t* mask = out.attention_mask.data_as<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const std::vector<int32_t> tokens = tokenizer.encode(zimage_chat_template(prompts[size_t(b)]));
    const int64_t n = std::min<int64_t>(int64_t(tokens.size()), max_len);
    int64_t* row = ids + b * max_len;
    int64_t* mrow = mask + b * max_len;
    for (int64_t i = 0; i < max_len; ++i) {
      row[i] = i < n ? tokens[size_t(i)] : pad;
      mrow[i] = i < n ? 1 : 0;
    }
    out.lengths.push_back(n);
    out.truncated.push_back(int64_t(tokens.size()) > max_len);
  }
  return out;
}

}  // namespace zimage
