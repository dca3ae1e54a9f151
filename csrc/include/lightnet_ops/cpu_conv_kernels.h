// Kernel bodies of the CPU conv2d_relu_maxpool2d, compiled once per instruction set.
// NO include guard on purpose: csrc/cpu/conv2d_relu_maxpool2d.cpp includes this file several
// times, each inside its own namespace, inside a target region (see cpu_simd.h), after defining
// `constexpr int kVecBytes` (the register width in bytes) in that namespace. Standard headers,
// cpu_simd.h and cpu_conv_direct.h must already be included.

// Vector of V lanes of T, and the signed integer vector of the same lane size (comparison masks).
template <typename T>
struct LaneInt;
template <>
struct LaneInt<float> {
  using type = int32_t;
};
template <>
struct LaneInt<double> {
  using type = int64_t;
};

template <typename T, int V>
struct Simd {
  typedef T vec __attribute__((vector_size(sizeof(T) * V)));
  typedef typename LaneInt<T>::type lane_int;
  typedef lane_int ivec __attribute__((vector_size(sizeof(T) * V)));
  typedef uint8_t bytes __attribute__((vector_size(V)));

  static LIGHTNET_OPS_INLINE vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static LIGHTNET_OPS_INLINE void store(T* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
  static LIGHTNET_OPS_INLINE vec splat(T s) { return vec{} + s; }
  static LIGHTNET_OPS_INLINE ivec isplat(lane_int s) { return ivec{} + s; }
  // Lane-wise m ? a : b for a comparison mask m (blend / masked move).
  static LIGHTNET_OPS_INLINE vec select(ivec m, vec a, vec b) { return m ? a : b; }
  static LIGHTNET_OPS_INLINE ivec iselect(ivec m, ivec a, ivec b) { return m ? a : b; }
  // Stock max-pool rule: the candidate replaces the running max when greater, or when NaN.
  static LIGHTNET_OPS_INLINE ivec pool_takes(vec cand, vec best) { return (cand > best) | (cand != cand); }
  // relu as stock computes it (NaN stays NaN) and its gradient gate !(v <= 0).
  static LIGHTNET_OPS_INLINE ivec relu_passes(vec v) { return !(v <= vec{}); }
  static LIGHTNET_OPS_INLINE vec relu(vec v) { return relu_passes(v) ? v : vec{}; }
  // Lanes summed in a fixed order (deterministic).
  static LIGHTNET_OPS_INLINE T hsum(vec v) {
    T s = v[0];
    for (int i = 1; i < V; ++i) s += v[i];
    return s;
  }
  // p[0], p[2], ..., p[2V-2], reading nothing past p[2V-2].
  static LIGHTNET_OPS_INLINE vec load_even(const T* p) {
#if defined(__GNUC__) && !defined(__clang__)
    ivec idx;
    for (int l = 0; l < V; ++l) idx[l] = l < V / 2 ? 2 * l : 2 * l + 1;  // second vector starts at p[V-1]
    return __builtin_shuffle(load(p), load(p + V - 1), idx);
#else
    vec v;
    for (int l = 0; l < V; ++l) v[l] = p[2 * l];
    return v;
#endif
  }
  static LIGHTNET_OPS_INLINE bytes to_bytes(ivec v) { return __builtin_convertvector(v, bytes); }
  static LIGHTNET_OPS_INLINE ivec from_bytes(const uint8_t* p) {
    bytes b;
    std::memcpy(&b, p, sizeof(b));
    return __builtin_convertvector(b, ivec);
  }
};

template <typename T>
constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));

// Packs one sample's input (C, H, W) into X[c][dy][dx][f] (see the file comment); lanes f >= F are 0.
template <typename T>
LIGHTNET_OPS_INLINE void pack_input(const Direct& d, const T* in, T* X) {
  for (int64_t c = 0; c < d.C; ++c) {
    for (int64_t dy = 0; dy < d.Dy; ++dy) {
      for (int64_t dx = 0; dx < d.Dx; ++dx) {
        T* dst = X + d.plane(c, dy, dx);
        const int64_t x0 = dx - d.pad_w;  // input column read by pw = 0
        int64_t lo = x0 >= 0 ? 0 : std::min(d.PW, (-x0 + d.Mw - 1) / d.Mw);
        int64_t hi = d.W - 1 - x0 < 0 ? 0 : std::min(d.PW, (d.W - 1 - x0) / d.Mw + 1);
        hi = std::max(hi, lo);
        for (int64_t ph = 0; ph < d.PH; ++ph) {
          T* row = dst + ph * d.PW;
          const int64_t y = ph * d.Mh + dy - d.pad_h;
          if (y < 0 || y >= d.H) {
            std::fill(row, row + d.PW, T(0));
            continue;
          }
          const T* src = in + (c * d.H + y) * d.W;
          std::fill(row, row + lo, T(0));
          if (d.Mw == 2) {  // the common pool stride: a constant stride the compiler vectorises
            for (int64_t pw = lo; pw < hi; ++pw) row[pw] = src[pw * 2 + x0];
          } else {
            for (int64_t pw = lo; pw < hi; ++pw) row[pw] = src[pw * d.Mw + x0];
          }
          std::fill(row + hi, row + d.PW, T(0));
        }
        std::fill(dst + d.F, dst + d.Fpad, T(0));
      }
    }
  }
}

// Adjoint of pack_input: adds dX[c][dy][dx][f] into the sample's input gradient (C, H, W);
// reads that fell into the padding are dropped.
template <typename T>
LIGHTNET_OPS_INLINE void unpack_add(const Direct& d, const T* dX, T* gi) {
  for (int64_t c = 0; c < d.C; ++c) {
    for (int64_t dy = 0; dy < d.Dy; ++dy) {
      for (int64_t dx = 0; dx < d.Dx; ++dx) {
        const T* src = dX + d.plane(c, dy, dx);
        const int64_t x0 = dx - d.pad_w;
        int64_t lo = x0 >= 0 ? 0 : std::min(d.PW, (-x0 + d.Mw - 1) / d.Mw);
        int64_t hi = d.W - 1 - x0 < 0 ? 0 : std::min(d.PW, (d.W - 1 - x0) / d.Mw + 1);
        for (int64_t ph = 0; ph < d.PH; ++ph) {
          const int64_t y = ph * d.Mh + dy - d.pad_h;
          if (y < 0 || y >= d.H) continue;
          const T* row = src + ph * d.PW;
          T* dst = gi + (c * d.H + y) * d.W;
          for (int64_t pw = lo; pw < hi; ++pw) dst[pw * d.Mw + x0] += row[pw];
        }
      }
    }
  }
}

// Forward for samples [n0, n1).
template <typename T, int V, int KB>
LIGHTNET_OPS_INLINE void direct_forward(const DirectFwdArgs<T>& a, int64_t n0, int64_t n1) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  const Direct& d = *a.d;
  std::vector<T> xbuf(d.pack_elems());
  T* X = xbuf.data();
  const int64_t CHW = d.C * d.H * d.W;
  for (int64_t n = n0; n < n1; ++n) {
    pack_input(d, a.input + n * CHW, X);
    T* out = a.out + n * d.K * d.F;
    uint8_t* am = a.argmax ? a.argmax + n * d.K * d.F : nullptr;
    for (int64_t f0 = 0; f0 < d.F; f0 += V) {
      const int64_t cnt = std::min<int64_t>(V, d.F - f0);
      for (int64_t kb = 0; kb < d.Kpad / KB; ++kb) {
        const T* wk = a.wpk + kb * d.CRS * KB;
        vec best[KB];
        ivec arg[KB];
        for (int64_t i = 0; i < d.pkh; ++i) {
          for (int64_t j = 0; j < d.pkw; ++j) {
            vec acc[KB];
            for (int q = 0; q < KB; ++q) acc[q] = S::splat(a.bpk[kb * KB + q]);
            const T* wp = wk;
            for (int64_t c = 0; c < d.C; ++c) {
              for (int64_t r = 0; r < d.R; ++r) {
                const T* xr = X + d.plane(c, i * d.sh + r * d.dh, j * d.sw) + f0;
                for (int64_t s = 0; s < d.S; ++s, wp += KB) {
                  const vec x = S::load(xr + s * d.dw * d.Fpad);
                  for (int q = 0; q < KB; ++q) acc[q] += x * wp[q];
                }
              }
            }
            if (i == 0 && j == 0) {
              for (int q = 0; q < KB; ++q) {
                best[q] = acc[q];
                arg[q] = S::isplat(0);
              }
            } else {
              const ivec off = S::isplat(i * d.pkw + j);
              for (int q = 0; q < KB; ++q) {
                const ivec take = S::pool_takes(acc[q], best[q]);
                best[q] = S::select(take, acc[q], best[q]);
                arg[q] = S::iselect(take, off, arg[q]);
              }
            }
          }
        }
        for (int q = 0; q < KB; ++q) {
          const int64_t k = kb * KB + q;
          if (k >= d.K) break;
          const vec o = S::relu(best[q]);
          if (cnt == V) {
            S::store(out + k * d.F + f0, o);
          } else {
            T tmp[V];
            S::store(tmp, o);
            std::memcpy(out + k * d.F + f0, tmp, cnt * sizeof(T));
          }
          if (am) {
            const auto bytes = S::to_bytes(S::iselect(S::relu_passes(best[q]), arg[q], S::isplat(kArgmaxReluZero)));
            std::memcpy(am + k * d.F + f0, &bytes, cnt);
          }
        }
      }
    }
  }
}

constexpr int kTermBlock = 3;  // filter taps per grad_weight register block (3: one 3-wide row)

// Backward for samples [n0, n1); adds this range's weight / bias gradients into gw (Kpad, CRS)
// and gb (Kpad).
template <typename T, int V, int KB>
LIGHTNET_OPS_INLINE void direct_backward(const DirectBwdArgs<T>& a, int64_t n0, int64_t n1, T* gw, T* gb) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  constexpr int TB = kTermBlock;
  const Direct& d = *a.d;
  const int64_t win = d.pkh * d.pkw;
  const int64_t Fv = (d.F + V - 1) / V * V;  // lanes the vector loops touch (<= Fpad)
  std::vector<T> xbuf(a.need_weight ? d.pack_elems() : 0);
  std::vector<T> dxbuf(a.grad_input ? d.pack_elems() : 0);
  std::vector<T> gmbuf(win * d.Kpad * d.Fpad, T(0));  // rows k >= K stay zero
  std::vector<T> zeros(d.Fpad, T(0));
  T* X = xbuf.data();
  T* dX = dxbuf.data();
  T* Gm = gmbuf.data();  // Gm[w][k][f]: pooled gradient where argmax == w, else 0
  const int64_t CHW = d.C * d.H * d.W;
  for (int64_t n = n0; n < n1; ++n) {
    // Masked gradients (and the bias gradient: every live pooled element).
    for (int64_t k = 0; k < d.K; ++k) {
      const T* g = a.grad_out + (n * d.K + k) * d.F;
      const uint8_t* am = a.argmax + (n * d.K + k) * d.F;
      vec bsum = S::splat(0);
      for (int64_t f0 = 0; f0 < d.F; f0 += V) {
        const int64_t cnt = std::min<int64_t>(V, d.F - f0);
        vec gv;
        ivec av;
        if (cnt == V) {
          gv = S::load(g + f0);
          av = S::from_bytes(am + f0);
        } else {
          T gt[V] = {};
          uint8_t at[V];
          std::memset(at, kArgmaxReluZero, V);
          std::memcpy(gt, g + f0, cnt * sizeof(T));
          std::memcpy(at, am + f0, cnt);
          gv = S::load(gt);
          av = S::from_bytes(at);
        }
        const vec zero = S::splat(0);
        bsum += S::select(av != S::isplat(kArgmaxReluZero), gv, zero);
        for (int64_t w = 0; w < win; ++w) S::store(Gm + (w * d.Kpad + k) * d.Fpad + f0, S::select(av == S::isplat(w), gv, zero));
      }
      if (a.need_bias) gb[k] += S::hsum(bsum);
    }
    if (a.need_weight) {
      pack_input(d, a.input + n * CHW, X);
      for (int64_t kb = 0; kb < d.Kpad / KB; ++kb) {
        for (int64_t t0 = 0; t0 < d.CRS; t0 += TB) {
          vec acc[KB][TB];
          for (int q = 0; q < KB; ++q)
            for (int tb = 0; tb < TB; ++tb) acc[q][tb] = S::splat(0);
          for (int64_t i = 0; i < d.pkh; ++i) {
            for (int64_t j = 0; j < d.pkw; ++j) {
              const T* xp[TB];
              for (int tb = 0; tb < TB; ++tb) {
                const int64_t t = t0 + tb;
                if (t < d.CRS) {
                  const int64_t c = t / (d.R * d.S), r = t / d.S % d.R, s = t % d.S;
                  xp[tb] = X + d.plane(c, i * d.sh + r * d.dh, j * d.sw + s * d.dw);
                } else {
                  xp[tb] = zeros.data();
                }
              }
              const T* gp = Gm + ((i * d.pkw + j) * d.Kpad + kb * KB) * d.Fpad;
              for (int64_t f0 = 0; f0 < Fv; f0 += V) {
                vec x[TB];
                for (int tb = 0; tb < TB; ++tb) x[tb] = S::load(xp[tb] + f0);
                for (int q = 0; q < KB; ++q) {
                  const vec gq = S::load(gp + q * d.Fpad + f0);
                  for (int tb = 0; tb < TB; ++tb) acc[q][tb] += gq * x[tb];
                }
              }
            }
          }
          for (int q = 0; q < KB; ++q)
            for (int tb = 0; tb < TB && t0 + tb < d.CRS; ++tb) gw[(kb * KB + q) * d.CRS + t0 + tb] += S::hsum(acc[q][tb]);
        }
      }
    }
    if (a.grad_input) {
      std::fill(dX, dX + d.pack_elems(), T(0));
      for (int64_t f0 = 0; f0 < Fv; f0 += V) {
        for (int64_t i = 0; i < d.pkh; ++i) {
          for (int64_t j = 0; j < d.pkw; ++j) {
            const T* gp = Gm + ((i * d.pkw + j) * d.Kpad) * d.Fpad + f0;
            for (int64_t kb = 0; kb < d.Kpad / KB; ++kb) {
              vec g[KB];
              for (int q = 0; q < KB; ++q) g[q] = S::load(gp + (kb * KB + q) * d.Fpad);
              const T* wp = a.wpk + kb * d.CRS * KB;
              for (int64_t c = 0; c < d.C; ++c) {
                for (int64_t r = 0; r < d.R; ++r) {
                  T* dxr = dX + d.plane(c, i * d.sh + r * d.dh, j * d.sw) + f0;
                  for (int64_t s = 0; s < d.S; ++s, wp += KB) {
                    vec acc = g[0] * wp[0];
                    for (int q = 1; q < KB; ++q) acc += g[q] * wp[q];
                    T* p = dxr + s * d.dw * d.Fpad;
                    S::store(p, S::load(p) + acc);
                  }
                }
              }
            }
          }
        }
      }
      unpack_add(d, dX, a.grad_input + n * CHW);
    }
  }
}

// Bias + max-pool + ReLU over planes [p0, p1) of a dense conv output (ATen path), vectorised over
// pooled columns. Rows of at least V pooled columns are covered by full vectors, the last one
// overlapping its neighbour (it recomputes and rewrites identical values), so no tail loop runs;
// narrower rows gather into a padded temporary.
template <typename T>
void bias_relu_pool_range(const PoolArgs<T>& a, int64_t p0, int64_t p1) {
  constexpr int V = kLanes<T>;
  using S = Simd<T, V>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  const ConvPoolShape& s = *a.s;
  for (int64_t plane = p0; plane < p1; ++plane) {
    const T b = a.bias ? a.bias[plane % s.K] : T(0);
    const T* src = a.conv + plane * s.P * s.Q;
    T* dst = a.out + plane * s.PH * s.PW;
    uint8_t* am = a.argmax ? a.argmax + plane * s.PH * s.PW : nullptr;
    for (int64_t ph = 0; ph < s.PH; ++ph) {
      for (int64_t pw0 = 0; pw0 < s.PW; pw0 += V) {
        const bool full = s.PW >= V;
        if (full) pw0 = std::min<int64_t>(pw0, s.PW - V);
        const int64_t cnt = full ? V : s.PW - pw0;
        vec best = S::splat(0);
        ivec arg = S::isplat(0);
        for (int64_t i = 0; i < s.pool_kh; ++i) {
          for (int64_t j = 0; j < s.pool_kw; ++j) {
            const T* p = src + (ph * s.pool_sh + i) * s.Q + pw0 * s.pool_sw + j;
            vec v;
            if (full && s.pool_sw == 1) {
              v = S::load(p);
            } else if (full && s.pool_sw == 2) {
              v = S::load_even(p);
            } else {
              T tmp[V] = {};
              for (int64_t l = 0; l < cnt; ++l) tmp[l] = p[l * s.pool_sw];
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
        if (full) {
          S::store(dst + ph * s.PW + pw0, S::relu(best));
          if (am) std::memcpy(am + ph * s.PW + pw0, &bytes, V);
        } else {
          T o[V];
          S::store(o, S::relu(best));
          std::memcpy(dst + ph * s.PW + pw0, o, cnt * sizeof(T));
          if (am) std::memcpy(am + ph * s.PW + pw0, &bytes, cnt);
        }
      }
    }
  }
}

// Whether p[0..n) holds no NaN or infinity (x - x is 0 exactly for finite x, NaN otherwise).
template <typename T>
bool all_finite(const T* p, int64_t n) {
  constexpr int V = kLanes<T>;
  using S = Simd<T, V>;
  typename S::vec acc = S::splat(0);
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    const auto x = S::load(p + i);
    acc += x - x;
  }
  T tail = 0;
  for (; i < n; ++i) tail += p[i] - p[i];
  return S::hsum(acc) + tail == T(0);
}

// Entry points for this instruction set (instantiated by the including .cpp).
template <typename T, int KB>
void direct_forward_range(const DirectFwdArgs<T>& a, int64_t n0, int64_t n1) {
  direct_forward<T, kLanes<T>, KB>(a, n0, n1);
}
template <typename T, int KB>
void direct_backward_range(const DirectBwdArgs<T>& a, int64_t n0, int64_t n1, T* gw, T* gb) {
  direct_backward<T, kLanes<T>, KB>(a, n0, n1, gw, gb);
}
