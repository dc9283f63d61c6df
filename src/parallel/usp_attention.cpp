#include "parallel/usp_attention.h"

#include "core/error.h"
#include "parallel/ulysses_attention.h"

namespace zimage {

UspLayout usp_layout(const SequenceParallelPlan& plan, int shard, int64_t items, int64_t replicated,
                     const std::vector<int64_t>& replicated_len) {
  ZI_ASSERT(shard >= 0 && shard < plan.degree && plan.degree == plan.ulysses * plan.ring &&
            int64_t(replicated_len.size()) == items);
  UspLayout l;
  const int64_t U = plan.ulysses, R = plan.ring, n = items, L = plan.local_len, Rp = replicated, S = L + Rp;
  const int64_t B = U * L, Q = B + Rp;
  l.ulysses = plan.ulysses;
  l.ring = plan.ring;
  l.u = shard % plan.ulysses;
  l.r = shard / plan.ulysses;
  l.items = n;
  l.local_len = L;
  l.replicated = Rp;
  l.block = B;

  // Which shard rows are keys: real tokens, and the first P pad rows in shard order.
  std::vector<char> valid(size_t(plan.degree * L), 0);
  int64_t pads = 0;
  for (int s = 0; s < plan.degree; ++s)
    for (int64_t k = 0; k < L; ++k) {
      const bool real = k < plan.ranks[size_t(s)].tokens;
      valid[size_t(s * L + k)] = real || pads < plan.attended_padding;
      if (!real && pads < plan.attended_padding) ++pads;
    }
  ZI_ASSERT(pads == plan.attended_padding);
  // Block order of ring block q: its (member, row) pairs, valid ones first.
  auto block_order = [&](int64_t q) {
    std::vector<std::pair<int64_t, int64_t>> order;
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t s = 0; s < U; ++s)
        for (int64_t k = 0; k < L; ++k)
          if (bool(valid[size_t((q * U + s) * L + k)]) == (pass == 0)) order.emplace_back(s, k);
    return order;
  };
  for (int64_t q = 0; q < R; ++q) {
    int keys = 0;
    for (int64_t sk = 0; sk < B; ++sk) keys += valid[size_t(q * B + sk)];
    l.block_keys.push_back(keys);
  }
  for (int64_t len : replicated_len) {
    ZI_ASSERT(len <= Rp);
    l.replicated_keys.push_back(int(len));
  }

  l.send_idx = head_group_send_rows(U, n, L, Rp);
  l.replica_idx = replicated_head_group_rows(U, n, L, Rp, l.u);

  // Source rows of width 3w: received (s, i, k) at (s*n + i)*L + k, then replicated (i, c) at U*n*L + i*Rp + c.
  const auto mine = block_order(l.r);
  std::vector<int64_t> position(static_cast<size_t>(B));  // member s's row k -> its place in this rank's block
  for (size_t p = 0; p < mine.size(); ++p) position[size_t(mine[p].first * L + mine[p].second)] = int64_t(p);
  for (int64_t i = 0; i < n; ++i) {
    for (const auto& [s, k] : mine) {
      l.query_idx.push_back(int32_t((s * n + i) * L + k));
      l.block_idx.push_back(int32_t((s * n + i) * L + k));
    }
    for (int64_t c = 0; c < Rp; ++c) {
      l.query_idx.push_back(int32_t(U * n * L + i * Rp + c));
      l.replica_kv_idx.push_back(int32_t(U * n * L + i * Rp + c));
    }
  }
  for (int64_t j = 0; j < U; ++j)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < L; ++k) l.back_idx.push_back(int32_t(i * Q + position[size_t(j * L + k)]));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < Rp; ++c) l.replica_out_idx.push_back(int32_t(i * Q + B + c));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < S; ++k)
      for (int64_t s = 0; s < U; ++s)
        l.out_idx.push_back(int32_t(k < L ? (s * n + i) * L + k : U * n * L + (s * n + i) * Rp + (k - L)));
  return l;
}

Tensor usp_attention(Backend& be, Communicator* ulysses, Communicator& ring, const UspLayout& l, const Tensor& qkv,
                     int heads, int head_dim, float scale) {
  const int64_t U = l.ulysses, R = l.ring, n = l.items, L = l.local_len, Rp = l.replicated, S = L + Rp, B = l.block;
  ZI_ASSERT(ring.size() == R && ring.rank() == l.r && heads % U == 0);
  ZI_ASSERT(ulysses ? ulysses->size() == U && ulysses->rank() == l.u : U == 1);
  const int g = heads / int(U);
  const int64_t w = int64_t(g) * head_dim;
  ZI_ASSERT(qkv.ndim() == 3 && qkv.dim(0) == n && qkv.dim(1) == S && qkv.dim(2) == 3 * U * w);
  const Tensor rows = qkv.reshape({n * S * 3 * U, w});

  // 1. This rank's head group of its ring block's image rows (and of the replicated rows).
  Tensor send = be.gather_rows(rows, l.send_idx).reshape({U, n * L * 3 * w});
  Tensor recv = send;
  if (ulysses) {
    recv = be.empty(send.shape(), send.dtype());
    ulysses->all_to_all(send, recv);
  }
  Tensor src = recv.reshape({U * n * L, 3 * w});
  if (Rp > 0) src = be.concat_rows(src, be.gather_rows(rows, l.replica_idx).reshape({n * Rp, 3 * w}));

  // 2-3. The queries against every ring block as it comes by, then against the replicated keys.
  const Tensor queries = be.gather_rows(src, l.query_idx).reshape({n, B + Rp, 3 * w});
  Tensor block = be.gather_rows(src, l.block_idx).reshape({n, B, 3 * w});
  std::vector<Tensor> outs(static_cast<size_t>(R)), lses(static_cast<size_t>(R));
  for (int64_t step = 0; step < R; ++step) {
    const int64_t q = (l.r - step + R) % R;  // the ring block in hand
    outs[size_t(q)] = be.attention_with_lse(queries, block, g, head_dim, scale,
                                            std::vector<int>(size_t(n), l.block_keys[size_t(q)]), lses[size_t(q)]);
    if (step + 1 < R) {
      Tensor next = be.empty(block.shape(), block.dtype());
      ring.ring_shift(block, next);
      block = next;
    }
  }
  Tensor out = outs[0], lse = lses[0];
  for (int64_t q = 1; q < R; ++q) be.merge_attention_(out, lse, outs[size_t(q)], lses[size_t(q)]);
  if (Rp > 0) {
    const Tensor keys = be.gather_rows(src, l.replica_kv_idx).reshape({n, Rp, 3 * w});
    Tensor rep_lse;
    const Tensor rep = be.attention_with_lse(queries, keys, g, head_dim, scale, l.replicated_keys, rep_lse);
    be.merge_attention_(out, lse, rep, rep_lse);
  }
  out = out.reshape({n * (B + Rp), w});

  // 4. Back to this rank's rows with all head groups.
  Tensor back = be.gather_rows(out, l.back_idx).reshape({U, n * L * w});
  Tensor back_recv = back;
  if (ulysses) {
    back_recv = be.empty(back.shape(), back.dtype());
    ulysses->all_to_all(back, back_recv);
  }
  Tensor heads_src = back_recv.reshape({U * n * L, w});
  if (Rp > 0) {
    Tensor replicated = be.gather_rows(out, l.replica_out_idx);
    Tensor all = replicated;
    if (ulysses) {
      all = be.empty({U, n * Rp * w}, replicated.dtype());
      ulysses->all_gather(replicated, all);
    }
    heads_src = be.concat_rows(heads_src, all.reshape({U * n * Rp, w}));
  }
  return be.gather_rows(heads_src, l.out_idx).reshape({n, S, U * w});
}

}  // namespace zimage
