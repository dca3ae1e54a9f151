// Kernel bodies of the CPU conv2d_relu_maxpool2d, compiled once per instruction set.
// NO include guard on purpose: csrc/cpu/conv2d_relu_maxpool2d.cpp includes it once per
// instruction set through cpu_isa_variants.h, which defines `constexpr int kVecBytes` (the
// register width in bytes) in each copy's namespace, inside a target region (see cpu_simd.h). Standard headers,
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
  // Zero-extends V bytes into the lanes. GCC 12 lowers __builtin_convertvector from bytes one lane
  // at a time (an insert per lane); the AVX2 / AVX-512 regions use the one-instruction extension.
  static LIGHTNET_OPS_INLINE ivec from_bytes(const uint8_t* p) {
    ivec out;
#if LIGHTNET_OPS_X86_DISPATCH
    if constexpr (kVecBytes == 64 && sizeof(ivec) == 64) {
      const __m512i r = sizeof(lane_int) == 4 ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                                              : _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
      std::memcpy(&out, &r, sizeof(out));
      return out;
    } else if constexpr (kVecBytes >= 32 && sizeof(ivec) == 32 && sizeof(lane_int) == 4) {
      const __m256i r = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
      std::memcpy(&out, &r, sizeof(out));
      return out;
    } else if constexpr (kVecBytes >= 32 && sizeof(ivec) == 32) {
      int32_t four;  // 4 lanes of int64: 4 bytes
      std::memcpy(&four, p, sizeof(four));
      const __m256i r = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
      std::memcpy(&out, &r, sizeof(out));
      return out;
    }
#endif
    bytes b;
    std::memcpy(&b, p, sizeof(b));
    out = __builtin_convertvector(b, ivec);
    return out;
  }
};

// Keeps a loaded vector in a register instead of letting the compiler re-load it as a memory
// operand of every instruction that uses it (which makes the grad_weight loop load-bound).
#if LIGHTNET_OPS_X86_DISPATCH
#define LIGHTNET_OPS_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define LIGHTNET_OPS_IN_REGISTER(v) (void)0
#endif

template <typename T>
constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));

// A zero-filled scratch array whose data() is 64-byte aligned (full-vector loads at multiples of
// the width never split a cache line).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n, T fill = T(0)) : buf_(n + 64 / sizeof(T), fill) {
    const auto addr = reinterpret_cast<uintptr_t>(buf_.data());
    data_ = buf_.data() + ((64 - addr % 64) % 64) / sizeof(T);
  }
  T* data() { return data_; }

 private:
  std::vector<T> buf_;
  T* data_;
};

// v if keep is 1, +0 if keep is 0, without a branch (and without multiplying: 0 * NaN is NaN).
template <typename T>
LIGHTNET_OPS_INLINE T mask_bits(T v, int64_t keep) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U bits;
  std::memcpy(&bits, &v, sizeof(T));
  bits &= static_cast<U>(-keep);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Copies n bytes (dst and src do not overlap) with at most two fixed-size moves per power-of-two
// size class, the second overlapping the first: short rows (pooled rows of a few elements) cost
// a handful of instructions instead of a memcpy call or a loop per element. Reads and writes
// only [0, n).
LIGHTNET_OPS_INLINE void copy_row_bytes(void* dst_, const void* src_, int64_t n) {
  auto* dst = static_cast<unsigned char*>(dst_);
  const auto* src = static_cast<const unsigned char*>(src_);
  if (n >= 64) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) std::memcpy(dst + i, src + i, 64);
    if (i < n) std::memcpy(dst + n - 64, src + n - 64, 64);
  } else if (n >= 32) {
    std::memcpy(dst, src, 32);
    std::memcpy(dst + n - 32, src + n - 32, 32);
  } else if (n >= 16) {
    std::memcpy(dst, src, 16);
    std::memcpy(dst + n - 16, src + n - 16, 16);
  } else if (n >= 8) {
    std::memcpy(dst, src, 8);
    std::memcpy(dst + n - 8, src + n - 8, 8);
  } else if (n >= 4) {
    std::memcpy(dst, src, 4);
    std::memcpy(dst + n - 4, src + n - 4, 4);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

// Packs one sample's input (C, H, W) into the phase planes Z (see Direct); unused lanes are 0.
template <typename T>
LIGHTNET_OPS_INLINE void pack_input(const Direct& d, const T* in, T* Z) {
  for (int64_t c = 0; c < d.C; ++c) {
    for (int64_t a = 0; a < d.Mh; ++a) {
      for (int64_t b = 0; b < d.Mw; ++b) {
        T* dst = Z + ((c * d.Mh + a) * d.Mw + b) * d.Zlen;
        const int64_t x0 = b - d.pad_w;  // input column of X = 0
        const int64_t lo = x0 >= 0 ? 0 : std::min(d.PWs, (-x0 + d.Mw - 1) / d.Mw);
        const int64_t hi = std::max(lo, d.W - 1 - x0 < 0 ? 0 : std::min(d.PWs, (d.W - 1 - x0) / d.Mw + 1));
        for (int64_t Y = 0; Y < d.PHe; ++Y) {
          T* row = dst + Y * d.PWs;
          const int64_t y = Y * d.Mh + a - d.pad_h;
          if (y < 0 || y >= d.H) {
            std::fill(row, row + d.PWs, T(0));
            continue;
          }
          const T* src = in + (c * d.H + y) * d.W + x0;
          std::fill(row, row + lo, T(0));
          if (d.Mw == 1) {
            std::memcpy(row + lo, src + lo, (hi - lo) * sizeof(T));
          } else if (d.Mw == 2) {
            // Even columns with in-register shuffles (load_even reads no further than the last
            // element it returns, so nothing past the input row is read).
            int64_t X = lo;
            for (; X + 8 <= hi; X += 8) Simd<T, 8>::store(row + X, Simd<T, 8>::load_even(src + 2 * X));
            for (; X + 4 <= hi; X += 4) Simd<T, 4>::store(row + X, Simd<T, 4>::load_even(src + 2 * X));
            for (; X < hi; ++X) row[X] = src[2 * X];
          } else {
            for (int64_t X = lo; X < hi; ++X) row[X] = src[X * d.Mw];
          }
          std::fill(row + hi, row + d.PWs, T(0));
        }
        std::fill(dst + d.PHe * d.PWs, dst + d.Zlen, T(0));
      }
    }
  }
}

// Writes the window-shift planes dX[c][dy][dx][f] (see Direct) into the sample's input gradient
// (C, H, W): per phase plane (c, a, b) of the input, the planes with dy % Mh == a and dx % Mw == b
// are summed with vector loads shifted by (dy / Mh) * PWs + dx / Mw (lanes past a plane's pooled
// columns, and its margins, are zero), then the phase plane is un-packed like pack_input packs it.
// Every input element belongs to exactly one phase-plane position, so it is written once; elements
// that no window reads are not written (the caller zeroes the sample's gradient first).
template <typename T, int V>
LIGHTNET_OPS_INLINE void unshift_add(const Direct& d, const T* dX, T* tmp, T* gi) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  for (int64_t c = 0; c < d.C; ++c) {
    for (int64_t a = 0; a < d.Mh; ++a) {
      for (int64_t b = 0; b < d.Mw; ++b) {
        for (int64_t e0 = 0; e0 < d.Lz; e0 += V) {
          vec acc = S::splat(0);
          // dy = a + u * Mh reads shift u rows, dx = b + v * Mw shift v columns.
          for (int64_t dy = a, u = 0; dy < d.Dy; dy += d.Mh, ++u) {
            const T* src = dX + ((c * d.Dy + dy) * d.Dx + b) * d.Xstride + d.Xmg + e0 - u * d.PWs;
            for (int64_t dx = b; dx < d.Dx; dx += d.Mw, src += d.Mw * d.Xstride - 1) acc += S::load(src);
          }
          S::store(tmp + e0, acc);
        }
        const int64_t x0 = b - d.pad_w;  // input column of X = 0
        const int64_t lo = x0 >= 0 ? 0 : std::min(d.PWs, (-x0 + d.Mw - 1) / d.Mw);
        const int64_t hi = std::max(lo, d.W - 1 - x0 < 0 ? 0 : std::min(d.PWs, (d.W - 1 - x0) / d.Mw + 1));
        for (int64_t Y = 0; Y < d.PHe; ++Y) {
          const int64_t y = Y * d.Mh + a - d.pad_h;
          if (y < 0 || y >= d.H) continue;
          const T* row = tmp + Y * d.PWs;
          T* dst = gi + (c * d.H + y) * d.W + x0;
          for (int64_t X = lo; X < hi; ++X) dst[X * d.Mw] = row[X];
        }
      }
    }
  }
}

// Writes sample n's output and argmax from the packed position layout (rows of PWs lanes, one
// plane of Fpad lanes per output channel), dropping the lanes past each pooled row.
template <typename T>
LIGHTNET_OPS_INLINE void store_pooled_sample(const DirectFwdArgs<T>& a, int64_t n, const T* obuf,
                                             const uint8_t* abuf) {
  const Direct& d = *a.d;
  const int64_t F = d.PH * d.PW;
  T* out = a.out + n * d.K * F;
  uint8_t* am = a.argmax ? a.argmax + n * d.K * F : nullptr;
  for (int64_t k = 0; k < d.K; ++k) {
    const T* o = obuf + k * d.Fpad;
    const uint8_t* ab = abuf + k * d.Fpad;
    for (int64_t ph = 0; ph < d.PH; ++ph) {
      copy_row_bytes(out + k * F + ph * d.PW, o + ph * d.PWs, d.PW * int64_t(sizeof(T)));
      if (am) copy_row_bytes(am + k * F + ph * d.PW, ab + ph * d.PWs, d.PW);
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
  std::vector<T> zbuf(d.pack_elems());
  Scratch<T> obuf(d.K * d.Fpad);              // output in the packed position layout
  std::vector<uint8_t> abuf(d.K * d.Fpad);    // argmax likewise
  T* Z = zbuf.data();
  const int64_t CHW = d.C * d.H * d.W;
  for (int64_t n = n0; n < n1; ++n) {
    pack_input(d, a.input + n * CHW, Z);
    for (int64_t f0 = 0; f0 < d.Fs; f0 += V) {
      const T* zf = Z + f0;
      for (int64_t kb = 0; kb < d.Kpad / KB; ++kb) {
        const T* wk = a.wpk + kb * d.CRS * KB;
        vec best[KB];
        ivec arg[KB];
        for (int64_t w = 0; w < d.WIN; ++w) {
          vec acc[KB];
          LIGHTNET_OPS_UNROLL
          for (int q = 0; q < KB; ++q) acc[q] = S::splat(a.bpk[kb * KB + q]);
          const int64_t* toff = d.toff.data() + w * d.CRS;
          const T* wp = wk;
          for (int64_t t = 0; t < d.CRS; ++t, wp += KB) {
            const vec x = S::load(zf + toff[t]);
            LIGHTNET_OPS_UNROLL
            for (int q = 0; q < KB; ++q) acc[q] += x * wp[q];
          }
          if (w == 0) {
            LIGHTNET_OPS_UNROLL
            for (int q = 0; q < KB; ++q) {
              best[q] = acc[q];
              arg[q] = S::isplat(0);
            }
          } else {
            const ivec off = S::isplat(w);
            LIGHTNET_OPS_UNROLL
            for (int q = 0; q < KB; ++q) {
              const ivec take = S::pool_takes(acc[q], best[q]);
              best[q] = S::select(take, acc[q], best[q]);
              arg[q] = S::iselect(take, off, arg[q]);
            }
          }
        }
        LIGHTNET_OPS_UNROLL
        for (int q = 0; q < KB; ++q) {  // a constant trip count, so GCC can unroll it as asked
          const int64_t k = kb * KB + q;
          if (k >= d.K) break;
          S::store(obuf.data() + k * d.Fpad + f0, S::relu(best[q]));
          if (a.argmax) {
            const auto bytes = S::to_bytes(S::iselect(S::relu_passes(best[q]), arg[q], S::isplat(kArgmaxReluZero)));
            std::memcpy(abuf.data() + k * d.Fpad + f0, &bytes, V);
          }
        }
      }
    }
    store_pooled_sample(a, n, obuf.data(), abuf.data());
  }
}

// Winograd F(2x2, 3x3) output transform of one 2x2 output tile, fused with the pool: the
// products m (4x4, row-major) go through A^T m A, plus the bias b, to the window's four conv
// values, whose maximum (stock's rule: first maximum, NaN wins) and its window offset come back in
// best / arg (before ReLU). check turns NaN once a conv value is not finite.
template <typename T, int V>
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
  arg = S::isplat(0);
  LIGHTNET_OPS_UNROLL
  for (int q = 1; q < 4; ++q) {
    const ivec take = S::pool_takes(y[q], best);
    best = S::select(take, y[q], best);
    arg = S::iselect(take, S::isplat(q), arg);
  }
}

// Winograd F(2x2, 3x3) variant of direct_forward, for samples [n0, n1) (3x3 filter, stride 1,
// dilation 1, 2x2 pool with stride 2: each pool window is one Winograd output tile, and with the
// phase planes Z the 4x4 input tile of every pooled position f is 16 vectors over f). Per vector
// of positions: the input transform per input channel, then per output channel 16 sums over the
// input channels (16 multiplies per tile and channel pair instead of 36) and the output transform,
// whose four values go straight into bias, max-pool, ReLU and argmax. A sample whose transformed
// input or conv values are not all finite is recomputed by direct_forward (the transforms place
// NaNs and infinities differently, and can overflow where a direct sum would not).
template <typename T, int V, int KB>
LIGHTNET_OPS_INLINE void direct_winograd_forward(const DirectFwdArgs<T>& a, int64_t n0, int64_t n1) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  const Direct& d = *a.d;
  Scratch<T> zbuf(d.pack_elems());
  Scratch<T> vbuf(d.C * 16 * V);                // transformed input tiles of one vector of positions
  Scratch<T> mbuf(d.K * 16 * V);                // and their products with the transformed weights
  Scratch<T> obuf(d.K * d.Fpad);
  std::vector<uint8_t> abuf(d.K * d.Fpad);
  T* Z = zbuf.data();
  const int64_t CHW = d.C * d.H * d.W;
  // Offset in Z of input tile element (i, j) of channel c (add f): phase plane (i % 2, j % 2),
  // shifted by (i / 2) rows and (j / 2) columns.
  const auto tile_off = [&](int64_t c, int i, int j) {
    return ((c * 2 + i % 2) * 2 + j % 2) * d.Zlen + (i / 2) * d.PWs + j / 2;
  };
  for (int64_t n = n0; n < n1; ++n) {
    pack_input(d, a.input + n * CHW, Z);
    vec check = S::splat(0);
    for (int64_t f0 = 0; f0 < d.Fs; f0 += V) {
      for (int64_t c = 0; c < d.C; ++c) {  // B^T d B
        vec x[4][4], t[4][4];
        LIGHTNET_OPS_UNROLL
        for (int i = 0; i < 4; ++i)
          LIGHTNET_OPS_UNROLL
          for (int j = 0; j < 4; ++j) x[i][j] = S::load(Z + tile_off(c, i, j) + f0);
        LIGHTNET_OPS_UNROLL
        for (int j = 0; j < 4; ++j) {
          t[0][j] = x[0][j] - x[2][j];
          t[1][j] = x[1][j] + x[2][j];
          t[2][j] = x[2][j] - x[1][j];
          t[3][j] = x[1][j] - x[3][j];
        }
        T* vc = vbuf.data() + c * 16 * V;
        LIGHTNET_OPS_UNROLL
        for (int i = 0; i < 4; ++i) {
          const vec v0 = t[i][0] - t[i][2], v1 = t[i][1] + t[i][2], v2 = t[i][2] - t[i][1], v3 = t[i][1] - t[i][3];
          S::store(vc + (i * 4 + 0) * V, v0);
          S::store(vc + (i * 4 + 1) * V, v1);
          S::store(vc + (i * 4 + 2) * V, v2);
          S::store(vc + (i * 4 + 3) * V, v3);
          check += (v0 - v0) + (v1 - v1) + (v2 - v2) + (v3 - v3);  // NaN once anything is not finite
        }
      }
      // M[k][xi] = sum over c of U[k][c][xi] * V[c][xi], two output channels x 8 positions per
      // register block: each loaded V vector serves both channels.
      for (int64_t k0 = 0; k0 < d.K; k0 += 2) {
        const int64_t k1 = std::min(k0 + 1, d.K - 1);
        for (int x0 = 0; x0 < 16; x0 += 8) {
          vec acc0[8], acc1[8];
          LIGHTNET_OPS_UNROLL
          for (int x = 0; x < 8; ++x) acc0[x] = acc1[x] = S::splat(0);
          const T* u0 = a.wino_u + k0 * d.C * 16 + x0;
          const T* u1 = a.wino_u + k1 * d.C * 16 + x0;
          const T* vc = vbuf.data() + x0 * V;
          for (int64_t c = 0; c < d.C; ++c, u0 += 16, u1 += 16, vc += 16 * V) {
            LIGHTNET_OPS_UNROLL
            for (int x = 0; x < 8; ++x) {
              vec v = S::load(vc + x * V);
              LIGHTNET_OPS_IN_REGISTER(v);  // one load for both channels
              acc0[x] += v * u0[x];
              acc1[x] += v * u1[x];
            }
          }
          LIGHTNET_OPS_UNROLL
          for (int x = 0; x < 8; ++x) {
            S::store(mbuf.data() + (k0 * 16 + x0 + x) * V, acc0[x]);
            S::store(mbuf.data() + (k1 * 16 + x0 + x) * V, acc1[x]);
          }
        }
      }
      for (int64_t k = 0; k < d.K; ++k) {
        vec m[16];
        LIGHTNET_OPS_UNROLL
        for (int xi = 0; xi < 16; ++xi) m[xi] = S::load(mbuf.data() + (k * 16 + xi) * V);
        vec best;
        ivec arg;
        winograd_output_pool_tile<T, V>(m, S::splat(a.bias ? a.bias[k] : T(0)), check, best, arg);
        S::store(obuf.data() + k * d.Fpad + f0, S::relu(best));
        if (a.argmax) {
          const auto bytes = S::to_bytes(S::iselect(S::relu_passes(best), arg, S::isplat(kArgmaxReluZero)));
          std::memcpy(abuf.data() + k * d.Fpad + f0, &bytes, V);
        }
      }
    }
    // (The check also covers the dropped lanes past the pooled rows: a non-finite input element
    // that only they read sends the sample to the direct kernel too, which is merely slower.)
    if (S::hsum(check) != T(0)) {
      direct_forward<T, V, KB>(a, n, n + 1);
      continue;
    }
    store_pooled_sample(a, n, obuf.data(), abuf.data());
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

// dst[2i] = even[i], dst[2i + 1] = odd[i] for the n elements of dst, eight pairs per step through
// two in-register shuffles instead of a scalar move per element. Reads up to 8 elements past the
// last pair of each source row (the caller's buffer has that slack); writes only dst[0..n). A
// short tail is copied out of one stored half only: a load spanning two recent stores cannot be
// forwarded from them and stalls.
template <typename T>
LIGHTNET_OPS_INLINE void interleave_rows(const T* even, const T* odd, T* dst, int64_t n) {
  using H = Simd<T, 8>;
  using lanes = typename H::ivec;
  const lanes lo_idx = {0, 8, 1, 9, 2, 10, 3, 11}, hi_idx = {4, 12, 5, 13, 6, 14, 7, 15};
  for (int64_t x = 0; x < n; x += 16, even += 8, odd += 8) {
    const typename H::vec e = H::load(even), o = H::load(odd);
    const typename H::vec lo = __builtin_shuffle(e, o, lo_idx), up = __builtin_shuffle(e, o, hi_idx);
    const int64_t rest = n - x;
    if (rest >= 16) {
      H::store(dst + x, lo);
      H::store(dst + x + 8, up);
      continue;
    }
    T half[8];
    if (rest >= 8) {
      H::store(dst + x, lo);
      H::store(half, up);
      copy_row_bytes(dst + x + 8, half, (rest - 8) * int64_t(sizeof(T)));
    } else {
      H::store(half, lo);
      copy_row_bytes(dst + x, half, rest * int64_t(sizeof(T)));
    }
  }
}

// grad_input of one sample by the adjoint of the Winograd F(2x2, 3x3) forward (shapes as for
// direct_winograd_forward), from the masked gradient planes Gm[w][k][f] of direct_backward: per
// vector of pooled positions, P_k = A Gm_k A^T (the 2x2 window gradient into the transformed
// domain), per input channel M_c = sum over k of U[k][c] (.) P_k (16 multiply-adds per tile and
// channel pair instead of 36), and B M_c B^T, the tile's 4x4 input gradient, added into dZ (the
// phase-plane layout of pack_input, in which neighbouring tiles overlap). dZ is then unpacked into
// gi, every element written. Returns false if a written value is not finite: the
// caller then uses the direct grad_input (the transforms place NaNs and infinities differently).
template <typename T, int V>
LIGHTNET_OPS_INLINE bool winograd_grad_input(const Direct& d, const T* U, const T* Gm, int64_t Fv, T* dZ, T* pbuf,
                                             T* mbuf, T* gi) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  std::fill(dZ, dZ + d.pack_elems(), T(0));
  const auto tile_off = [&](int64_t c, int i, int j) {
    return ((c * 2 + i % 2) * 2 + j % 2) * d.Zlen + (i / 2) * d.PWs + j / 2;
  };
  for (int64_t f0 = 0; f0 < Fv; f0 += V) {
    for (int64_t k = 0; k < d.K; ++k) {  // A Gm A^T; Gm's window offset w = i * 2 + j
      vec g[4];
      LIGHTNET_OPS_UNROLL
      for (int w = 0; w < 4; ++w) g[w] = S::load(Gm + (w * d.Kpad + k) * d.Fpad + f0);
      vec h[4][2];
      LIGHTNET_OPS_UNROLL
      for (int j = 0; j < 2; ++j) {
        h[0][j] = g[j];
        h[1][j] = g[j] + g[2 + j];
        h[2][j] = g[j] - g[2 + j];
        h[3][j] = -g[2 + j];
      }
      T* p = pbuf + k * 16 * V;
      LIGHTNET_OPS_UNROLL
      for (int r = 0; r < 4; ++r) {
        S::store(p + (r * 4 + 0) * V, h[r][0]);
        S::store(p + (r * 4 + 1) * V, h[r][0] + h[r][1]);
        S::store(p + (r * 4 + 2) * V, h[r][0] - h[r][1]);
        S::store(p + (r * 4 + 3) * V, -h[r][1]);
      }
    }
    // M_c, in register blocks of 2 input channels x 8 positions (each P vector loaded once for both).
    for (int64_t c0 = 0; c0 < d.C; c0 += 2) {
      const int64_t c1 = std::min(c0 + 1, d.C - 1);
      for (int x0 = 0; x0 < 16; x0 += 8) {
        vec acc0[8], acc1[8];
        LIGHTNET_OPS_UNROLL
        for (int x = 0; x < 8; ++x) acc0[x] = acc1[x] = S::splat(0);
        const T* p = pbuf + x0 * V;
        for (int64_t k = 0; k < d.K; ++k, p += 16 * V) {
          const T* u0 = U + (k * d.C + c0) * 16 + x0;
          const T* u1 = U + (k * d.C + c1) * 16 + x0;
          LIGHTNET_OPS_UNROLL
          for (int x = 0; x < 8; ++x) {
            vec v = S::load(p + x * V);
            LIGHTNET_OPS_IN_REGISTER(v);
            acc0[x] += v * u0[x];
            acc1[x] += v * u1[x];
          }
        }
        LIGHTNET_OPS_UNROLL
        for (int x = 0; x < 8; ++x) {
          S::store(mbuf + (c0 * 16 + x0 + x) * V, acc0[x]);
          S::store(mbuf + (c1 * 16 + x0 + x) * V, acc1[x]);
        }
      }
    }
    for (int64_t c = 0; c < d.C; ++c) {
      vec m[16];
      LIGHTNET_OPS_UNROLL
      for (int xi = 0; xi < 16; ++xi) m[xi] = S::load(mbuf + (c * 16 + xi) * V);
      vec t[4][4];  // rows: the transpose of the forward's B^T d
      LIGHTNET_OPS_UNROLL
      for (int q = 0; q < 4; ++q) {
        t[0][q] = m[q];
        t[1][q] = m[4 + q] - m[8 + q] + m[12 + q];
        t[2][q] = m[4 + q] + m[8 + q] - m[q];
        t[3][q] = -m[12 + q];
      }
      LIGHTNET_OPS_UNROLL
      for (int i = 0; i < 4; ++i) {  // columns likewise
        const vec dd[4] = {t[i][0], t[i][1] - t[i][2] + t[i][3], t[i][1] + t[i][2] - t[i][0], -t[i][3]};
        LIGHTNET_OPS_UNROLL
        for (int j = 0; j < 4; ++j) {
          T* z = dZ + tile_off(c, i, j) + f0;
          S::store(z, S::load(z) + dd[j]);
        }
      }
    }
  }
  // Row y of channel c interleaves the rows Y = (y + pad_h) / 2 of its two column-phase planes:
  // column x is element (x + pad_w) / 2 of the phase (x + pad_w) % 2 row.
  const int64_t covered = std::max<int64_t>(0, std::min(d.W, 2 * d.PWs - d.pad_w));  // columns tiles reach
  const int64_t odd = d.pad_w % 2, first = (d.pad_w + odd) / 2;  // odd pad_w: column 0 is phase 1's
  for (int64_t c = 0; c < d.C; ++c) {
    for (int64_t y = 0; y < d.H; ++y) {
      const int64_t yy = y + d.pad_h, Y = yy / 2;
      T* dst = gi + (c * d.H + y) * d.W;
      if (Y >= d.PHe) {
        std::fill(dst, dst + d.W, T(0));
        continue;
      }
      const T* even = dZ + ((c * 2 + yy % 2) * 2 + 0) * d.Zlen + Y * d.PWs;
      const T* odd_row = dZ + ((c * 2 + yy % 2) * 2 + 1) * d.Zlen + Y * d.PWs;
      if (odd && covered > 0) dst[0] = odd_row[first - 1];
      interleave_rows(even + first, odd_row + first, dst + odd, std::max<int64_t>(0, covered - odd));
      std::fill(dst + covered, dst + d.W, T(0));
    }
  }
  // Not finite anywhere (the transforms place NaNs and infinities differently from a direct sum):
  // the caller recomputes the sample directly.
  return all_finite(gi, d.C * d.H * d.W);
}

constexpr int kTermBlock = 3;  // filter taps per grad_weight register block (3: one 3-wide row)

// Backward for samples [n0, n1); adds this range's weight / bias gradients, per lane, into
// gw [Kpad][CRS][kPartialLanes] and gb [Kpad][kPartialLanes] (null when not needed).
template <typename T, int V, int KB>
LIGHTNET_OPS_INLINE void direct_backward(const DirectBwdArgs<T>& a, int64_t n0, int64_t n1, T* gw, T* gb) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  constexpr int TB = kTermBlock;
  static_assert(V <= kPartialLanes, "partial sums hold at most kPartialLanes lanes");
  const Direct& d = *a.d;
  const int64_t Fv = (d.Fs + V - 1) / V * V;  // lanes the vector loops touch (<= Fpad)
  Scratch<T> zbuf(a.need_weight ? d.pack_elems() : 0);
  const bool wino_gi = a.grad_input && a.wino_u;
  Scratch<T> wzbuf(wino_gi ? d.pack_elems() + 8 : 0);  // Winograd grad_input: dZ (+ interleave_rows' slack),
  Scratch<T> wpbuf(wino_gi ? d.K * 16 * V : 0);      // the P_k and
  Scratch<T> wmbuf(wino_gi ? d.C * 16 * V : 0);      // the M_c of one vector of positions
  // The direct grad_input's window-shift planes (margins and tails stay zero) and one summed
  // phase plane: made when a sample first needs them (with the Winograd grad_input, only samples
  // that are not all finite do).
  std::optional<Scratch<T>> dxbuf, phbuf;
  Scratch<T> gmbuf(d.grad_elems());                  // rows k >= K stay zero
  std::vector<T> gsbuf(d.Fpad, T(0));                // one gradient plane, packed layout
  std::vector<uint8_t> asbuf(d.Fpad, kArgmaxReluZero);  // its argmax; gaps never route
  T* Z = zbuf.data();
  T* Gm = gmbuf.data();  // Gm[w][k][f]: pooled gradient where argmax == w, else 0
  const int64_t CHW = d.C * d.H * d.W, F = d.PH * d.PW;
  for (int64_t n = n0; n < n1; ++n) {
    // Masked gradients, and the bias gradient (sum over every live pooled element).
    for (int64_t k = 0; k < d.K; ++k) {
      const T* g = a.grad_out + (n * d.K + k) * F;
      const uint8_t* am = a.argmax + (n * d.K + k) * F;
      // Pooled rows into packed rows; the lanes past each row keep their 0 / sentinel fill.
      for (int64_t ph = 0; ph < d.PH; ++ph) {
        copy_row_bytes(gsbuf.data() + ph * d.PWs, g + ph * d.PW, d.PW * int64_t(sizeof(T)));
        copy_row_bytes(asbuf.data() + ph * d.PWs, am + ph * d.PW, d.PW);
      }
      vec bsum = S::splat(0);
      const vec zero = S::splat(0);
      for (int64_t f0 = 0; f0 < Fv; f0 += V) {
        const vec gv = S::load(gsbuf.data() + f0);
        const ivec av = S::from_bytes(asbuf.data() + f0);
        bsum += S::select(av != S::isplat(kArgmaxReluZero), gv, zero);
        for (int64_t w = 0; w < d.WIN; ++w)
          S::store(Gm + (w * d.Kpad + k) * d.Fpad + f0, S::select(av == S::isplat(w), gv, zero));
      }
      if (gb) S::store(gb + k * kPartialLanes, S::load(gb + k * kPartialLanes) + bsum);
    }
    if (a.need_weight) {
      pack_input(d, a.input + n * CHW, Z);
      for (int64_t kb = 0; kb < d.Kpad / KB; ++kb) {
        for (int64_t t0 = 0; t0 < d.CRS; t0 += TB) {
          const int nt = static_cast<int>(std::min<int64_t>(TB, d.CRS - t0));
          vec acc[KB][TB];
          LIGHTNET_OPS_UNROLL
          for (int q = 0; q < KB; ++q)
            LIGHTNET_OPS_UNROLL
            for (int tb = 0; tb < TB; ++tb) acc[q][tb] = S::splat(0);
          for (int64_t w = 0; w < d.WIN; ++w) {
            const T* xp[TB];
            LIGHTNET_OPS_UNROLL
            for (int tb = 0; tb < TB; ++tb) xp[tb] = Z + d.toff[w * d.CRS + t0 + std::min(tb, nt - 1)];
            const T* gp = Gm + (w * d.Kpad + kb * KB) * d.Fpad;
            for (int64_t f0 = 0; f0 < Fv; f0 += V) {
              vec x[TB];
              LIGHTNET_OPS_UNROLL
              for (int tb = 0; tb < TB; ++tb) x[tb] = S::load(xp[tb] + f0);
              LIGHTNET_OPS_UNROLL
              for (int q = 0; q < KB; ++q) {
                vec gq = S::load(gp + q * d.Fpad + f0);
                LIGHTNET_OPS_IN_REGISTER(gq);
                LIGHTNET_OPS_UNROLL
                for (int tb = 0; tb < TB; ++tb) acc[q][tb] += gq * x[tb];
              }
            }
          }
          LIGHTNET_OPS_UNROLL
          for (int q = 0; q < KB; ++q) {
            LIGHTNET_OPS_UNROLL
            for (int tb = 0; tb < nt; ++tb) {
              T* dst = gw + ((kb * KB + q) * d.CRS + t0 + tb) * kPartialLanes;
              S::store(dst, S::load(dst) + acc[q][tb]);
            }
          }
        }
      }
    }
    if (wino_gi && winograd_grad_input<T, V>(d, a.wino_u, Gm, Fv, wzbuf.data(), wpbuf.data(), wmbuf.data(),
                                             a.grad_input + n * CHW)) {
      continue;  // (grad_input is the last part of the sample's backward)
    }
    if (a.grad_input) {
      if (!dxbuf) {
        dxbuf.emplace(d.dx_elems());
        phbuf.emplace(d.Lz);
      }
      T* dX = dxbuf->data();
      // Every (window offset, tap) pair adds weight * masked gradient into its window-shift plane
      // at the same, aligned offset f0 (no partially overlapping read-modify-writes, which would
      // stall store forwarding); the planes are scattered into the input gradient afterwards.
      for (int64_t p = 0; p < d.C * d.Dy * d.Dx; ++p) {
        T* plane = dX + p * d.Xstride + d.Xmg;
        std::fill(plane, plane + Fv, T(0));
      }
      for (int64_t f0 = 0; f0 < Fv; f0 += V) {
        T* dxf = dX + f0;
        for (int64_t w = 0; w < d.WIN; ++w) {
          const int64_t* xoff = d.xoff.data() + w * d.CRS;
          const int64_t blocks = d.Kpad / KB;
          int64_t kb = 0;
          // Two channel blocks at a time: two independent multiply-add chains per tap (one chain
          // alone waits on its own latency) and half the read-modify-writes of the planes.
          for (; kb + 2 <= blocks; kb += 2) {
            vec g0[KB], g1[KB];
            LIGHTNET_OPS_UNROLL
            for (int q = 0; q < KB; ++q) {
              g0[q] = S::load(Gm + (w * d.Kpad + kb * KB + q) * d.Fpad + f0);
              g1[q] = S::load(Gm + (w * d.Kpad + (kb + 1) * KB + q) * d.Fpad + f0);
            }
            const T* wp0 = a.wpk + kb * d.CRS * KB;
            const T* wp1 = wp0 + d.CRS * KB;
            for (int64_t t = 0; t < d.CRS; ++t, wp0 += KB, wp1 += KB) {
              vec acc0 = g0[0] * wp0[0], acc1 = g1[0] * wp1[0];
              LIGHTNET_OPS_UNROLL
              for (int q = 1; q < KB; ++q) {
                acc0 += g0[q] * wp0[q];
                acc1 += g1[q] * wp1[q];
              }
              T* p = dxf + xoff[t];
              S::store(p, S::load(p) + (acc0 + acc1));
            }
          }
          for (; kb < blocks; ++kb) {
            vec g[KB];
            LIGHTNET_OPS_UNROLL
            for (int q = 0; q < KB; ++q) g[q] = S::load(Gm + (w * d.Kpad + kb * KB + q) * d.Fpad + f0);
            const T* wp = a.wpk + kb * d.CRS * KB;
            for (int64_t t = 0; t < d.CRS; ++t, wp += KB) {
              vec acc = g[0] * wp[0];
              LIGHTNET_OPS_UNROLL
              for (int q = 1; q < KB; ++q) acc += g[q] * wp[q];
              T* p = dxf + xoff[t];
              S::store(p, S::load(p) + acc);
            }
          }
        }
      }
      // Zeroed here, per sample, while it is about to be written (cache-hot), instead of a separate
      // zero-fill pass over the whole gradient: elements no window reads must read 0.
      std::fill(a.grad_input + n * CHW, a.grad_input + (n + 1) * CHW, T(0));
      unshift_add<T, V>(d, dX, phbuf->data(), a.grad_input + n * CHW);
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

// Scatter backward (see conv2d_relu_maxpool2d.cpp): every live pooled element feeds exactly the
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

// Entry points for this instruction set (instantiated by the including .cpp).
template <typename T, int KB>
void direct_forward_range(const DirectFwdArgs<T>& a, int64_t n0, int64_t n1) {
  direct_forward<T, kLanes<T>, KB>(a, n0, n1);
}
template <typename T, int KB>
void direct_winograd_forward_range(const DirectFwdArgs<T>& a, int64_t n0, int64_t n1) {
  direct_winograd_forward<T, kLanes<T>, KB>(a, n0, n1);
}
template <typename T, int KB>
void direct_backward_range(const DirectBwdArgs<T>& a, int64_t n0, int64_t n1, T* gw, T* gb) {
  direct_backward<T, kLanes<T>, KB>(a, n0, n1, gw, gb);
}
