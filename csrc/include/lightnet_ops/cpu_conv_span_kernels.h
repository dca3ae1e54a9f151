// Span kernels of the CPU conv2d_relu_maxpool2d backward: the ATen path's scatter backward
// (csrc/cpu/conv_scatter_backward.cpp) and the direct path's span grad_weight
// (csrc/cpu/conv_direct_backward.cpp). Arguments: ScatterArgs / SpanGradWeightArgs in cpu_conv_args.h.
//
// NO include guard on purpose: included once per instruction set through cpu_isa_variants.h,
// after cpu_vec.h.

// Scatter backward (csrc/cpu/conv_scatter_backward.cpp): every live pooled element feeds exactly the
// conv position its argmax selected, so the gradients are sums over those elements only (a
// quarter of the conv positions for a 2x2 pool) instead of over a dense, mostly-zero conv-output
// gradient. Channels-last: the S taps of one filter row at one conv position are one span of
// consecutive elements of a padded input row (see ScatterArgs), handled as whole vectors.

// Vector slots of the spans: slot j = (filter row r, vector v of the span), j = r * NV + v, with
// NV = ceil(Ls / V) vectors per span. x_off: offset from a conv position's first element in the
// input layout whose input rows are `row` elements apart (x_t / gi_t, or the span rows of
// span_grad_weight_range); w_off: offset in w_t / gw_t from a channel's first element.
struct SpanSlots {
  std::vector<int64_t> x_off, w_off;
};

template <int V>
SpanSlots span_slots(const ConvPoolShape& s, int64_t Ls, int64_t Lp, int64_t row) {
  const int64_t nv = (Ls + V - 1) / V;
  SpanSlots slots;
  for (int64_t r = 0; r < s.R; ++r) {
    for (int64_t v = 0; v < nv; ++v) {
      slots.x_off.push_back(r * s.dil_h * row + v * V);
      slots.w_off.push_back(r * Lp + v * V);
    }
  }
  return slots;
}

// The offsets of slots [0, nj) of a register block of NJ slots; slots past nj repeat the last
// one (computed, not stored).
template <int NJ>
LIGHTNET_OPS_INLINE void block_slots(const int64_t* x_off, const int64_t* w_off, int nj, int64_t* xo, int64_t* wo) {
  LIGHTNET_OPS_UNROLL
  for (int j = 0; j < NJ; ++j) {
    xo[j] = x_off[std::min(j, nj - 1)];
    wo[j] = w_off[std::min(j, nj - 1)];
  }
}

// The smallest of the compiled block sizes {1, 2, 3, 4, 6, 8, 12} that holds n slots (12 at most).
inline int slot_block(int64_t n) {
  for (int b : {1, 2, 3, 4, 6, 8}) {
    if (n <= b) return b;
  }
  return 12;
}

// One register block of a span grad_weight: KT output channels x NJ vector slots, summed over
// every pooled position of one sample. Each position has one entry per channel of the block: the
// gradient (0 where the element is dead or the channel is past the block's end) and the offset in
// `x` of the conv position it selected. `x` holds the conv padding as zeros, so nothing is
// bounds-checked. Slots past nj repeat the last one (computed, not stored). The sums start from
// `gw` (output channels `row` elements apart) unless `first`.
template <typename T, int V, int KT, int NJ>
LIGHTNET_OPS_INLINE void scatter_gw_block(const T* x, const T* slot_g, const int64_t* slot_base, int64_t F,
                                          const int64_t* x_off, const int64_t* w_off, int nk, int nj, T* gw,
                                          int64_t row, bool first) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  int64_t xo[NJ], wo[NJ];
  block_slots<NJ>(x_off, w_off, nj, xo, wo);
  vec acc[KT][NJ];
  LIGHTNET_OPS_UNROLL
  for (int kk = 0; kk < KT; ++kk)
    LIGHTNET_OPS_UNROLL
    for (int j = 0; j < NJ; ++j) acc[kk][j] = (first || kk >= nk) ? S::splat(0) : S::load(gw + kk * row + wo[j]);
  for (int64_t f = 0; f < F; ++f) {
    LIGHTNET_OPS_UNROLL
    for (int kk = 0; kk < KT; ++kk) {
      const vec g = S::splat(slot_g[f * KT + kk]);
      const T* px = x + slot_base[f * KT + kk];
      LIGHTNET_OPS_UNROLL
      for (int j = 0; j < NJ; ++j) acc[kk][j] += g * S::load(px + xo[j]);
    }
  }
  for (int kk = 0; kk < nk; ++kk) {
    for (int j = 0; j < nj; ++j) S::store(gw + kk * row + wo[j], acc[kk][j]);
  }
}

// scatter_gw_block with the smallest compiled slot count that holds nj (at most 6).
template <typename T, int V, int KT>
LIGHTNET_OPS_INLINE void span_gw_block(const T* x, const T* slot_g, const int64_t* slot_base, int64_t F,
                                       const int64_t* x_off, const int64_t* w_off, int nk, int nj, T* gw, int64_t row,
                                       bool first) {
  switch (slot_block(nj)) {
    case 1: return scatter_gw_block<T, V, KT, 1>(x, slot_g, slot_base, F, x_off, w_off, nk, nj, gw, row, first);
    case 2: return scatter_gw_block<T, V, KT, 2>(x, slot_g, slot_base, F, x_off, w_off, nk, nj, gw, row, first);
    case 3: return scatter_gw_block<T, V, KT, 3>(x, slot_g, slot_base, F, x_off, w_off, nk, nj, gw, row, first);
    case 4: return scatter_gw_block<T, V, KT, 4>(x, slot_g, slot_base, F, x_off, w_off, nk, nj, gw, row, first);
    default: return scatter_gw_block<T, V, KT, 6>(x, slot_g, slot_base, F, x_off, w_off, nk, nj, gw, row, first);
  }
}

// grad_weight rows [k0, k1): gw_t[k] = sum over the live elements e of plane k (samples in order,
// then pooled positions in order) of grad(e) * the spans of the conv position e selected. Each
// row is summed by one thread in that fixed order: deterministic. Blocks of KT output channels:
// at a pooled position their patches lie in the same small input region (one of the window's
// conv positions each), so a block's loads mostly hit L1 while it sweeps the sample.
template <typename T>
void scatter_grad_weight_range(const ScatterArgs<T>& a, int64_t k0, int64_t k1) {
  constexpr int V = kLanes<T>;
  constexpr int KT = 4, NJ = 6;  // KT * NJ = 24 accumulators
  const ConvPoolShape& s = *a.s;
  const SpanSlots slots = span_slots<V>(s, a.Ls, a.Lp, a.row);
  const int64_t J = static_cast<int64_t>(slots.x_off.size()), F = s.PH * s.PW;
  const int64_t Hp = s.H + 2 * s.pad_h, Wp = s.W + 2 * s.pad_w;
  std::vector<T> slot_g(F * KT);
  std::vector<int64_t> slot_base(F * KT);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t kt0 = k0; kt0 < k1; kt0 += KT) {
      const int nk = static_cast<int>(std::min<int64_t>(KT, k1 - kt0));
      for (int kk = 0; kk < KT; ++kk) {
        const int64_t plane = (n * s.K + kt0 + std::min(kk, nk - 1)) * F;  // slots past nk stay dead
        const T* g = a.grad_out + plane;
        const uint8_t* am = a.argmax + plane;
        for (int64_t ph = 0, f = 0; ph < s.PH; ++ph) {
          for (int64_t pw = 0; pw < s.PW; ++pw, ++f) {
            const uint8_t b = kk < nk ? am[f] : kArgmaxReluZero;
            const bool live = a.offsets->dy[b] >= 0;
            const int64_t p = ph * s.pool_sh + (live ? a.offsets->dy[b] : 0);
            const int64_t q = pw * s.pool_sw + (live ? a.offsets->dx[b] : 0);
            slot_g[f * KT + kk] = live ? g[f] : T(0);
            slot_base[f * KT + kk] = live ? ((n * Hp + p * s.stride_h) * Wp + q * s.stride_w) * s.C : 0;
          }
        }
      }
      T* gw = a.gw_t + kt0 * s.R * a.Lp;
      for (int64_t j0 = 0; j0 < J; j0 += NJ) {
        const int nj = static_cast<int>(std::min<int64_t>(NJ, J - j0));
        const int64_t* xo = slots.x_off.data() + j0;
        const int64_t* wo = slots.w_off.data() + j0;
        const T* sg = slot_g.data();
        const int64_t* sb = slot_base.data();
        span_gw_block<T, V, KT>(a.x_t, sg, sb, F, xo, wo, nk, nj, gw, s.R * a.Lp, n == 0);
      }
    }
  }
}

// One register block of the scatter grad_input: NJ vector slots of the sum over (g, k) in
// `bucket` of g * w_t[k]'s spans, added into the sample's gi_t at conv position `base`. Slots past
// nj repeat the last one (computed, not stored).
template <typename T, int V, int NJ>
LIGHTNET_OPS_INLINE void scatter_gi_block(const ScatterArgs<T>& a, const std::pair<T, int64_t>* bucket, int64_t count,
                                          const int64_t* x_off, const int64_t* w_off, int nj, T* gi) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  int64_t xo[NJ], wo[NJ];
  block_slots<NJ>(x_off, w_off, nj, xo, wo);
  vec acc[NJ];
  LIGHTNET_OPS_UNROLL
  for (int j = 0; j < NJ; ++j) acc[j] = S::splat(0);
  const int64_t row = a.s->R * a.Lp;
  for (int64_t i = 0; i < count; ++i) {
    const vec g = S::splat(bucket[i].first);
    const T* w = a.w_t + bucket[i].second * row;
    LIGHTNET_OPS_UNROLL
    for (int j = 0; j < NJ; ++j) acc[j] += g * S::load(w + wo[j]);
  }
  // One read-modify-write per slot, in slot order (slots of neighbouring rows may overlap in
  // their zero lanes; in order, each sees the previous one's store).
  for (int j = 0; j < nj; ++j) S::store(gi + xo[j], S::load(gi + xo[j]) + acc[j]);
}

// grad_input samples [n0, n1). Per pooled position, the output channels are bucketed by their
// argmax (channels whose window picked the same conv position read the same input patch); each
// bucket's filter spans, weighted by the channels' gradients, are summed in registers (channels
// in order) and added into the patch once, instead of one read-modify-write of the patch per
// channel. gi_t is spatially padded like x_t, so patches need no clipping; the zero lanes of the
// weight spans add zeros. Positions in order, window offsets in order: deterministic.
template <typename T>
void scatter_grad_input_range(const ScatterArgs<T>& a, int64_t n0, int64_t n1) {
  constexpr int V = kLanes<T>;
  constexpr int NJ = 12;  // accumulators per register block
  const ConvPoolShape& s = *a.s;
  const SpanSlots slots = span_slots<V>(s, a.Ls, a.Lp, a.row);
  const int64_t J = static_cast<int64_t>(slots.x_off.size()), F = s.PH * s.PW;
  const int64_t win = s.pool_kh * s.pool_kw, Wp = s.W + 2 * s.pad_w;
  std::vector<std::pair<T, int64_t>> buckets(win * s.K);  // (gradient, channel) per window offset
  std::vector<int64_t> counts(win);
  for (int64_t n = n0; n < n1; ++n) {
    T* gi = a.gi_t + n * a.gi_stride;
    std::fill(gi, gi + a.gi_stride, T(0));
    for (int64_t ph = 0; ph < s.PH; ++ph) {
      for (int64_t pw = 0; pw < s.PW; ++pw) {
        const int64_t f = ph * s.PW + pw;
        std::fill(counts.begin(), counts.end(), 0);
        for (int64_t k = 0; k < s.K; ++k) {
          const uint8_t am = a.argmax[(n * s.K + k) * F + f];
          if (a.offsets->dy[am] < 0) continue;
          buckets[am * s.K + counts[am]++] = {a.grad_out[(n * s.K + k) * F + f], k};
        }
        for (int64_t w = 0; w < win; ++w) {
          if (counts[w] == 0) continue;
          const int64_t p = ph * s.pool_sh + a.offsets->dy[w], q = pw * s.pool_sw + a.offsets->dx[w];
          T* patch = gi + (p * s.stride_h * Wp + q * s.stride_w) * s.C;
          const std::pair<T, int64_t>* bucket = buckets.data() + w * s.K;
          for (int64_t j0 = 0; j0 < J; j0 += NJ) {
            const int nj = static_cast<int>(std::min<int64_t>(NJ, J - j0));
            const int64_t* xo = slots.x_off.data() + j0;
            const int64_t* wo = slots.w_off.data() + j0;
            switch (slot_block(nj)) {
              case 1: scatter_gi_block<T, V, 1>(a, bucket, counts[w], xo, wo, nj, patch); break;
              case 2: scatter_gi_block<T, V, 2>(a, bucket, counts[w], xo, wo, nj, patch); break;
              case 3: scatter_gi_block<T, V, 3>(a, bucket, counts[w], xo, wo, nj, patch); break;
              case 4: scatter_gi_block<T, V, 4>(a, bucket, counts[w], xo, wo, nj, patch); break;
              case 6: scatter_gi_block<T, V, 6>(a, bucket, counts[w], xo, wo, nj, patch); break;
              case 8: scatter_gi_block<T, V, 8>(a, bucket, counts[w], xo, wo, nj, patch); break;
              default: scatter_gi_block<T, V, NJ>(a, bucket, counts[w], xo, wo, nj, patch); break;
            }
          }
        }
      }
    }
  }
}

// Span grad_weight of samples [n0, n1) (direct path): adds into gw [K][R][Lp], per output channel
// and span, the sum over the live pooled elements (samples in order, then positions in order) of
// gradient * the spans of the conv position the element selected. Like scatter_grad_weight_range,
// but over the aligned span rows of each sample (see SpanGradWeightArgs), built once per sample.
template <typename T>
void span_grad_weight_range(const SpanGradWeightArgs<T>& a, int64_t n0, int64_t n1, T* gw) {
  using S = Simd<T, kLanes<T>>;
  constexpr int V = kLanes<T>;
  constexpr int KT = 4, NJ = 6;
  const ConvPoolShape& s = *a.s;
  const int64_t Hp = s.H + 2 * s.pad_h, Wp = s.W + 2 * s.pad_w, F = s.PH * s.PW;
  const int64_t nv = (a.Ls + V - 1) / V;
  const SpanSlots slots = span_slots<V>(s, a.Ls, a.Lp, a.Xn * a.Lp);  // span rows: Xn rows of Lp per input row
  const int64_t J = static_cast<int64_t>(slots.x_off.size());
  // Samples channels-last, zeros in the padding and the slack. Two buffers: sample n + 1 is
  // transposed before sample n's sweep, so that its element-wise stores have retired by the time
  // its span rows are read from it in vectors (a vector load that spans several recent stores
  // cannot be forwarded from them and stalls).
  const int64_t xt_elems = Hp * Wp * s.C + V;
  Scratch<T> xt(2 * xt_elems);
  Scratch<T> rows(Hp * a.Xn * a.Lp);
  std::vector<T> slot_g(F * KT);
  std::vector<int64_t> slot_base(F * KT);
  const auto transpose = [&](int64_t n, T* dst0) {
    const T* in = a.input + n * s.C * s.H * s.W;
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t y = 0; y < s.H; ++y) {
        T* dst = dst0 + ((y + s.pad_h) * Wp + s.pad_w) * s.C + c;
        const T* src = in + (c * s.H + y) * s.W;
        for (int64_t x = 0; x < s.W; ++x) dst[x * s.C] = src[x];
      }
  };
  if (n0 < n1) transpose(n0, xt.data());
  for (int64_t n = n0; n < n1; ++n) {
    const T* cur = xt.data() + ((n - n0) % 2) * xt_elems;
    // Vectors past the span read the next positions' (finite) elements: lanes that are discarded.
    for (int64_t y = 0; y < Hp; ++y)
      for (int64_t x = 0; x < a.Xn; ++x)
        for (int64_t v = 0; v < nv; ++v)
          S::store(rows.data() + (y * a.Xn + x) * a.Lp + v * V, S::load(cur + (y * Wp + x) * s.C + v * V));
    if (n + 1 < n1) transpose(n + 1, xt.data() + ((n + 1 - n0) % 2) * xt_elems);
    for (int64_t kt0 = 0; kt0 < s.K; kt0 += KT) {
      const int nk = static_cast<int>(std::min<int64_t>(KT, s.K - kt0));
      for (int kk = 0; kk < KT; ++kk) {
        const int64_t plane = (n * s.K + kt0 + std::min(kk, nk - 1)) * F;  // slots past nk stay dead
        const T* g = a.grad_out + plane;
        const uint8_t* am = a.argmax + plane;
        // Branch-free (whether an element is live is data-dependent, and unpredictable).
        for (int64_t f = 0; f < F; ++f) {
          const uint8_t b = kk < nk ? am[f] : kArgmaxReluZero;
          const int64_t live = a.byte_live[b];
          slot_g[f * KT + kk] = mask_bits(g[f], live);
          slot_base[f * KT + kk] = (a.pos_base[f] + a.byte_off[b]) & -live;
        }
      }
      for (int64_t j0 = 0; j0 < J; j0 += NJ) {
        const int nj = static_cast<int>(std::min<int64_t>(NJ, J - j0));
        span_gw_block<T, V, KT>(rows.data(), slot_g.data(), slot_base.data(), F, slots.x_off.data() + j0,
                                slots.w_off.data() + j0, nk, nj, gw + kt0 * s.R * a.Lp, s.R * a.Lp, false);
      }
    }
  }
}

