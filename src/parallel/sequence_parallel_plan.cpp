#include "parallel/sequence_parallel_plan.h"

#include <algorithm>
#include <tuple>

#include "core/error.h"

namespace zimage {

namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct AxisOption {
  ShardAxis axis;
  int64_t along = 0, other = 0;  // patches along the sharded axis and along the other
  std::vector<int64_t> sizes;
  int64_t local_len = 0, total_padding = 0;
};

AxisOption option(ShardAxis axis, int64_t along, int64_t other, int degree) {
  AxisOption o{axis, along, other, {}, 0, 0};
  int64_t max_tokens = 0;
  for (int r = 0; r < degree; ++r) {
    o.sizes.push_back(along / degree + (r < along % degree ? 1 : 0));
    max_tokens = std::max(max_tokens, o.sizes.back() * other);
  }
  o.local_len = round_up(max_tokens, SequenceParallelPlan::kSeqMultiple);
  o.total_padding = degree * o.local_len - along * other;
  return o;
}

}  // namespace

std::string valid_ulysses_degrees(int64_t heads) {
  std::string s;
  for (int64_t d = 1; d <= heads; ++d)
    if (heads % d == 0) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return "use one of " + s;
}

SequenceParallelPlan plan_sequence_parallel(int64_t grid_h, int64_t grid_w, int ulysses, int64_t heads, int ring) {
  ZI_CHECK(ulysses >= 1, ErrorKind::InvalidArgument,
           "the Ulysses degree must be at least 1, got " + std::to_string(ulysses));
  ZI_CHECK(ring >= 1, ErrorKind::InvalidArgument, "the ring degree must be at least 1, got " + std::to_string(ring));
  ZI_ASSERT(grid_h >= 1 && grid_w >= 1 && heads >= 1);
  ZI_CHECK(heads % ulysses == 0, ErrorKind::InvalidArgument,
           "Ulysses degree " + std::to_string(ulysses) + " does not divide the model's " + std::to_string(heads) +
               " attention heads: each GPU attends heads / degree of them (" + valid_ulysses_degrees(heads) + ")");
  const int degree = ulysses * ring;
  ZI_CHECK(std::max(grid_h, grid_w) >= degree, ErrorKind::InvalidArgument,
           "an image of " + std::to_string(grid_h) + "x" + std::to_string(grid_w) +
               " patches is too small to split over " + std::to_string(degree) +
               " GPUs (each needs at least one patch row or column)");

  // Fewer pad tokens wins; then the longer axis; then H (an axis with fewer patches than ranks cannot
  // give every rank a band).
  std::vector<AxisOption> options;
  if (grid_h >= degree) options.push_back(option(ShardAxis::H, grid_h, grid_w, degree));
  if (grid_w >= degree) options.push_back(option(ShardAxis::W, grid_w, grid_h, degree));
  const AxisOption& best = *std::min_element(options.begin(), options.end(), [](const auto& a, const auto& b) {
    return std::make_tuple(a.total_padding, -a.along, int(a.axis)) <
           std::make_tuple(b.total_padding, -b.along, int(b.axis));
  });

  SequenceParallelPlan p;
  p.grid_h = grid_h;
  p.grid_w = grid_w;
  p.degree = degree;
  p.ulysses = ulysses;
  p.ring = ring;
  p.heads = heads;
  p.axis = best.axis;
  p.image_tokens = grid_h * grid_w;
  p.local_len = best.local_len;
  p.total_padding = best.total_padding;
  p.attended_padding = round_up(p.image_tokens, SequenceParallelPlan::kSeqMultiple) - p.image_tokens;
  int64_t offset = 0;
  for (int r = 0; r < degree; ++r) {
    RankShard s;
    s.offset = offset;
    s.size = best.sizes[size_t(r)];
    s.tokens = s.size * best.other;
    s.padding = p.local_len - s.tokens;
    bool h = best.axis == ShardAxis::H;
    s.h0 = h ? offset : 0;
    s.w0 = h ? 0 : offset;
    s.h_len = h ? s.size : grid_h;
    s.w_len = h ? grid_w : s.size;
    p.ranks.push_back(s);
    offset += s.size;
  }
  return p;
}

int64_t SequenceParallelPlan::global_token(int r, int64_t k) const {
  const RankShard& s = ranks[size_t(r)];
  ZI_ASSERT(k >= 0 && k < s.tokens);
  return (s.h0 + k / s.w_len) * grid_w + s.w0 + k % s.w_len;
}

std::vector<std::pair<int, int64_t>> SequenceParallelPlan::token_owners() const {
  std::vector<std::pair<int, int64_t>> owners(static_cast<size_t>(image_tokens));
  for (int r = 0; r < degree; ++r)
    for (int64_t k = 0; k < ranks[size_t(r)].tokens; ++k) owners[size_t(global_token(r, k))] = {r, k};
  return owners;
}

}  // namespace zimage
