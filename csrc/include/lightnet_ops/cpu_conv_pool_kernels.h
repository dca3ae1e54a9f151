// The ATen path's fused epilogue of the CPU conv2d_relu_maxpool2d forward: bias, max-pool, ReLU and
// the byte argmax over a dense conv output (csrc/cpu/conv_aten_forward.cpp).
//
// NO include guard on purpose: included once per instruction set through cpu_isa_variants.h,
// after cpu_vec.h.

// One plane of bias_relu_pool_range when its pooled rows are narrower than a vector (the small
// images of a network's later stages): element by element, with window_math.h's rules, since
// gathering a row into a padded vector costs more than the row's comparisons.
template <typename T>
void bias_relu_pool_plane_scalar(const ConvPoolShape& s, const T* src, T b, T* dst, uint8_t* am) {
  for (int64_t ph = 0; ph < s.PH; ++ph) {
    for (int64_t pw = 0; pw < s.PW; ++pw) {
      const T* corner = src + ph * s.pool_sh * s.Q + pw * s.pool_sw;
      T best = corner[0] + b;
      int64_t arg = 0;
      for (int64_t i = 0; i < s.pool_kh; ++i) {
        for (int64_t j = (i == 0 ? 1 : 0); j < s.pool_kw; ++j) {
          const T v = corner[i * s.Q + j] + b;  // biased before comparing, as the vector path
          if (pool_takes(v, best)) {
            best = v;
            arg = i * s.pool_kw + j;
          }
        }
      }
      dst[ph * s.PW + pw] = relu(best);
      if (am) am[ph * s.PW + pw] = encode_argmax(best, arg);
    }
  }
}

// Bias + max-pool + ReLU over planes [p0, p1) of a dense conv output (ATen path), vectorised over
// pooled columns. Rows of at least V pooled columns are covered by full vectors, the last one
// overlapping its neighbour (it recomputes and rewrites identical values), so no tail loop runs;
// narrower rows go element by element.
template <typename T>
void bias_relu_pool_range(const PoolArgs<T>& a, int64_t p0, int64_t p1) {
  constexpr int V = kLanes<T>;
  using S = Simd<T, V>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  const ConvPoolShape& s = *a.s;
  if (s.PW < V) {
    for (int64_t plane = p0; plane < p1; ++plane) {
      bias_relu_pool_plane_scalar<T>(s, a.conv + plane * s.P * s.Q, a.bias ? a.bias[plane % s.K] : T(0),
                                     a.out + plane * s.PH * s.PW,
                                     a.argmax ? a.argmax + plane * s.PH * s.PW : nullptr);
    }
    return;
  }
  for (int64_t plane = p0; plane < p1; ++plane) {
    const T b = a.bias ? a.bias[plane % s.K] : T(0);
    const T* src = a.conv + plane * s.P * s.Q;
    T* dst = a.out + plane * s.PH * s.PW;
    uint8_t* am = a.argmax ? a.argmax + plane * s.PH * s.PW : nullptr;
    for (int64_t ph = 0; ph < s.PH; ++ph) {
      for (int64_t pw0 = 0; pw0 < s.PW; pw0 += V) {
        pw0 = std::min<int64_t>(pw0, s.PW - V);
        vec best = S::splat(0);
        ivec arg = S::isplat(0);
        for (int64_t i = 0; i < s.pool_kh; ++i) {
          for (int64_t j = 0; j < s.pool_kw; ++j) {
            const T* p = src + (ph * s.pool_sh + i) * s.Q + pw0 * s.pool_sw + j;
            vec v;
            if (s.pool_sw == 1) {
              v = S::load(p);
            } else if (s.pool_sw == 2) {
              v = S::load_even(p);
            } else {
              T tmp[V];
              for (int64_t l = 0; l < V; ++l) tmp[l] = p[l * s.pool_sw];
              v = S::load(tmp);
            }
            // The bias is added before comparing: rounding can make x1 + b == x2 + b for x1 > x2,
            // and stock's first-maximum tie rule is defined on the biased values.
            v += b;
            if (i == 0 && j == 0) {
              best = v;
            } else {
              const ivec take = S::pool_takes(v, best);
              best = S::select(take, v, best);
              arg = S::iselect(take, S::isplat(i * s.pool_kw + j), arg);
            }
          }
        }
        const auto bytes = S::to_bytes(S::iselect(S::relu_passes(best), arg, S::isplat(kArgmaxReluZero)));
        S::store(dst + ph * s.PW + pw0, S::relu(best));
        if (am) std::memcpy(am + ph * s.PW + pw0, &bytes, V);
      }
    }
  }
}

