// How one image's tokens are split over the U x R sequence-parallel ranks of Ulysses (U) x ring (R)
// attention: a pure function of the patch grid, U, R and the head count, computed on the host once per
// request shape. The shards below are U R bands (the definitions write U for their count); shard s is
// member s % U of Ulysses group s / U.
//
// Z-Image patchifies a latent [C, 1, h, w] in native (F, H, W) order: token (i, j) of the
// (h/2) x (w/2) patch grid is row i*grid_w + j with RoPE position (F, i, j). Each rank therefore owns a
// contiguous band of native patch rows (axis H) or patch columns (axis W), keeps those tokens'
// native positions, and no rank ever sees fake rows: the H/W swap and the padded latent rows of
// SGLang before PR 21042 are what corrupted 720x1280 and 720x720.
//
// Definitions (N = grid_h * grid_w image tokens, A = patches along the sharded axis, O = along the other):
// - Shard sizes: A split into U bands, the first A % U ranks one row/column longer; rank r owns
//   [offset_r, offset_r + size_r) and tokens_r = size_r * O tokens, in row-major order over its band.
// - Aligned per-rank length L = round_up(max_r tokens_r, 32): every rank holds exactly L image rows
//   (its tokens, then pad tokens), so each all-to-all chunk has the same size on every rank. 32 is the
//   DiT's sequence multiple (SEQ_MULTI_OF): a rank's image sequence is padded as one GPU pads the whole
//   image, which is also SGLang's definition (img_seq_target) after PR 21042. It guarantees that the U*L
//   gathered rows hold at least the P = round_up(N, 32) - N pad tokens one GPU attends (U*L is a multiple
//   of 32 and >= N), which exactness needs (see ulysses_attention.h).
// - Padding: U*L - N pad tokens in all; rank r holds L - tokens_r of them.
// - Axis: the one whose U*L - N is smaller; ties go to the longer axis, then to H.
// - Crop: rank r's first tokens_r rows are real; the gathered output keeps exactly those.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace zimage {

enum class ShardAxis { H, W };

struct RankShard {
  int64_t offset = 0, size = 0;  // patch rows (axis H) or columns (axis W) [offset, offset + size)
  int64_t tokens = 0;            // real tokens: size * patches along the other axis
  int64_t padding = 0;           // pad tokens after them: local_len - tokens
  // RoPE: the rank's tokens are the grid block rows [h0, h0 + h_len) x columns [w0, w0 + w_len), in
  // row-major order, with positions (F, h0 + i, w0 + j).
  int64_t h0 = 0, w0 = 0, h_len = 0, w_len = 0;
};

struct SequenceParallelPlan {
  static constexpr int64_t kSeqMultiple = 32;  // the DiT's SEQ_MULTI_OF
  int64_t grid_h = 0, grid_w = 0;              // patches along native H and W
  int degree = 1;                              // shards: ulysses * ring
  int ulysses = 1, ring = 1;                   // U and R
  int64_t heads = 0;                           // attention heads; each rank attends heads / U of them
  ShardAxis axis = ShardAxis::H;
  int64_t image_tokens = 0;      // N
  int64_t local_len = 0;         // L, the aligned per-rank length
  int64_t total_padding = 0;     // U * L - N
  int64_t attended_padding = 0;  // P = round_up(N, 32) - N: the pad tokens one GPU attends
  std::vector<RankShard> ranks;

  // Row of rank r's local token k (< ranks[r].tokens) in the one-GPU row-major token order.
  int64_t global_token(int r, int64_t k) const;
  // Every global token's (rank, local row), in global order.
  std::vector<std::pair<int, int64_t>> token_owners() const;
};

// Throws InvalidArgument with a message for the user when U or R < 1, when U does not divide `heads`, or
// when neither axis has at least U R patches.
SequenceParallelPlan plan_sequence_parallel(int64_t grid_h, int64_t grid_w, int ulysses, int64_t heads, int ring = 1);

// "use one of 1, 2, 3, 5, 6, 10, 15, 30": the degrees that divide `heads`.
std::string valid_ulysses_degrees(int64_t heads);

}  // namespace zimage
