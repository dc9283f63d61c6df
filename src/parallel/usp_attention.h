// Ulysses x ring attention (USP): softmax attention over a sequence whose image tokens are split into
// U x R shards (parallel/sequence_parallel_plan.h), equal to the one-GPU attention of the DiT. Z-Image has
// 30 heads, so Ulysses alone (ulysses_attention.h) splits an image over 2, 3, 5 or 6 GPUs only; a ring of
// R Ulysses groups covers 4 and 8.
//
// Rank (u, r) holds shard s = r*U + u: per item [L image rows | Rp replicated rows] of packed qkv, as in
// ulysses_attention.h. With w = (H/U)*d:
//   1. all-to-all within Ulysses group r (as Ulysses): this rank gets head group u of the image rows of
//      shards rU .. rU+U-1, its ring block of B = U*L rows, and slices head group u of the replicated rows;
//   2. the block's rows are ordered valid keys first: real tokens and the attended pad tokens (the first P
//      pad rows in shard order, exactly the pads one GPU attends: ulysses_attention.h says why), then the
//      surplus pads (queries whose output is cropped, never keys);
//   3. queries [block | replicated rows] attend R + 1 key blocks: the R ring blocks, passed around the ring
//      (R - 1 ring_shift steps, one block in flight), each with its valid key count, and the replicated
//      rows (keys [0, replicated_len[i]), local on every rank); every partial comes with its log-sum-exp
//      (Backend::attention_with_lse) and they are merged in block order 0, ..., R-1, replicated
//      (Backend::merge_attention_), the same order on every rank, so the replicated rows stay bit-identical
//      across the ring;
//   4. back as Ulysses: all-to-all of the image rows' head groups, all-gather of the replicated rows'.
// The merged softmax sums the same terms as one GPU in another order (float32: ~1e-7 relative).
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "parallel/communicator.h"
#include "parallel/sequence_parallel_plan.h"

namespace zimage {

struct UspLayout {
  int ulysses = 1, ring = 1, u = 0, r = 0;  // U, R, and this rank's place: member u of group r, of ring u
  int64_t items = 0, local_len = 0, replicated = 0, block = 0;  // n, L, Rp, B = U*L
  std::vector<int> block_keys;         // per ring block: its valid keys (every item alike)
  std::vector<int> replicated_keys;    // per item: replicated_len[i]
  std::vector<int32_t> send_idx;       // [U, n, L, 3] <- qkv rows [n, L + Rp, 3, U] (rows of width w)
  std::vector<int32_t> replica_idx;    // [n, Rp, 3] <- qkv rows: this rank's head group of the replicated rows
  std::vector<int32_t> query_idx;      // [n, B + Rp] (rows of 3w) <- [received (U, n, L) | replicated (n, Rp)]
  std::vector<int32_t> block_idx;      // [n, B] <- the same source: this rank's ring block, valid keys first
  std::vector<int32_t> replica_kv_idx;  // [n, Rp] <- the same source: the replicated keys
  std::vector<int32_t> back_idx;       // [U, n, L] <- merged output [n, B + Rp]
  std::vector<int32_t> replica_out_idx;  // [n, Rp] <- merged output [n, B + Rp]
  std::vector<int32_t> out_idx;        // [n, L + Rp, U] <- [received back (U, n, L) | gathered (U, n, Rp)]
};

// `plan` of U*R shards; shard = r*U + u. replicated_len[i] <= replicated.
UspLayout usp_layout(const SequenceParallelPlan& plan, int shard, int64_t items, int64_t replicated,
                     const std::vector<int64_t>& replicated_len);

// qkv [n, L + Rp, 3*heads*head_dim] -> [n, L + Rp, heads*head_dim]. `ulysses` may be null when U = 1.
Tensor usp_attention(Backend& be, Communicator* ulysses, Communicator& ring, const UspLayout& layout, const Tensor& qkv,
                     int heads, int head_dim, float scale);

}  // namespace zimage
