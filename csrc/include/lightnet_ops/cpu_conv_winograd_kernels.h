// Winograd F(2x2, 3x3) kernels of the CPU conv2d_relu_maxpool2d (3x3 filter, stride 1, dilation 1,
// 2x2 pool with stride 2: each pool window is exactly one Winograd output tile): the output tile
// fused with the pool (shared with the direct path's Winograd forward), and the ATen path's input
// transform and output-transform epilogue (csrc/cpu/conv_winograd_forward.cpp).
//
// NO include guard on purpose: included once per instruction set through cpu_isa_variants.h,
// after cpu_vec.h.

// Winograd F(2x2, 3x3) output transform of one 2x2 output tile, fused with the pool: the
// products m (4x4, row-major) go through A^T m A, plus the bias b, to the window's four conv
// values, whose maximum (stock's rule: first maximum, NaN wins) and its window offset come back in
// best / arg (before ReLU; arg only when Argmax). check turns NaN once a conv value is not finite.
template <typename T, int V, bool Argmax = true>
LIGHTNET_OPS_INLINE void winograd_output_pool_tile(const typename Simd<T, V>::vec* m, typename Simd<T, V>::vec b,
                                                   typename Simd<T, V>::vec& check, typename Simd<T, V>::vec& best,
                                                   typename Simd<T, V>::ivec& arg) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  vec w[2][4];  // A^T m
  LIGHTNET_OPS_UNROLL
  for (int j = 0; j < 4; ++j) {
    w[0][j] = m[j] + m[4 + j] + m[8 + j];
    w[1][j] = m[4 + j] - m[8 + j] - m[12 + j];
  }
  vec y[4];  // (A^T m) A plus the bias: the window's conv values, row-major
  LIGHTNET_OPS_UNROLL
  for (int i = 0; i < 2; ++i) {
    y[i * 2 + 0] = (w[i][0] + w[i][1] + w[i][2]) + b;
    y[i * 2 + 1] = (w[i][1] - w[i][2] - w[i][3]) + b;
  }
  check += (y[0] - y[0]) + (y[1] - y[1]) + (y[2] - y[2]) + (y[3] - y[3]);
  best = y[0];
  if constexpr (Argmax) arg = S::isplat(0);
  LIGHTNET_OPS_UNROLL
  for (int q = 1; q < 4; ++q) {
    const ivec take = S::pool_takes(y[q], best);
    best = S::select(take, y[q], best);
    if constexpr (Argmax) arg = S::iselect(take, S::isplat(q), arg);
  }
}


// Winograd F(2x2, 3x3) input transform of pooled rows [ph0, ph1) of sample n:
// V[xi][t][c] = (B^T d B)[xi] for the 4x4 input tile d of tile t = (ph - ph0) * PW + pw (rows
// 2*ph.., columns 2*pw.. of the padded input), vectorised over channels. Returns whether every
// transformed value is finite (non-finite input: the caller falls back to ATen's convolution,
// whose NaN / infinity placement is stock's).
template <typename T>
bool winograd_input_transform(const WinogradArgs<T>& a, int64_t n, int64_t ph0, int64_t ph1, T* V) {
  constexpr int L = kLanes<T>;
  using S = Simd<T, L>;
  using vec = typename S::vec;
  const ConvPoolShape& s = *a.s;
  const int64_t Hp = s.H + 2 * s.pad_h, Wp = s.W + 2 * s.pad_w, plane = (ph1 - ph0) * s.PW * a.Cp;
  vec check = S::splat(0);
  for (int64_t ph = ph0; ph < ph1; ++ph) {
    for (int64_t pw = 0; pw < s.PW; ++pw) {
      const T* src = a.x_t + ((n * Hp + 2 * ph) * Wp + 2 * pw) * a.Cp;
      T* dst = V + ((ph - ph0) * s.PW + pw) * a.Cp;
      for (int64_t c = 0; c < a.Cp; c += L) {
        vec d[4][4], t[4][4];
        LIGHTNET_OPS_UNROLL
        for (int r = 0; r < 4; ++r)
          LIGHTNET_OPS_UNROLL
          for (int q = 0; q < 4; ++q) d[r][q] = S::load(src + (r * Wp + q) * a.Cp + c);
        LIGHTNET_OPS_UNROLL
        for (int q = 0; q < 4; ++q) {  // B^T d
          t[0][q] = d[0][q] - d[2][q];
          t[1][q] = d[1][q] + d[2][q];
          t[2][q] = d[2][q] - d[1][q];
          t[3][q] = d[1][q] - d[3][q];
        }
        LIGHTNET_OPS_UNROLL
        for (int r = 0; r < 4; ++r) {  // (B^T d) B
          const vec v0 = t[r][0] - t[r][2], v1 = t[r][1] + t[r][2], v2 = t[r][2] - t[r][1], v3 = t[r][1] - t[r][3];
          S::store(dst + (r * 4 + 0) * plane + c, v0);
          S::store(dst + (r * 4 + 1) * plane + c, v1);
          S::store(dst + (r * 4 + 2) * plane + c, v2);
          S::store(dst + (r * 4 + 3) * plane + c, v3);
          check += (v0 - v0) + (v1 - v1) + (v2 - v2) + (v3 - v3);  // NaN once anything is not finite
        }
      }
    }
  }
  return S::hsum(check) == T(0);
}

// Winograd output transform of pooled rows [ph0, ph1) of sample n fused with bias, max-pool,
// ReLU and argmax: the window's conv values Y = A^T M A (2x2, row-major = window offsets 0..3)
// from M[xi][t][k] (t as in winograd_input_transform), vectorised over output channels; then
// stock's rules (bias before comparing, first maximum, NaN wins). Returns whether every conv value
// was finite.
template <typename T>
bool winograd_output_pool(const WinogradArgs<T>& a, int64_t n, int64_t ph0, int64_t ph1, const T* M) {
  constexpr int L = kLanes<T>;
  using S = Simd<T, L>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  const ConvPoolShape& s = *a.s;
  const int64_t TT = s.PH * s.PW, tiles = (ph1 - ph0) * s.PW, plane = tiles * a.Kp, first = ph0 * s.PW;
  vec check = S::splat(0);
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t k0 = 0; k0 < a.Kp; k0 += L) {
      const T* src = M + t * a.Kp + k0;
      vec m[16];
      LIGHTNET_OPS_UNROLL
      for (int xi = 0; xi < 16; ++xi) m[xi] = S::load(src + xi * plane);
      T bias_lanes[L] = {};
      for (int l = 0; l < L && k0 + l < s.K; ++l) bias_lanes[l] = a.bias ? a.bias[k0 + l] : T(0);
      vec best;
      ivec arg;
      winograd_output_pool_tile<T, L>(m, S::load(bias_lanes), check, best, arg);
      const vec o = S::relu(best);
      const ivec am = S::iselect(S::relu_passes(best), arg, S::isplat(kArgmaxReluZero));
      for (int l = 0; l < L && k0 + l < s.K; ++l) {
        const int64_t idx = (n * s.K + k0 + l) * TT + first + t;
        a.out[idx] = o[l];
        if (a.argmax) a.argmax[idx] = static_cast<uint8_t>(am[l]);
      }
    }
  }
  return S::hsum(check) == T(0);
}
