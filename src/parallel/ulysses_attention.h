// Ulysses attention: softmax attention over a sequence whose image tokens are split over the U ranks
// of a communicator (parallel/sequence_parallel_plan.h), each rank attending H/U of the H heads over
// all tokens, equal to the one-GPU attention of the DiT (model/zimage_dit.cpp).
//
// Each rank holds per item [L image rows | R replicated rows] of packed qkv [n, L + R, 3*H*d]: its
// image shard followed by pad tokens (L = the plan's local_len), then rows that are the same on every
// rank (the caption in the unified layers, R = 0 in the noise refiner). With w = (H/U)*d, G = H/U:
//   1. all-to-all: [U][n, L, 3][w] sends head group j of this rank's image rows to rank j, and receives
//      this rank's head group g = rank of every rank's image rows;
//   2. the replicated rows need no exchange: their head group g is sliced locally;
//   3. attention with G heads over, per item, the one-GPU order of the tokens: the N real image tokens
//      in row-major grid order, P = round_up(N, 32) - N pad tokens, then the R replicated rows, with key
//      length N + P + replicated_len[i];
//   4. all-to-all back: each rank gets head group s of its image rows from rank s; all-gather of the
//      replicated rows' head groups; then [n, L + R, U, w] = [n, L + R, H*d].
// Why it is exact: one GPU attends exactly P pad tokens, all equal (same x_pad_token, same position
// (0,0,0), so the same q, k, v in every layer), and pad tokens are keys like any other (Z-Image does not
// mask them). Here U*L - N >= P pad tokens exist; the first P of them (in rank order) are attended, and
// the surplus U*L - N - P are left out of the sequence: they never reach a real token, their attention
// output is zero, and the final gather crops them. Attending all U*L - N of them, as SGLang does, changes
// every softmax whenever U*L != round_up(N, 32) (e.g. 1024^2 on 3 GPUs: 128 pad tokens instead of 0).
// The real tokens are placed in one-GPU order so that the sums run in the same order too.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "parallel/communicator.h"
#include "parallel/sequence_parallel_plan.h"

namespace zimage {

// The row maps of one layout (host, built once per request shape). Rows are of width w unless said.
struct UlyssesLayout {
  int degree = 1, rank = 0;
  int64_t items = 0, local_len = 0, replicated = 0;  // n, L, R
  int64_t seq = 0;                                   // T = N + P + R rows per item in the attention
  std::vector<int> key_len;                          // per item: N + P + replicated_len[i]
  std::vector<int32_t> send_idx;                     // [U, n, L, 3] <- qkv rows [n, L + R, 3, U]
  std::vector<int32_t> replica_idx;      // [n, R, 3] <- qkv rows: this rank's head group of the replicated rows
  std::vector<int32_t> attn_idx;         // [n, T] (rows of 3w) <- [received (U, n, L) | replicated (n, R)]
  std::vector<int32_t> back_idx;         // [U, n, L] <- attention output [n, T]; -1 (zero) for surplus pads
  std::vector<int32_t> replica_out_idx;  // [n, R] <- attention output [n, T]
  std::vector<int32_t> out_idx;          // [n, L + R, U] <- [received back (U, n, L) | gathered (U, n, R)]
};

// Packed qkv [n, L + Rp, 3*U*w] seen as rows of width w: row ((i*S + k)*3 + p)*U + j is head group j of
// part p (q, k, v) of row k of item i (S = L + Rp). The rows an all-to-all sends, [U (head group), n, L, 3],
// and head group `group` of the replicated rows, [n, Rp, 3]: shared by Ulysses and Ulysses x ring.
std::vector<int32_t> head_group_send_rows(int64_t U, int64_t n, int64_t L, int64_t Rp);
std::vector<int32_t> replicated_head_group_rows(int64_t U, int64_t n, int64_t L, int64_t Rp, int64_t group);

// replicated_len[i] <= replicated: the attended replicated rows of item i (the rest are masked keys).
UlyssesLayout ulysses_layout(const SequenceParallelPlan& plan, int rank, int64_t items, int64_t replicated,
                             const std::vector<int64_t>& replicated_len);

// qkv [n, L + R, 3*heads*head_dim] (q heads, k heads, v heads) -> [n, L + R, heads*head_dim].
Tensor ulysses_attention(Backend& be, Communicator& comm, const UlyssesLayout& layout, const Tensor& qkv, int heads,
                         int head_dim, float scale);

}  // namespace zimage
