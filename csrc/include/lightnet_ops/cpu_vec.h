// The one SIMD layer of the CPU kernels: a fixed-width vector of T (GCC/Clang vector extensions)
// with the few operations the kernels need, plus small buffer helpers. Every kernel-family header
// (cpu_*_kernels.h) builds on it.
//
// NO include guard on purpose: cpu_isa_variants.h includes it once per instruction set, inside
// that instruction set's namespace (which defines `constexpr int kVecBytes`, the register width
// in bytes) and target region (see cpu_simd.h). Standard headers, <immintrin.h> on x86 and
// cpu_simd.h must already be included.

// Signed integer of the lane size of T (comparison masks, argmax lanes).
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

// V lanes of T. V * sizeof(T) may be narrower than the register (the pack / interleave helpers
// use 8-lane vectors whatever the instruction set).
template <typename T, int V>
struct Simd {
  static constexpr int kWidth = V;
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
  // Every lane = s, as one broadcast instruction where the region has one of this width (GCC 12
  // lowers the portable `vec{} + s` to an add of 0, kept in case s is -0, before the broadcast).
  static LIGHTNET_OPS_INLINE vec splat(T s) {
#if LIGHTNET_OPS_X86_DISPATCH
    const auto as_vec = [](auto r) {  // same bits, our vector type
      vec v;
      std::memcpy(&v, &r, sizeof(v));
      return v;
    };
    if constexpr (kVecBytes >= 64 && sizeof(vec) == 64 && sizeof(T) == 4) return as_vec(_mm512_set1_ps(s));
    if constexpr (kVecBytes >= 64 && sizeof(vec) == 64 && sizeof(T) == 8) return as_vec(_mm512_set1_pd(s));
    if constexpr (kVecBytes >= 32 && sizeof(vec) == 32 && sizeof(T) == 4) return as_vec(_mm256_set1_ps(s));
    if constexpr (kVecBytes >= 32 && sizeof(vec) == 32 && sizeof(T) == 8) return as_vec(_mm256_set1_pd(s));
#endif
    return vec{} + s;
  }
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
  // at a time (an insert per lane); the AVX2 / AVX-512 regions use the one-instruction extension
  // (the zero-masking form with every lane selected: the unmasked intrinsic's undefined pass-through
  // operand trips -Wmaybe-uninitialized inside GCC 12's own header).
  static LIGHTNET_OPS_INLINE ivec from_bytes(const uint8_t* p) {
    ivec out;
#if LIGHTNET_OPS_X86_DISPATCH
    if constexpr (kVecBytes == 64 && sizeof(ivec) == 64) {
      const __m512i r = sizeof(lane_int) == 4
                            ? _mm512_maskz_cvtepu8_epi32(__mmask16(0xFFFF),
                                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                            : _mm512_maskz_cvtepu8_epi64(__mmask8(0xFF),
                                                         _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
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
  // Transposes the V x V block held in rows[0..V), in log2(V) stages of two-vector shuffles: the
  // stage for distance d exchanges the off-diagonal d x d sub-blocks of every 2d x 2d block.
  static LIGHTNET_OPS_INLINE void transpose(vec* rows) {
#if defined(__GNUC__) && !defined(__clang__)
    LIGHTNET_OPS_UNROLL
    for (int d = V / 2; d >= 1; d /= 2) {
      ivec lo, hi;  // lane indices into the concatenation (a, b)
      LIGHTNET_OPS_UNROLL
      for (int l = 0; l < V; ++l) {
        lo[l] = (l & d) == 0 ? l : V + l - d;
        hi[l] = (l & d) == 0 ? l + d : V + l;
      }
      LIGHTNET_OPS_UNROLL
      for (int r = 0; r < V; ++r) {
        if ((r & d) != 0) continue;
        const vec a = rows[r], b = rows[r + d];
        rows[r] = __builtin_shuffle(a, b, lo);
        rows[r + d] = __builtin_shuffle(a, b, hi);
      }
    }
#else
    for (int r = 0; r < V; ++r)
      for (int c = r + 1; c < V; ++c) {
        const T t = rows[r][c];
        rows[r][c] = rows[c][r];
        rows[c][r] = t;
      }
#endif
  }
};

// Lanes of a full register of T, and that register's vector.
template <typename T>
constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));
template <typename T>
using Vec = Simd<T, kLanes<T>>;

// Keeps a loaded vector in a register instead of letting the compiler re-load it as a memory
// operand of every instruction that uses it (which makes multiply-add sweeps load-bound).
#ifndef LIGHTNET_OPS_IN_REGISTER
#if LIGHTNET_OPS_X86_DISPATCH
#define LIGHTNET_OPS_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define LIGHTNET_OPS_IN_REGISTER(v) (void)0
#endif
#endif

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

// Copies count elements (dst and src do not overlap) with at most two fixed-size moves per
// power-of-two size class, the second overlapping the first: short rows (pooled rows of a few
// elements) cost a handful of instructions instead of a memcpy call or a loop per element. Reads
// and writes only [0, count). MaxCount, when given, bounds count at compile time, so that copies
// out of a small buffer compile no move wider than the buffer.
template <int64_t MaxCount = -1, typename T>
LIGHTNET_OPS_INLINE void copy_row(T* dst_, const T* src_, int64_t count) {
  constexpr int64_t kMaxBytes = MaxCount < 0 ? INT64_MAX : MaxCount * static_cast<int64_t>(sizeof(T));
  auto* dst = reinterpret_cast<unsigned char*>(dst_);
  const auto* src = reinterpret_cast<const unsigned char*>(src_);
  const int64_t n = count * static_cast<int64_t>(sizeof(T));
  if constexpr (kMaxBytes >= 64) {
    if (n >= 64) {
      int64_t i = 0;
      for (; i + 64 <= n; i += 64) std::memcpy(dst + i, src + i, 64);
      if (i < n) std::memcpy(dst + n - 64, src + n - 64, 64);
      return;
    }
  }
  if constexpr (kMaxBytes >= 32) {
    if (n >= 32) {
      std::memcpy(dst, src, 32);
      std::memcpy(dst + n - 32, src + n - 32, 32);
      return;
    }
  }
  if constexpr (kMaxBytes >= 16) {
    if (n >= 16) {
      std::memcpy(dst, src, 16);
      std::memcpy(dst + n - 16, src + n - 16, 16);
      return;
    }
  }
  if constexpr (sizeof(T) <= 8 && kMaxBytes >= 8) {
    if (n >= 8) {
      std::memcpy(dst, src, 8);
      std::memcpy(dst + n - 8, src + n - 8, 8);
      return;
    }
  }
  if constexpr (sizeof(T) <= 4 && kMaxBytes >= 4) {
    if (n >= 4) {
      std::memcpy(dst, src, 4);
      std::memcpy(dst + n - 4, src + n - 4, 4);
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

// Whether p[0..n) holds no NaN or infinity (x - x is 0 exactly for finite x, NaN otherwise).
template <typename T>
bool all_finite(const T* p, int64_t n) {
  using S = Vec<T>;
  constexpr int V = S::kWidth;
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
