// Kernels of the CPU conv2d_relu_maxpool2d direct path (csrc/cpu/conv_direct_*.cpp): forward, its
// Winograd F(2x2, 3x3) variant, and backward (grad_input directly or by the Winograd adjoint,
// grad_weight and grad_bias as per-lane partial sums). Geometry and arguments: cpu_conv_args.h.
//
// NO include guard on purpose: included once per instruction set through cpu_isa_variants.h,
// after cpu_vec.h and cpu_conv_winograd_kernels.h (the Winograd output tile).

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
            // (8 and 4 lanes, or a register of T if narrower: no vector wider than the region's.)
            constexpr int W8 = kLanes<T> < 8 ? kLanes<T> : 8, W4 = kLanes<T> < 4 ? kLanes<T> : 4;
            int64_t X = lo;
            for (; X + W8 <= hi; X += W8) Simd<T, W8>::store(row + X, Simd<T, W8>::load_even(src + 2 * X));
            for (; X + W4 <= hi; X += W4) Simd<T, W4>::store(row + X, Simd<T, W4>::load_even(src + 2 * X));
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
      copy_row(out + k * F + ph * d.PW, o + ph * d.PWs, d.PW);
      if (am) copy_row(am + k * F + ph * d.PW, ab + ph * d.PWs, d.PW);
    }
  }
}

// Forward for samples [n0, n1). Argmax: whether a.argmax is set (then the window offset of every
// maximum is tracked; inference leaves that work out at compile time).
template <typename T, int V, int KB, bool Argmax>
LIGHTNET_OPS_INLINE void direct_forward(const DirectFwdArgs<T>& a, int64_t n0, int64_t n1) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  const Direct& d = *a.d;
  std::vector<T> zbuf(d.pack_elems());
  Scratch<T> obuf(d.K * d.Fpad);              // output in the packed position layout
  std::vector<uint8_t> abuf(Argmax ? d.K * d.Fpad : 0);  // argmax likewise
  T* Z = zbuf.data();
  const int64_t CHW = d.C * d.H * d.W;
  for (int64_t n = n0; n < n1; ++n) {
    pack_input(d, a.input + n * CHW, Z);
    for (int64_t f0 = 0; f0 < d.Fs; f0 += V) {
      const T* zf = Z + f0;
      for (int64_t kb = 0; kb < d.Kpad / KB; ++kb) {
        const T* wk = a.wpk + kb * d.CRS * KB;
        // Set by window offset 0 (every window has one); zeroed so that the compiler, which cannot
        // see that, does not warn of a read before the first write.
        vec best[KB] = {};
        ivec arg[KB] = {};
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
              if constexpr (Argmax) arg[q] = S::isplat(0);
            }
          } else {
            const ivec off = S::isplat(w);
            LIGHTNET_OPS_UNROLL
            for (int q = 0; q < KB; ++q) {
              const ivec take = S::pool_takes(acc[q], best[q]);
              best[q] = S::select(take, acc[q], best[q]);
              if constexpr (Argmax) arg[q] = S::iselect(take, off, arg[q]);
            }
          }
        }
        LIGHTNET_OPS_UNROLL
        for (int q = 0; q < KB; ++q) {  // a constant trip count, so GCC can unroll it as asked
          const int64_t k = kb * KB + q;
          if (k >= d.K) break;
          S::store(obuf.data() + k * d.Fpad + f0, S::relu(best[q]));
          if constexpr (Argmax) {
            const auto bytes = S::to_bytes(S::iselect(S::relu_passes(best[q]), arg[q], S::isplat(kArgmaxReluZero)));
            std::memcpy(abuf.data() + k * d.Fpad + f0, &bytes, V);
          }
        }
      }
    }
    store_pooled_sample(a, n, obuf.data(), abuf.data());
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
template <typename T, int V, int KB, bool Argmax>
LIGHTNET_OPS_INLINE void direct_winograd_forward(const DirectFwdArgs<T>& a, int64_t n0, int64_t n1) {
  using S = Simd<T, V>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  const Direct& d = *a.d;
  Scratch<T> zbuf(d.pack_elems());
  Scratch<T> vbuf(d.C * 16 * V);                // transformed input tiles of one vector of positions
  Scratch<T> mbuf(d.K * 16 * V);                // and their products with the transformed weights
  Scratch<T> obuf(d.K * d.Fpad);
  std::vector<uint8_t> abuf(Argmax ? d.K * d.Fpad : 0);
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
        winograd_output_pool_tile<T, V, Argmax>(m, S::splat(a.bias ? a.bias[k] : T(0)), check, best, arg);
        S::store(obuf.data() + k * d.Fpad + f0, S::relu(best));
        if constexpr (Argmax) {
          const auto bytes = S::to_bytes(S::iselect(S::relu_passes(best), arg, S::isplat(kArgmaxReluZero)));
          std::memcpy(abuf.data() + k * d.Fpad + f0, &bytes, V);
        }
      }
    }
    // (The check also covers the dropped lanes past the pooled rows: a non-finite input element
    // that only they read sends the sample to the direct kernel too, which is merely slower.)
    if (S::hsum(check) != T(0)) {
      if (a.fallback_samples) a.fallback_samples->fetch_add(1, std::memory_order_relaxed);
      direct_forward<T, V, KB, Argmax>(a, n, n + 1);
      continue;
    }
    store_pooled_sample(a, n, obuf.data(), abuf.data());
  }
}


// dst[2i] = even[i], dst[2i + 1] = odd[i] for the n elements of dst, L pairs per step (8, or a
// register of T if narrower) through two in-register shuffles instead of a scalar move per
// element. Reads up to L elements past the last pair of each source row (the caller's buffer has
// 8 elements of slack); writes only dst[0..n). A short tail is copied out of one stored half
// only: a load spanning two recent stores cannot be forwarded from them and stalls.
template <typename T>
LIGHTNET_OPS_INLINE void interleave_rows(const T* even, const T* odd, T* dst, int64_t n) {
  constexpr int L = kLanes<T> < 8 ? kLanes<T> : 8;
  using H = Simd<T, L>;
  typename H::ivec lo_idx, hi_idx;  // lanes of the concatenation (e, o): e0 o0 e1 o1 ...
  LIGHTNET_OPS_UNROLL
  for (int l = 0; l < L; ++l) {
    lo_idx[l] = l % 2 == 0 ? l / 2 : L + l / 2;
    hi_idx[l] = l % 2 == 0 ? L / 2 + l / 2 : L + L / 2 + l / 2;
  }
  for (int64_t x = 0; x < n; x += 2 * L, even += L, odd += L) {
    const typename H::vec e = H::load(even), o = H::load(odd);
    const typename H::vec lo = __builtin_shuffle(e, o, lo_idx), up = __builtin_shuffle(e, o, hi_idx);
    const int64_t rest = n - x;
    if (rest >= 2 * L) {
      H::store(dst + x, lo);
      H::store(dst + x + L, up);
      continue;
    }
    T half[L];
    if (rest >= L) {
      H::store(dst + x, lo);
      H::store(half, up);
      copy_row<L - 1>(dst + x + L, half, rest - L);
    } else {
      H::store(half, lo);
      copy_row<L - 1>(dst + x, half, rest);
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
        copy_row(gsbuf.data() + ph * d.PWs, g + ph * d.PW, d.PW);
        copy_row(asbuf.data() + ph * d.PWs, am + ph * d.PW, d.PW);
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
      if (wino_gi && a.fallback_samples) a.fallback_samples->fetch_add(1, std::memory_order_relaxed);
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

// Entry points for this instruction set (instantiated by the including .cpp).
template <typename T, int KB>
void direct_forward_range(const DirectFwdArgs<T>& a, int64_t n0, int64_t n1) {
  if (a.argmax) {
    direct_forward<T, kLanes<T>, KB, true>(a, n0, n1);
  } else {
    direct_forward<T, kLanes<T>, KB, false>(a, n0, n1);
  }
}
template <typename T, int KB>
void direct_winograd_forward_range(const DirectFwdArgs<T>& a, int64_t n0, int64_t n1) {
  if (a.argmax) {
    direct_winograd_forward<T, kLanes<T>, KB, true>(a, n0, n1);
  } else {
    direct_winograd_forward<T, kLanes<T>, KB, false>(a, n0, n1);
  }
}
template <typename T, int KB>
void direct_backward_range(const DirectBwdArgs<T>& a, int64_t n0, int64_t n1, T* gw, T* gb) {
  direct_backward<T, kLanes<T>, KB>(a, n0, n1, gw, gb);
}
