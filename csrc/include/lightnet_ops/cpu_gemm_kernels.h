// Register-blocked GEMM for the CPU linear_relu, compiled once per instruction set.
// NO include guard on purpose: csrc/cpu/linear_relu.cpp includes it once per instruction set
// through cpu_isa_variants.h, after the shared SIMD layer (cpu_vec.h: Vec<T>, one full register).
//
// C[i][j] = epilogue(sum over k of A(i, k) * B[k][j]) for i < M, j < N, where
// A(i, k) = a[i * a_row + k * a_col] (any strides: the kernel broadcasts one A element at a time,
// so A^T costs nothing) and B is row-major with row stride ldb. Outer-product form: a tile of MR
// rows x NV vectors of C lives in registers for the whole k loop; per k it loads NV vectors of B
// and broadcasts MR elements of A. Each C element is one chain of fused multiply-adds in k order,
// so results do not depend on the tiling or the number of threads.
//
// The problem (GemmArgs) is defined in linear_relu.cpp, outside the per-instruction-set copies.

// Tile rows per register block: MR x NV accumulators + NV B vectors + 1 broadcast must fit the
// register file (32 vector registers with AVX-512, 16 below).
constexpr int kGemmMR = kVecBytes == 64 ? 8 : 4;
constexpr int kGemmNV = 2;

// Columns of C per column block (the unit gemm_column_blocks takes and threads split).
template <typename T>
constexpr int64_t gemm_block_columns() {
  return int64_t(kGemmNV) * Vec<T>::kWidth;
}

template <typename T, int MR, int NV>
LIGHTNET_OPS_INLINE void gemm_tile(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, int64_t K,
                                   T* c, int64_t ldc, int64_t lanes, const T* bias, bool relu) {
  using G = Vec<T>;
  using vec = typename G::vec;
  constexpr int V = G::kWidth;
  vec acc[MR][NV];
  LIGHTNET_OPS_UNROLL
  for (int i = 0; i < MR; ++i)
    LIGHTNET_OPS_UNROLL
    for (int v = 0; v < NV; ++v) acc[i][v] = vec{};
  for (int64_t k = 0; k < K; ++k) {
    vec bv[NV];
    LIGHTNET_OPS_UNROLL
    for (int v = 0; v < NV; ++v) bv[v] = G::load(b + k * ldb + v * V);
    LIGHTNET_OPS_UNROLL
    for (int i = 0; i < MR; ++i) {
      const vec av = G::splat(a[i * a_row + k * a_col]);
      LIGHTNET_OPS_UNROLL
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
  LIGHTNET_OPS_UNROLL
  for (int v = 0; v < NV; ++v) {
    vec bias_v{};
    if (bias != nullptr) {
      if (lanes >= (v + 1) * V) {
        bias_v = G::load(bias + v * V);
      } else {
        for (int64_t l = 0; l < V && v * V + l < lanes; ++l) bias_v[l] = bias[v * V + l];
      }
    }
    LIGHTNET_OPS_UNROLL
    for (int i = 0; i < MR; ++i) {
      vec r = acc[i][v] + bias_v;
      if (relu) r = ((r > vec{}) | (r != r)) ? r : vec{};  // stock's relu: NaN stays NaN
      if (lanes >= (v + 1) * V) {
        G::store(c + i * ldc + v * V, r);
      } else {
        for (int64_t l = 0; v * V + l < lanes; ++l) c[i * ldc + v * V + l] = r[l];
      }
    }
  }
}

// Rows [i0, i0 + rows) of one column block (rows <= kGemmMR): the compiled tile with exactly
// `rows` rows (a row tail gets its own instantiation instead of padding).
template <typename T, int NV, int R = kGemmMR>
void gemm_rows(int rows, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, int64_t K, T* c,
               int64_t ldc, int64_t lanes, const T* bias, bool relu) {
  if constexpr (R > 1) {
    if (rows < R) return gemm_rows<T, NV, R - 1>(rows, a, a_row, a_col, b, ldb, K, c, ldc, lanes, bias, relu);
  }
  gemm_tile<T, R, NV>(a, a_row, a_col, b, ldb, K, c, ldc, lanes, bias, relu);
}

// The column blocks [jb0, jb1) (each kGemmNV vectors wide) of C, every row, on the calling thread.
// Column block outside, row tiles inside: a block's B panel (K x kGemmNV vectors) stays in cache
// while the rows of A stream past it. A transposed B (b_transposed: B(k, j) = b[j * ldb + k], a
// weight matrix read as W^T) is packed per block into a contiguous K x block panel first, and so is
// a block that reaches into a last, partial vector of columns (vector loads past N could leave B's
// allocation); both panels are zero-padded to whole vectors, and only N columns are stored.
template <typename T>
void gemm_column_blocks(const GemmArgs<T>& g, int64_t jb0, int64_t jb1) {
  constexpr int V = Vec<T>::kWidth;
  constexpr int64_t block = gemm_block_columns<T>();
  // Uninitialised: every panel element is written below (the padding columns with zeros).
  std::unique_ptr<T[]> panel_store(g.b_transposed || g.N % V != 0 ? new T[g.K * block] : nullptr);
  T* const panel = panel_store.get();
  for (int64_t jb = jb0; jb < jb1; ++jb) {
    const int64_t j0 = jb * block, lanes = std::min(block, g.N - j0);
    const T* b = g.b + j0;
    int64_t ldb = g.ldb;
    if (g.b_transposed || lanes % V != 0) {
      const int64_t width = (lanes + V - 1) / V * V;
      if (lanes < width) {
        for (int64_t k = 0; k < g.K; ++k) std::fill(panel + k * width + lanes, panel + (k + 1) * width, T(0));
      }
      if (g.b_transposed) {
        // V x V blocks transposed in registers; the edges (k past the last whole vector, columns
        // past the last whole vector) element by element.
        using G = Vec<T>;
        const T* src = g.b + j0 * g.ldb;
        const int64_t k_full = g.K / V * V, j_full = lanes / V * V;
        for (int64_t k0 = 0; k0 < k_full; k0 += V) {
          for (int64_t jv = 0; jv < j_full; jv += V) {
            typename G::vec rows[V];
            LIGHTNET_OPS_UNROLL
            for (int r = 0; r < V; ++r) rows[r] = G::load(src + (jv + r) * g.ldb + k0);
            G::transpose(rows);
            LIGHTNET_OPS_UNROLL
            for (int r = 0; r < V; ++r) G::store(panel + (k0 + r) * width + jv, rows[r]);
          }
        }
        for (int64_t k = 0; k < g.K; ++k) {
          for (int64_t j = k < k_full ? j_full : 0; j < lanes; ++j) panel[k * width + j] = src[j * g.ldb + k];
        }
      } else {
        for (int64_t k = 0; k < g.K; ++k) std::memcpy(panel + k * width, b + k * g.ldb, lanes * sizeof(T));
      }
      b = panel;
      ldb = width;
    }
    const T* bias = g.bias != nullptr ? g.bias + j0 : nullptr;
    for (int64_t i0 = 0; i0 < g.M; i0 += kGemmMR) {
      const int rows = static_cast<int>(std::min<int64_t>(kGemmMR, g.M - i0));
      const T* a = g.a + i0 * g.a_row;
      T* c = g.c + i0 * g.ldc + j0;
      if (lanes > V) {
        gemm_rows<T, kGemmNV>(rows, a, g.a_row, g.a_col, b, ldb, g.K, c, g.ldc, lanes, bias, g.relu);
      } else {
        gemm_rows<T, 1>(rows, a, g.a_row, g.a_col, b, ldb, g.K, c, g.ldc, lanes, bias, g.relu);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Few-row form, C = epilogue(A @ W^T) with W row-major (N x K) and A's rows contiguous, for
// products of a few rows: each C element is a dot product of two contiguous rows, so W is read in
// place (the blocked kernel above would pack W^T per call, which costs more than a few-row product
// itself). A tile of kDotRows rows of A x kDotCols rows of W keeps kDotRows x kDotCols vector
// accumulators over k, each reduced by a fixed lane tree at the end: a result does not depend on
// the tiling or the thread that computes it.
constexpr int kDotRows = 4;
constexpr int kDotCols = 4;

// The V lanes of v summed as a balanced tree in a fixed order: lane l + width is added to lane l
// for width = V/2, V/4, ..., 1 (whole-vector rotate-and-add steps under GCC).
template <typename T>
LIGHTNET_OPS_INLINE T tree_sum(typename Vec<T>::vec v) {
  constexpr int V = Vec<T>::kWidth;
#if defined(__GNUC__) && !defined(__clang__)
  LIGHTNET_OPS_UNROLL
  for (int width = V / 2; width >= 1; width /= 2) {
    typename Vec<T>::ivec rotate;
    LIGHTNET_OPS_UNROLL
    for (int l = 0; l < V; ++l) rotate[l] = (l + width) % V;
    v += __builtin_shuffle(v, rotate);
  }
  return v[0];
#else
  T lanes[V];
  std::memcpy(lanes, &v, sizeof(lanes));
  for (int width = V / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
#endif
}

template <typename T, int RM, int RN>
LIGHTNET_OPS_INLINE void dot_tile(const T* a, int64_t lda, const T* w, int64_t ldw, int64_t K, T* c, int64_t ldc,
                                  const T* bias, bool relu) {
  using G = Vec<T>;
  using vec = typename G::vec;
  constexpr int V = G::kWidth;
  vec acc[RM][RN];
  LIGHTNET_OPS_UNROLL
  for (int i = 0; i < RM; ++i)
    LIGHTNET_OPS_UNROLL
    for (int j = 0; j < RN; ++j) acc[i][j] = vec{};
  const auto step = [&](const vec* wv, auto load_a) {
    LIGHTNET_OPS_UNROLL
    for (int i = 0; i < RM; ++i) {
      const vec av = load_a(i);
      LIGHTNET_OPS_UNROLL
      for (int j = 0; j < RN; ++j) acc[i][j] += av * wv[j];
    }
  };
  const int64_t k_full = K / V * V;
  for (int64_t k = 0; k < k_full; k += V) {
    vec wv[RN];
    LIGHTNET_OPS_UNROLL
    for (int j = 0; j < RN; ++j) wv[j] = G::load(w + j * ldw + k);
    step(wv, [&](int i) { return G::load(a + i * lda + k); });
  }
  if (const int64_t tail = K - k_full; tail > 0) {
    // The last partial vector, zero-padded on both sides (the padding lanes add 0 * 0).
    const auto load_tail = [&](const T* p) {
      T buf[V] = {};
      copy_row<V>(buf, p + k_full, tail);
      return G::load(buf);
    };
    vec wv[RN];
    LIGHTNET_OPS_UNROLL
    for (int j = 0; j < RN; ++j) wv[j] = load_tail(w + j * ldw);
    step(wv, [&](int i) { return load_tail(a + i * lda); });
  }
  LIGHTNET_OPS_UNROLL
  for (int i = 0; i < RM; ++i) {
    LIGHTNET_OPS_UNROLL
    for (int j = 0; j < RN; ++j) {
      T s = tree_sum<T>(acc[i][j]);
      if (bias != nullptr) s += bias[j];
      if (relu && !(s > T(0) || s != s)) s = T(0);  // stock's relu: NaN stays NaN
      c[i * ldc + j] = s;
    }
  }
}

// Rows [i0, i0 + rows) x one column block of `cols` (<= kDotCols) columns: the tile compiled for
// exactly that many rows and columns (tails get their own instantiations instead of padding).
template <typename T, int RM = kDotRows, int RN = kDotCols>
void dot_block(int rows, int cols, const T* a, int64_t lda, const T* w, int64_t ldw, int64_t K, T* c, int64_t ldc,
               const T* bias, bool relu) {
  if constexpr (RM > 1) {
    if (rows < RM) return dot_block<T, RM - 1, RN>(rows, cols, a, lda, w, ldw, K, c, ldc, bias, relu);
  }
  if constexpr (RN > 1) {
    if (cols < RN) return dot_block<T, RM, RN - 1>(rows, cols, a, lda, w, ldw, K, c, ldc, bias, relu);
  }
  dot_tile<T, RM, RN>(a, lda, w, ldw, K, c, ldc, bias, relu);
}

// Column blocks [jb0, jb1) (kDotCols columns each) of C = epilogue(A @ W^T), every row, on the
// calling thread: W's rows of a block stay in cache while A's few rows pass them. Needs
// g.b_transposed (B = W^T with W row-major, ldb its row stride) and A's rows contiguous (a_col 1).
template <typename T>
void gemm_dot_column_blocks(const GemmArgs<T>& g, int64_t jb0, int64_t jb1) {
  for (int64_t jb = jb0; jb < jb1;) {
    const int64_t j0 = jb * kDotCols;
    const T* bias = g.bias != nullptr ? g.bias + j0 : nullptr;
    // One or two rows with 32 registers: two whole blocks per tile. A 1 x 4 tile's four
    // accumulators leave the loop bound by its five loads per step; 1 x 8 loads nine per eight
    // products. The same dot products, summed in the same order.
    if (kVecBytes == 64 && (g.M == 1 || g.M == 2) && jb + 1 < jb1 && j0 + 2 * kDotCols <= g.N) {
      if (g.M == 1) {
        dot_tile<T, 1, 2 * kDotCols>(g.a, g.a_row, g.b + j0 * g.ldb, g.ldb, g.K, g.c + j0, g.ldc, bias, g.relu);
      } else {
        dot_tile<T, 2, 2 * kDotCols>(g.a, g.a_row, g.b + j0 * g.ldb, g.ldb, g.K, g.c + j0, g.ldc, bias, g.relu);
      }
      jb += 2;
      continue;
    }
    const int cols = static_cast<int>(std::min<int64_t>(kDotCols, g.N - j0));
    for (int64_t i0 = 0; i0 < g.M; i0 += kDotRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kDotRows, g.M - i0));
      dot_block<T>(rows, cols, g.a + i0 * g.a_row, g.a_row, g.b + j0 * g.ldb, g.ldb, g.K, g.c + i0 * g.ldc + j0,
                   g.ldc, bias, g.relu);
    }
    ++jb;
  }
}
