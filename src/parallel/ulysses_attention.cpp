#include "parallel/ulysses_attention.h"

#include "core/error.h"

namespace zimage {

std::vector<int32_t> head_group_send_rows(int64_t U, int64_t n, int64_t L, int64_t Rp) {
  std::vector<int32_t> rows;
  for (int64_t j = 0; j < U; ++j)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < L; ++k)
        for (int64_t p = 0; p < 3; ++p) rows.push_back(int32_t(((i * (L + Rp) + k) * 3 + p) * U + j));
  return rows;
}

std::vector<int32_t> replicated_head_group_rows(int64_t U, int64_t n, int64_t L, int64_t Rp, int64_t group) {
  std::vector<int32_t> rows;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < Rp; ++c)
      for (int64_t p = 0; p < 3; ++p) rows.push_back(int32_t(((i * (L + Rp) + L + c) * 3 + p) * U + group));
  return rows;
}

UlyssesLayout ulysses_layout(const SequenceParallelPlan& plan, int rank, int64_t items, int64_t replicated,
                             const std::vector<int64_t>& replicated_len) {
  ZI_ASSERT(rank >= 0 && rank < plan.degree && int64_t(replicated_len.size()) == items);
  UlyssesLayout l;
  const int64_t U = plan.degree, n = items, L = plan.local_len, R = replicated, S = L + R;
  const int64_t N = plan.image_tokens, P = plan.attended_padding, T = N + P + R;
  l.degree = plan.degree;
  l.rank = rank;
  l.items = n;
  l.local_len = L;
  l.replicated = R;
  l.seq = T;
  ZI_ASSERT(U * L - N >= P);

  // Where each (rank s, local row k) sits in an item's attention sequence: its global token index,
  // N + j for the j-th pad token in rank order while j < P, -1 for the surplus pad tokens.
  std::vector<int64_t> slot(size_t(U * L), -1);
  for (int s = 0; s < U; ++s)
    for (int64_t k = 0; k < plan.ranks[size_t(s)].tokens; ++k) slot[size_t(s * L + k)] = plan.global_token(s, k);
  int64_t pads = 0;
  for (int s = 0; s < U; ++s)
    for (int64_t k = plan.ranks[size_t(s)].tokens; k < L && pads < P; ++k) slot[size_t(s * L + k)] = N + pads++;
  std::vector<int64_t> source(size_t(N + P));  // the inverse: sequence position -> s * L + k
  for (int64_t sk = 0; sk < U * L; ++sk)
    if (slot[size_t(sk)] >= 0) source[size_t(slot[size_t(sk)])] = sk;

  l.send_idx = head_group_send_rows(U, n, L, R);
  l.replica_idx = replicated_head_group_rows(U, n, L, R, rank);

  // Attention input rows (width 3w): received (s, i, k) at (s*n + i)*L + k, then replicated (i, c) at
  // U*n*L + i*R + c.
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t t = 0; t < N + P; ++t) {
      int64_t sk = source[size_t(t)], s = sk / L, k = sk % L;
      l.attn_idx.push_back(int32_t((s * n + i) * L + k));
    }
    for (int64_t c = 0; c < R; ++c) l.attn_idx.push_back(int32_t(U * n * L + i * R + c));
    ZI_ASSERT(replicated_len[size_t(i)] <= R);
    l.key_len.push_back(int(N + P + replicated_len[size_t(i)]));
  }
  for (int64_t j = 0; j < U; ++j)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < L; ++k) {
        int64_t t = slot[size_t(j * L + k)];
        l.back_idx.push_back(t < 0 ? -1 : int32_t(i * T + t));
      }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < R; ++c) l.replica_out_idx.push_back(int32_t(i * T + N + P + c));

  // Output rows (i, k, s): head group s of row k, from the received image rows (s, i, k) or the
  // gathered replicated rows (s, i, c) at U*n*L + (s*n + i)*R + c.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < S; ++k)
      for (int64_t s = 0; s < U; ++s)
        l.out_idx.push_back(int32_t(k < L ? (s * n + i) * L + k : U * n * L + (s * n + i) * R + (k - L)));
  return l;
}

Tensor ulysses_attention(Backend& be, Communicator& comm, const UlyssesLayout& l, const Tensor& qkv, int heads,
                         int head_dim, float scale) {
  const int64_t U = l.degree, n = l.items, L = l.local_len, R = l.replicated, S = L + R;
  ZI_ASSERT(comm.size() == U && comm.rank() == l.rank && heads % U == 0);
  const int g = heads / int(U);
  const int64_t w = int64_t(g) * head_dim;
  ZI_ASSERT(qkv.ndim() == 3 && qkv.dim(0) == n && qkv.dim(1) == S && qkv.dim(2) == 3 * U * w);
  const Tensor rows = qkv.reshape({n * S * 3 * U, w});

  // 1-2. Image rows to their head-group ranks; this rank's head group of the replicated rows.
  Tensor send = be.gather_rows(rows, l.send_idx).reshape({U, n * L * 3 * w});
  Tensor recv = be.empty(send.shape(), send.dtype());
  comm.all_to_all(send, recv);
  Tensor src = recv.reshape({U * n * L, 3 * w});
  if (R > 0) src = be.concat_rows(src, be.gather_rows(rows, l.replica_idx).reshape({n * R, 3 * w}));

  // 3. Attention in one-GPU token order.
  Tensor in = be.gather_rows(src, l.attn_idx).reshape({n, l.seq, 3 * w});
  Tensor out = be.attention(in, g, g, head_dim, scale, /*causal=*/false, l.key_len).reshape({n * l.seq, w});

  // 4. Back to this rank's rows with all head groups.
  Tensor back = be.gather_rows(out, l.back_idx).reshape({U, n * L * w});
  Tensor back_recv = be.empty(back.shape(), back.dtype());
  comm.all_to_all(back, back_recv);
  Tensor heads_src = back_recv.reshape({U * n * L, w});
  if (R > 0) {
    Tensor mine = be.gather_rows(out, l.replica_out_idx);
    Tensor all = be.empty({U, n * R * w}, mine.dtype());
    comm.all_gather(mine, all);
    heads_src = be.concat_rows(heads_src, all.reshape({U * n * R, w}));
  }
  return be.gather_rows(heads_src, l.out_idx).reshape({n, S, U * w});
}

}  // namespace zimage
