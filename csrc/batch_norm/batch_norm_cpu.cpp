// BatchNorm on the CPU.
//
// moments: the work is cut into tasks that at::parallel_for shares out. Channels-first memory
//   (N, C, S): a task is one channel over a range of the batch, so few channels still fill every
//   thread; the task sums (x - K) and (x - K)^2 over its rows (K the task's first element) in
//   opmath lanes, adds them into double every 4096 elements at most (RowSums), then takes its
//   moments once. It reads four rows at a time (four streams of memory in flight) and prefetches
//   the next four, since rows lie C * S elements apart.
//   Channels-last memory (N*S, C): a task is a range of rows; blocks of rows (64 to 1024) get
//   per-channel sums of (x - K) and (x - K)^2 in one sweep, K being the channel's first element,
//   so the squares never lose precision to a large mean; block sums add up in double per task,
//   task sums per channel at the end. Rows of 4 KB or more are swept four at a time; with 32, 64
//   or 128 channels a block's sums stay in registers. One pass over memory.
// grad_sums: the same task split, accumulating sum(dy) and sum(dy (x - mean)) (and, with a saved
//   ReLU gate, writing the gated dy). One pass.
// affine: out = p a + (q - m) b + d per element (batch_norm_math.h), one pass, parallel over rows
//   (channels-last rows of 4 KB or more four at a time; of 32, 64 or 128 channels with the
//   coefficients held across rows), in spans of at most kSpan elements.
// Outputs far larger than the caches (16 MB or more) are written past them with non-temporal
//   stores: affine's (float16 and bfloat16 in the AVX-512 build only), and the channels-last
//   gradient sums' gated dy (common/stream.h).
// Resident variants: for channels-first memory with small channels, a training forward or
//   backward runs reduction and elementwise pass over a group of channels, the second pass
//   reading from cache: one pass over memory in all (see "cache-resident" below).
// Short rows: channels-first memory whose rows hold fewer than 16 values (the elementwise pass:
//   32) is walked as channels-last memory of C * S columns (see "short rows" below).
// Row-level sums use 16 independent accumulators (enough to hide the add latency), in the opmath
// type, held as the build's SIMD vectors (float: four 16-byte ones in the baseline build, two
// 32-byte ones with AVX2, one 64-byte one with AVX-512; the same values go to the same lane in
// all three); task and final merges are in double.
//
// This file is compiled three times (common/cpu_capability.h): as itself for the baseline ISA, and
// from batch_norm_cpu_avx2.cpp and batch_norm_cpu_avx512.cpp for AVX2 and AVX-512, each build's
// kernels in a namespace of their own (baseline, avx2, avx512). The AVX2 build's loops are 8 float
// lanes wide, the AVX-512 build's 16; both convert float16 with F16C in registers in the
// reductions (a SIMD part of a row, or of 16 or 8 channels, at a time) and stage the
// elementwise passes' spans of 32 as floats for float16 (F16C) and bfloat16 (integer rounding in
// 256-bit registers, or AVX512-BF16): common/staged.h. On the development machine (AMD EPYC,
// 8x256x56x56) the AVX2 build took the bfloat16 module from 0.49-0.97x of torch's speed to
// 0.89-1.21x, float16 from 0.15-0.29x to 0.81-1.22x, float32 within noise; against it (with
// its 16-byte reduction lanes), the AVX-512 build runs float16 and bfloat16 eval 1.1-1.5x faster
// and the fused ops' training 1.1-1.25x (benchmarks/TUNING.md, "The AVX-512 build"). The
// baseline build registers the ops.
#include "batch_norm/batch_norm.h"
#include "batch_norm/batch_norm_math.h"
#include "common/convert.h"
#include "common/cpu_capability.h"
#include "common/parallel.h"
#include "common/staged.h"
#include "common/stream.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

MK_CPU_ISA_TARGET

namespace modekernels::batch_norm {
namespace MK_CPU_ISA {
using namespace ::modekernels::MK_CPU_ISA;  // common/staged.h, this build's
namespace {

constexpr int64_t kLanes = 16;
// Channels-last blocks: rows whose per-channel float sums are merged into double moments at once.
// At least kMinBlockRows rows, so that the merges stay rare even with thousands of channels, and
// at most kMaxBlockRows, so that a float sum stays short with few channels (with up to 2^18 rows a
// block, the variance of one channel over 2^20 values was 1e-4 off in relative terms).
constexpr int64_t kBlockElems = 1 << 18;
constexpr int64_t kMinBlockRows = 64;
constexpr int64_t kMaxBlockRows = 1024;

int64_t tasks_per_channel(const Layout& l) {
  const int64_t threads = at::get_num_threads();
  return l.C >= threads ? 1 : std::min<int64_t>(l.N, (4 * threads + l.C - 1) / l.C);
}

// fn(t, c, n0, n1) for the channels-first reduction tasks t < C * per, in parallel: task t is
// channel c = t / per over the batch rows n0 <= n < n1, the (t % per)-th of per equal ranges.
template <typename Fn>
void for_channel_tasks(const Layout& l, int64_t per, const Fn& fn) {
  at::parallel_for(0, l.C * per, grain_for(l.N * l.S / per), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k = t % per;
      fn(t, t / per, l.N * k / per, l.N * (k + 1) / per);
    }
  });
}

// kLanes values of type T as kParts native SIMD vectors (GCC/Clang vector extension): kLanes
// independent accumulators. Loops go part by part, each part loaded, combined and accumulated
// before the next, so that everything stays in the baseline ISA's 16 registers. (One kLanes-wide
// vector type would be simpler, but GCC lowers it operation by operation across all parts, which
// spills to the stack, and turns its comparisons into scalar branches.) Which values go to which
// lane is the same in every build, whatever its vectors' width, so that all sum alike.
template <typename T>
struct Lanes {
  typedef T Part __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t kWidth = kVectorBytes / sizeof(T);
  static constexpr int64_t kParts = kLanes / kWidth;
};

// Vectors of storage words: n 64-bit words, or n words of 16 bits.
template <int64_t n>
struct Words {
  typedef uint64_t W64 __attribute__((vector_size(8 * n)));
  typedef uint16_t W16 __attribute__((vector_size(2 * n)));
};

// The values whose storage is `bits` (Lanes<T>::kWidth values of scalar_t), in T. (With
// __builtin_bit_cast: std::bit_cast is compiled for the baseline ISA, where wider vectors change
// its calling convention.)
template <typename T, typename scalar_t, typename Bits>
typename Lanes<T>::Part widen_part(Bits bits) {
  using L = Lanes<T>;
  using Part = typename L::Part;
  if constexpr (std::is_same_v<T, scalar_t>) {
    return __builtin_bit_cast(Part, bits);
  } else {
    static_assert(std::is_same_v<T, float> && sizeof(scalar_t) == 2, "float16 or bfloat16 into float");
    [[maybe_unused]] typedef int32_t Word __attribute__((vector_size(kVectorBytes)));
    const auto h = __builtin_bit_cast(typename Words<L::kWidth>::W16, bits);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
#if MK_CPU_ISA_LEVEL >= 2
      // One instruction: GCC widens the vector conversion in two halves and joins them.
      const __m512i w = _mm512_maskz_cvtepu16_epi32(kAll16, __builtin_bit_cast(__m256i, h));
      return __builtin_bit_cast(Part, _mm512_maskz_slli_epi32(kAll16, w, 16));
#else
      return __builtin_bit_cast(Part, __builtin_convertvector(h, Word) << 16);  // the upper half
#endif
    } else {
#if MK_CPU_ISA_LEVEL >= 2
      return __builtin_bit_cast(Part, _mm512_maskz_cvtph_ps(kAll16, __builtin_bit_cast(__m256i, h)));
#elif MK_CPU_ISA_LEVEL >= 1
      return __builtin_bit_cast(Part, _mm256_cvtph_ps(__builtin_bit_cast(__m128i, h)));
#else
      return detail::half_bits_to_float<Part>(__builtin_convertvector(h, Word));
#endif
    }
  }
}

// Lanes [k W, (k + 1) W) in T, W = Lanes<T>::kWidth: the W values from p + k W on, one plain load
// in every build (a part of four bfloat16 or float16 values, a single word in the baseline build,
// is loaded as a scalar: GCC moves vectors of one word through the stack).
template <typename T, typename scalar_t>
typename Lanes<T>::Part load_lanes(const scalar_t* p, int64_t k) {
  constexpr size_t kBytes = Lanes<T>::kWidth * sizeof(scalar_t);
  std::conditional_t<kBytes == 8, uint64_t, typename Words<kBytes / 8>::W64> bits;
  std::memcpy(&bits, p + k * Lanes<T>::kWidth, sizeof(bits));
  return widen_part<T, scalar_t>(bits);
}

// The gated dy of a saved gate's backward, bit for bit: the Lanes<T>::kWidth values of scalar_t
// at src + k W (W = Lanes<T>::kWidth) stored at dst + k W as they are where `closed` (a comparison
// of parts of T: all ones where true) is false, and as +0 where it is true. No conversion: float16
// and bfloat16 values, NaNs too, keep dy's bits. With kStream, past the caches (stream_store;
// dst + k W aligned to the part's bytes).
template <typename T, bool kStream = false, typename scalar_t, typename Closed>
inline void store_gated(scalar_t* dst, const scalar_t* src, int64_t k, Closed closed) {
  using Int = std::conditional_t<sizeof(scalar_t) == 2, int16_t,
                                 std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>>;
  typedef Int Bits __attribute__((vector_size(Lanes<T>::kWidth * sizeof(scalar_t))));
  typedef Bits Unaligned __attribute__((aligned(alignof(scalar_t)), may_alias));
  const Bits bits = *reinterpret_cast<const Unaligned*>(src + k * Lanes<T>::kWidth);
  const Bits open = ~__builtin_convertvector(closed, Bits);
  if constexpr (kStream) {
    stream_store(dst + k * Lanes<T>::kWidth, bits & open);
  } else {
    *reinterpret_cast<Unaligned*>(dst + k * Lanes<T>::kWidth) = bits & open;
  }
}

// store_gated for the elements e0 <= i < e1, gated by the saved ReLU output y (closed where <= 0);
// with kStream, its whole aligned parts past the caches.
template <typename T, bool kStream = false, typename scalar_t>
inline void store_gated_span(scalar_t* gated, const scalar_t* dy, const scalar_t* y, int64_t e0,
                             int64_t e1) {
  constexpr int64_t W = Lanes<T>::kWidth;
  const auto one = [&](int64_t i) {
    const scalar_t d = dy[i];
    gated[i] = relu_passes(widen<T>(y[i])) ? d : scalar_t(0);
  };
  int64_t i = e0;
  if constexpr (kStream) {
    for (; i < e1 && !aligned_to(gated + i, W * sizeof(scalar_t)); ++i) one(i);
  }
  for (; i + W <= e1; i += W) store_gated<T, kStream>(gated + i, dy + i, 0, load_lanes<T>(y + i, 0) <= T(0));
  for (; i < e1; ++i) one(i);
}

// The sum of all lanes, lane by lane in order.
template <typename T>
T sum_lanes(const T (&v)[kLanes]) {
  T s = 0;
  for (int64_t k = 0; k < kLanes; ++k) s += v[k];
  return s;
}

// Rows of one channel lie C * S elements apart, too far for the hardware prefetcher to follow
// from one row to the next: the reductions ask for later rows' lanes while they read these rows'
// (`ahead` elements on, for_rows; 0 near the end).
template <typename scalar_t>
inline void prefetch_lanes(const scalar_t* p) {
  for (size_t k = 0; k < kLanes * sizeof(scalar_t); k += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + k);
}

// The channels-first reductions read kBatchRows rows of a channel at once, kLanes elements of each
// in turn (and the channels-last passes sweep kBatchRows long rows at once, below). With
// four streams of memory in flight the development machine (AMD EPYC, 2 cores) reads a tensor
// 1.3-1.4x faster than row by row: the statistics alone took 0.7-0.9 ms instead of 1.0-1.1 ms
// at 8x256x56x56 float32, BatchNorm's backward 10-15% less (20% at 64x512x7x7).
constexpr int64_t kBatchRows = 4;

// Two sums over rows of one channel: rows add into the same opmath lanes (and tail scalars), which
// are added into double every kFlushElems elements at most, so that a lane sums kFlushElems /
// kLanes values at most and the float rounding stays that of a short sum however long the rows
// are: a batch of rows longer than that is added in spans of columns (for_row_spans). (While such
// a batch was added whole, a lane summed up to a quarter of a row, and BatchNorm's variance over
// rows of 2^20 float32 values was 1e-4 off in relative terms, torch's 1e-8.) A flush is one
// horizontal sum per kFlushElems elements.
constexpr int64_t kFlushElems = 4096;

template <typename opmath_t>
struct RowSums {
  // The lanes as scalars (LaneParts holds them in SIMD registers): a vector holds RowSums,
  // and does not align its memory for the AVX builds' vectors, which GCC's loads then assume.
  opmath_t v1[kLanes] = {}, v2[kLanes] = {};
  opmath_t t1 = 0, t2 = 0;
  int64_t pending = 0;
  double s1 = 0.0, s2 = 0.0;

  // Before a batch of len elements is added.
  void start_batch(int64_t len) {
    if (pending > 0 && pending + len > kFlushElems) flush();
    pending += len;
  }
  // After the last row: s1 and s2 hold the sums.
  void flush() {
    s1 += static_cast<double>(sum_lanes<opmath_t>(v1) + t1);
    s2 += static_cast<double>(sum_lanes<opmath_t>(v2) + t2);
    *this = RowSums{.s1 = s1, .s2 = s2};
  }
};

// RowSums' lanes as SIMD parts, and its tail scalars, held in registers while a batch of rows
// adds into them. (Added in place, each tail element waited for the store of the one before: the
// statistics op on 8x64x5x5, nine tail elements a row, took 10.2 us a call from Python, now 9.0.)
template <typename opmath_t>
struct LaneParts {
  using Part = typename Lanes<opmath_t>::Part;
  Part v1[Lanes<opmath_t>::kParts], v2[Lanes<opmath_t>::kParts];
  opmath_t t1, t2;

  explicit LaneParts(const RowSums<opmath_t>& acc) : t1(acc.t1), t2(acc.t2) {
    std::memcpy(v1, acc.v1, sizeof(v1));
    std::memcpy(v2, acc.v2, sizeof(v2));
  }
  void store(RowSums<opmath_t>& acc) const {
    std::memcpy(acc.v1, v1, sizeof(v1));
    std::memcpy(acc.v2, v2, sizeof(v2));
    acc.t1 = t1;
    acc.t2 = t2;
  }
};

// Coefficients of one channel as the elementwise loops take them: kA..kD (batch_norm_math.h),
// then the forward's b and d that a recomputed ReLU gate needs (its m is kM).
enum : int64_t { kGateB = 4, kGateD = 5, kChannelCoeffs = 6 };

// How a saved gate's gradient-sums pass writes the gated dy: not at all, with ordinary stores, or
// past the caches (common/stream.h).
enum class GatedWrite { kNone, kStore, kStream };
template <GatedWrite W>
using Write = std::integral_constant<GatedWrite, W>;

// A fused backward's ReLU gate, as a loop's template argument: none, the saved output, or
// recomputed from the input (GateView).
enum GateKind { kNoGate, kSavedGate, kRecomputedGate };

// fn(0), ..., fn(R - 1) as straight-line code, R a std::integral_constant: loops over the rows of
// a batch are so unrolled before the loop around them is vectorized, and accumulator parts
// indexed by the loop variable stay in registers (with a loop over walk_rows' parts, GCC kept the
// AVX2 build's accumulators on the stack: float32 gradient sums 1.3x slower).
template <typename R, typename Fn>
inline void unrolled(R, const Fn& fn) {
  [&]<int64_t... J>(std::integer_sequence<int64_t, J...>) {
    (fn(J), ...);
  }(std::make_integer_sequence<int64_t, R::value>{});
}

// Walks R rows of len elements as the reductions read them: each kLanes elements on, calls
// prefetch(r, i) for row r at element i, then, row by row, part(r, i, k) for the accumulator parts
// k (lanes [k W, (k + 1) W) take row r's elements from i + k W on, load_lanes); tail(r, i) for the
// elements after the last kLanes. Lane j so sums element i + j of row 0, then of row 1, ..., in
// every build, each row's lanes read with plain loads.
template <int64_t R, typename opmath_t, typename Prefetch, typename Part, typename Tail>
inline void walk_rows(int64_t len, const Prefetch& prefetch, const Part& part, const Tail& tail) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int64_t r = 0; r < R; ++r) prefetch(r, i);
    for (int64_t r = 0; r < R; ++r) {
      unrolled(std::integral_constant<int64_t, Lanes<opmath_t>::kParts>{}, [&](int64_t k) { part(r, i, k); });
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t k = i; k < len; ++k) tail(r, k);
  }
}

// Calls fn(i0, n) for the spans of columns i0 <= i < i0 + n of a batch of R rows of len elements
// that the reductions add at once, each flushed before the next (RowSums::start_batch):
// kFlushElems / R columns, a whole number of kLanes so that every element keeps its lane, the last
// span shorter.
template <int64_t R, typename Fn>
inline void for_row_spans(int64_t len, const Fn& fn) {
  constexpr int64_t kColumns = kFlushElems / R;
  static_assert(kColumns % kLanes == 0, "spans of whole lanes");
  for (int64_t i0 = 0; i0 < len; i0 += kColumns) fn(i0, std::min(kColumns, len - i0));
}

// How far ahead the reductions prefetch, in bytes of one operand's rows: the batch of rows visited
// that much later. The next batch does for long rows, but short ones (small spatial sizes) were
// read before their lines arrived. On the development machine (AMD EPYC, float32, 2 threads; both
// distances timed in turns in one process, three runs) the statistics took 14-16% less time at
// 8192x32x4x4, 4-9% at 256x64x8x8 and 64x256x14x14, 0-10% at 256x64x4x4 and 32x64x16x16; at
// 128x512x7x7 22% less in a run where the machine was loaded and 4% more in two quiet ones.
// 2048 and 8192 bytes measured about as 4096. Training passes whose channels fit in cache
// (resident_group, below) walk several channels' rows, which the hardware prefetcher follows.
constexpr int64_t kPrefetchBytes = 4096;

// Calls row(c, offset, ahead, R) for the rows n0 <= n < n1 of channels c0 <= c < c1 of
// channels-first memory of scalar_t, in memory order, in batches of R rows of one channel: (n, c)
// to (n + R - 1, c), C * S elements apart. offset is where the batch's first row starts, ahead how
// far on the batch visited kPrefetchBytes later starts (0 where that is past the end). R (a
// std::integral_constant) is kStep, and 1 for the rows that do not fill a batch.
template <int64_t kStep, typename scalar_t, typename Fn>
void for_rows(const Layout& l, int64_t c0, int64_t c1, int64_t n0, int64_t n1, const Fn& row) {
  int64_t n = n0;
  const auto batches = [&](auto R) {
    const int64_t batch_bytes = std::max<int64_t>(1, R * l.S * static_cast<int64_t>(sizeof(scalar_t)));
    const int64_t visits = (kPrefetchBytes + batch_bytes - 1) / batch_bytes;
    // The batch visited `visits` after (n, c): channel tc of rows tn on.
    int64_t tn = n + R * (visits / (c1 - c0)), tc = c0 + visits % (c1 - c0);
    for (; n + R <= n1; n += R) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t ahead = tn + R <= n1 ? ((tn - n) * l.C + tc - c) * l.S : 0;
        row(c, (n * l.C + c) * l.S, ahead, R);
        if (++tc == c1) {
          tc = c0;
          tn += R;
        }
      }
    }
  };
  batches(std::integral_constant<int64_t, kStep>{});
  if constexpr (kStep > 1) batches(std::integral_constant<int64_t, 1>{});
}

// Adds (x - K) and (x - K)^2 of R rows of len elements, `stride` apart, to acc.
template <int64_t R, typename scalar_t, typename opmath_t>
void rows_shifted_sums(const scalar_t* x, int64_t stride, int64_t len, int64_t ahead,
                       opmath_t shift, RowSums<opmath_t>& acc) {
  acc.start_batch(R * len);
  LaneParts<opmath_t> lanes(acc);
  walk_rows<R, opmath_t>(
      len, [&](int64_t r, int64_t i) { prefetch_lanes(x + r * stride + i + ahead); },
      [&](int64_t r, int64_t i, int64_t k) {
        const auto d = load_lanes<opmath_t>(x + r * stride + i, k) - shift;
        lanes.v1[k] += d;
        lanes.v2[k] += d * d;
      },
      [&](int64_t r, int64_t i) {
        const opmath_t d = widen<opmath_t>(x[r * stride + i]) - shift;
        lanes.t1 += d;
        lanes.t2 += d * d;
      });
  lanes.store(acc);
}

// The moments of n values from the sums s1 of (x - shift) and s2 of (x - shift)^2.
inline Moments<double> shifted_moments(double n, double shift, double s1, double s2) {
  Moments<double> m;
  if (n == 0.0) return m;
  m.n = n;
  const double mean_d = s1 / n;
  m.mean = shift + mean_d;
  const double m2 = s2 - mean_d * s1;
  m.m2 = m2 < 0.0 ? 0.0 : m2;  // rounding below 0 is clamped; a NaN (NaN or inf input) stays
  return m;
}

// A channel's shift for its shifted sums: its first value, close enough to the mean that the
// squares keep their precision, or 0 where that is not finite (an infinite shift would make
// every deviation infinite, and the mean NaN where torch's is infinite).
template <typename opmath_t>
opmath_t shift_from(opmath_t first) {
  return std::isfinite(first) ? first : opmath_t(0);
}

// Moments of channels c0 <= c < c1 over rows n0 <= n < n1 of channels-first x, into
// out[c - c0], shifted by each channel's first element (shift_from); there is one division per
// channel in all.
template <typename scalar_t, typename opmath_t>
void channel_moments(const scalar_t* x, const Layout& l, int64_t c0, int64_t c1, int64_t n0,
                     int64_t n1, Moments<double>* out) {
  if (n0 == n1 || l.S == 0) {
    std::fill(out, out + (c1 - c0), Moments<double>{});
    return;
  }
  const auto shift = [&](int64_t c) { return shift_from(widen<opmath_t>(x[(n0 * l.C + c) * l.S])); };
  c10::SmallVector<RowSums<opmath_t>, 1> acc(c1 - c0);  // tasks of one channel allocate nothing
  for_rows<kBatchRows, scalar_t>(l, c0, c1, n0, n1, [&](int64_t c, int64_t off, int64_t ahead, auto R) {
    constexpr int64_t kR = decltype(R)::value;
    for_row_spans<kR>(l.S, [&](int64_t i0, int64_t n) {
      rows_shifted_sums<kR>(x + off + i0, l.C * l.S, n, ahead, shift(c), acc[c - c0]);
    });
  });
  for (int64_t c = c0; c < c1; ++c) {
    auto& sums = acc[c - c0];
    sums.flush();
    out[c - c0] = shifted_moments(static_cast<double>((n1 - n0) * l.S),
                                  static_cast<double>(shift(c)), sums.s1, sums.s2);
  }
}

// Adds dy and dy (x - mean) of R rows of channel c, len elements each starting at begin,
// begin + stride, ..., to acc; with a gate, dy counts only where it is open. With a saved gate,
// `gated` (or null) gets the gated dy (store_gated).
template <int64_t R, typename scalar_t, typename opmath_t>
void rows_grad_sums(const scalar_t* dy, const GateOf<scalar_t>& gate, const scalar_t* x,
                    scalar_t* gated, int64_t begin, int64_t stride, int64_t len, int64_t ahead,
                    int64_t c, opmath_t mean, RowSums<opmath_t>& acc) {
  using L = Lanes<opmath_t>;
  const bool recompute = gate.coeffs != nullptr;  // then gate.g is x itself
  opmath_t gm = 0, gb = 0, gd = 0, above = 0;  // open unless the gate value is <= above
  if (recompute) {
    gm = gate.coeffs[kM * gate.C + c];
    gb = gate.coeffs[kB * gate.C + c];
    gd = gate.coeffs[kD * gate.C + c];
    above = zero_rounding_bound<scalar_t, opmath_t>();
  }
  acc.start_batch(R * len);
  LaneParts<opmath_t> lanes(acc);
  walk_rows<R, opmath_t>(
      len,
      [&](int64_t r, int64_t i) {
        const int64_t at = begin + r * stride + i + ahead;
        prefetch_lanes(dy + at);
        prefetch_lanes(x + at);
        if (gate.g && !recompute) prefetch_lanes(gate.g + at);
      },
      [&](int64_t r, int64_t i, int64_t k) {
        const int64_t at = begin + r * stride + i;
        auto g = load_lanes<opmath_t>(dy + at, k);
        const auto v = load_lanes<opmath_t>(x + at, k);
        if (gate.g) {
          // The saved output, or as relu_open recomputes it: normalized(), lane by lane.
          const auto open = recompute ? gd + (v - gm) * gb : load_lanes<opmath_t>(gate.g + at, k);
          const auto closed = open <= above;  // relu_passes: open for NaN too
          g = closed ? typename L::Part{} : g;
          if (gated) store_gated<opmath_t>(gated + at, dy + at, k, closed);
        }
        lanes.v1[k] += g;
        lanes.v2[k] += g * (v - mean);
      },
      // The same for one element, with the channel's coefficients as above, not looked up per
      // element (GateView::open): rows shorter than kLanes are all tail, and with the lookups the
      // gated sums took 7x the time of the statistics there.
      [&](int64_t r, int64_t i) {
        const int64_t at = begin + r * stride + i;
        opmath_t g = widen<opmath_t>(dy[at]);
        const opmath_t v = widen<opmath_t>(x[at]);
        if (gate.g) {
          const opmath_t open = recompute ? gd + (v - gm) * gb : widen<opmath_t>(gate.g[at]);
          const bool passes = relu_passes(open, above);
          g = passes ? g : opmath_t(0);
          if (gated) gated[at] = passes ? dy[at] : scalar_t(0);
        }
        lanes.t1 += g;
        lanes.t2 += g * (v - mean);
      });
  lanes.store(acc);
}

// sum(dy) and sum(dy (x - mean)) of channels c0 <= c < c1 over rows n0 <= n < n1 of
// channels-first memory, into sdy[c - c0] and sdx[c - c0]; the gated dy into `gated` (or null).
template <typename scalar_t, typename opmath_t>
void channel_grad_sums(const scalar_t* dy, const GateOf<scalar_t>& gate, const scalar_t* x,
                       scalar_t* gated, const Layout& l, int64_t c0, int64_t c1, int64_t n0,
                       int64_t n1, const opmath_t* mean, double* sdy, double* sdx) {
  c10::SmallVector<RowSums<opmath_t>, 1> acc(c1 - c0);
  for_rows<kBatchRows, scalar_t>(l, c0, c1, n0, n1, [&](int64_t c, int64_t off, int64_t ahead, auto R) {
    constexpr int64_t kR = decltype(R)::value;
    for_row_spans<kR>(l.S, [&](int64_t i0, int64_t n) {
      rows_grad_sums<kR>(dy, gate, x, gated, off + i0, l.C * l.S, n, ahead, c, mean[c], acc[c - c0]);
    });
  });
  for (int64_t c = c0; c < c1; ++c) {
    acc[c - c0].flush();
    sdy[c - c0] = acc[c - c0].s1;
    sdx[c - c0] = acc[c - c0].s2;
  }
}

// Channels-last passes sweep over the channels of kBatchRows rows at once where a row takes at
// least kMinBatchRowBytes: each channel's sums or coefficients are then loaded and stored once
// per four rows. Measured on the development machine (float32, against row by row): statistics
// 1.3-1.8x faster with 1024 to 4096 channels, gradient sums 1.0-1.5x, the elementwise pass
// 0.85-1.1x (noise); on shorter rows (256 or 512 channels) all three were 10-40% slower.
constexpr int64_t kMinBatchRowBytes = 4096;

// Calls fn(r, R) for rows r0 <= r < r1 of channels-last memory in batches of R rows, r to
// r + R - 1; R (a std::integral_constant) is kBatchRows for rows of kMinBatchRowBytes or more, and
// 1 for the rows left over and for shorter rows (in both builds alike, so that they sum in the
// same order).
template <typename scalar_t, typename Fn>
void for_row_batches(const Layout& l, int64_t r0, int64_t r1, const Fn& fn) {
  int64_t r = r0;
  if (l.C * static_cast<int64_t>(sizeof(scalar_t)) >= kMinBatchRowBytes) {
    for (; r + kBatchRows <= r1; r += kBatchRows) fn(r, std::integral_constant<int64_t, kBatchRows>{});
  }
  for (; r < r1; ++r) fn(r, std::integral_constant<int64_t, 1>{});
}

// The elementwise passes go over memory in spans of at most kSpan<scalar_t> elements: 512, or
// kStagedSpan where staged (common/staged.h), whose full spans then run with a compile-time size
// (FullSpan).
template <typename scalar_t>
constexpr int64_t kSpan = staged_span<scalar_t> ? kStagedSpan : 512;

template <typename T>
T* shifted(T* p, int64_t i) {
  return p ? p + i : nullptr;
}

// Whether the channels-last reductions read scalar_t a SIMD part at a time (row_columns): float16
// outside the baseline build. GCC converts float16 one value at a time in a plain loop; staged
// through float copies (common/staged.h) instead, the reductions took 1.3-1.9x bfloat16's time.
template <typename scalar_t>
constexpr bool reads_parts = MK_CPU_ISA_LEVEL >= 1 && std::is_same_v<scalar_t, c10::Half>;

// A part (Lanes<T>) stored at p, as a store of T's: through std::memcpy, which may write any
// object, GCC reloaded the loop's pointers from the stack after every store (float16 statistics
// over 256 channels 5-15% slower).
template <typename T, typename Part>
inline void store_part(T* p, const Part& v) {
  static_assert(sizeof(Part) == Lanes<T>::kWidth * sizeof(T), "a part of T");
  typedef Part Unaligned __attribute__((aligned(alignof(T))));
  *reinterpret_cast<Unaligned*>(p) = v;
}

// Adds R channels-last rows from row r on (R as for_row_batches gives it) into the sums a[c] and
// b[c] of their C channels: cols(c0, n, stride, v...) adds channels c0 <= c < c0 + n, v being
// the operands' views, in the order given: channel c0 + k of row r + j is v[j * stride + k], each
// read with widen. A view is the operand's memory from row r and channel c0 on (stride = C).
// Where reads_parts, the channels go Lanes<float>::kWidth at a time through add_part(i, c, s, t)
// first, which adds the part of channels c on that starts at element i (row r + j's, rows in
// order; load_lanes, converted in registers) into the parts s and t, from zero, then into a and
// b: per channel, cols' operations. The channels left over reach cols as float copies (stride = Lanes<float>::kWidth;
// read from memory with widen instead, the 8 left over of 40 channels made the statistics 2x
// slower). Null operands stay null.
template <typename R, typename Cols, typename AddPart, typename opmath_t, typename scalar_t,
          typename... More>
inline void row_columns(int64_t r, R, int64_t C, const Cols& cols, const AddPart& add_part,
                        opmath_t* a, opmath_t* b, const scalar_t* first, More... more) {
  if constexpr (reads_parts<scalar_t>) {
    using Part = typename Lanes<opmath_t>::Part;
    constexpr int64_t W = Lanes<opmath_t>::kWidth;
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W) {
      Part s{}, t{};
      unrolled(R{}, [&](int64_t j) { add_part((r + j) * C + c0, c0, s, t); });
      store_part(a + c0, load_lanes<opmath_t>(a + c0, 0) + s);
      store_part(b + c0, load_lanes<opmath_t>(b + c0, 0) + t);
    }
    if (c0 == C) return;
    constexpr size_t kViews = 1 + sizeof...(More);
    const std::array<const scalar_t*, kViews> from{first, more...};
    alignas(64) float buf[kViews][R::value * W];
    std::array<const float*, kViews> v{};
    for (size_t k = 0; k < kViews; ++k) {
      if (from[k]) {
        for (int64_t j = 0; j < R::value; ++j) {
          widen_block(from[k] + (r + j) * C + c0, buf[k] + j * W, C - c0);
        }
        v[k] = buf[k];
      }
    }
    // Not std::apply, which is compiled for the baseline ISA and so cannot inline this body.
    [&]<size_t... K>(std::index_sequence<K...>) MK_SPAN_BODY {
      cols(c0, C - c0, W, v[K]...);
    }(std::make_index_sequence<kViews>{});
  } else {
    cols(int64_t{0}, C, C, shifted(first, r * C), shifted(more, r * C)...);
  }
}

// The channels-last passes run with C known at compile time where C is 32, 64 or 128: they keep
// per-channel values in local arrays across rows (the elementwise pass's coefficients, the
// reductions' sums, whose loops are then left with no store, so that the compiler may also hold
// the shift, mean and gate coefficients they read), which the compiler holds in registers where
// they fit, instead of loading (and, for sums, storing) them per element. In a model of the
// elementwise loop (benchmarks/loop_models, float32, 2 threads) that took 0.65-0.75x the time of
// reading three coefficients per element with the tensor in cache, and from memory about as long
// as the channels-first loop, whose coefficients are in registers anyway (modules:
// benchmarks/TUNING.md, "Known gaps"). The forward's elementwise passes (three coefficients)
// also take 256 channels, whose coefficients GCC spills to the stack, still faster than reading
// them from the coefficient rows: BatchNorm2d eval on 8x256x56x56 channels_last from
// 0.71-0.78x of torch's speed to 0.95-1.15x in float32, 0.84-0.98x to 1.06-1.18x in float16
// (alternating processes, 3 runs);
// with the backward's (up to six) and the reductions', 256 made BatchNormReLU2d's training 15%
// slower. Calls fn(std::integral_constant<int64_t, C>{}) and returns true for those
// C (and 256 where wide), false for the others.
template <bool kWide = false, typename Fn>
bool with_registered_channels(int64_t C, const Fn& fn) {
  const auto call = [&]<int64_t... K>(std::integer_sequence<int64_t, K...>) {
    return ((C == K && (fn(std::integral_constant<int64_t, K>{}), true)) || ...);
  };
  if constexpr (kWide) return call(std::integer_sequence<int64_t, 32, 64, 128, 256>{});
  return call(std::integer_sequence<int64_t, 32, 64, 128>{});
}

// Adds rows r0 <= r < r1 of K channels-last channels (K known at compile time,
// with_registered_channels) into a[c] and b[c]: add(i, c, s, q) adds element i, of channel c, to
// s and q, which are local arrays for the block (in registers, where they fit) added into a and b
// at its end: the same sums as row by row into a and b, which the block starts with at zero.
template <int64_t K, typename opmath_t, typename Add>
void registered_block(int64_t r0, int64_t r1, opmath_t* a, opmath_t* b, const Add& add) {
  opmath_t s[K] = {}, q[K] = {};
  for (int64_t r = r0; r < r1; ++r) {
    _Pragma("GCC ivdep")  // channel c of a row: no dependence between iterations
    for (int64_t c = 0; c < K; ++c) add(r * K + c, c, s[c], q[c]);
  }
  for (int64_t c = 0; c < K; ++c) {
    a[c] += s[c];
    b[c] += q[c];
  }
}

// registered_block for reads_parts: the K channels' sums as K / W parts (W = Lanes<opmath_t>::kWidth)
// that add_part(i, c, s, q) adds the part of channels c on starting at element i into. The same
// sums, in the same order, as the per-element block.
template <int64_t K, typename opmath_t, typename AddPart>
void registered_parts_block(int64_t r0, int64_t r1, opmath_t* a, opmath_t* b, const AddPart& add_part) {
  using L = Lanes<opmath_t>;
  static_assert(K % L::kWidth == 0, "whole parts");
  constexpr int64_t kParts = K / L::kWidth;
  typename L::Part s[kParts] = {}, q[kParts] = {};
  for (int64_t r = r0; r < r1; ++r) {
    unrolled(std::integral_constant<int64_t, kParts>{}, [&](int64_t p) {
      add_part(r * K + p * L::kWidth, p * L::kWidth, s[p], q[p]);
    });
  }
  for (int64_t p = 0; p < kParts; ++p) {
    store_part(a + p * L::kWidth, load_lanes<opmath_t>(a + p * L::kWidth, 0) + s[p]);
    store_part(b + p * L::kWidth, load_lanes<opmath_t>(b + p * L::kWidth, 0) + q[p]);
  }
}

// Two sums per channel over the N * S rows of channels-last memory, into s1 and s2 (C each). A task
// is a range of rows, one per thread, and at least kMinTaskRows rows; it adds blocks of rows
// (>= kMinBlockRows) into opmath sums
// a[c] and b[c] with add_rows(r, R, a, b), which adds rows r to r + R - 1 (R as for_row_batches
// gives it), and adds the blocks' sums in double. Tasks' sums add up per channel, in order, at the
// end. (Four tasks per thread, each with its C partial sums to clear and merge, measured 1.1-1.5x
// slower with 512 to 4096 channels.) With 32, 64 or 128 channels a block goes through
// registered_block with add_element(i, c, s, q) instead, or where reads_parts through
// registered_parts_block with add_part (row_columns). block_done(r0, r1) follows each block of
// rows r0 <= r < r1.
// A task's per-channel work (clearing, merging and handing over its sums) weighs like tens of rows:
// on the Intel Xeon VM (2026-12-05), the statistics and gradient sums of 8 to 32 rows of 4608
// channels (8x512x3x3 walked as columns, 8x4608) took 13-28 us on one thread and 26-44 us split
// over two; at 64 rows two threads were level or faster.
constexpr int64_t kMinTaskRows = 32;

template <typename scalar_t, typename opmath_t, typename AddRows, typename AddElement,
          typename AddPart, typename BlockDone>
void rows_last_sums(const Layout& l, const AddRows& add_rows, const AddElement& add_element,
                    const AddPart& add_part, const BlockDone& block_done, std::vector<double>& s1,
                    std::vector<double>& s2) {
  const int64_t C = l.C;
  const int64_t rows = l.N * l.S;
  const int64_t chunks = std::clamp<int64_t>(rows / kMinTaskRows, 1, at::get_num_threads());
  const int64_t block_rows =
      std::clamp<int64_t>(kBlockElems / std::max<int64_t>(C, 1), kMinBlockRows, kMaxBlockRows);
  std::vector<double> p1(chunks * C, 0.0), p2(chunks * C, 0.0);
  at::parallel_for(0, chunks, grain_for(rows / chunks * C), [&](int64_t k0, int64_t k1) {
    std::vector<opmath_t> a(C), b(C);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t end = rows * (k + 1) / chunks;
      for (int64_t r0 = rows * k / chunks; r0 < end; r0 += block_rows) {
        std::fill(a.begin(), a.end(), opmath_t(0));
        std::fill(b.begin(), b.end(), opmath_t(0));
        const int64_t r1 = std::min(end, r0 + block_rows);
        const auto registered = [&](auto kC) {
          if constexpr (reads_parts<scalar_t>) {
            registered_parts_block<decltype(kC)::value>(r0, r1, a.data(), b.data(), add_part);
          } else {
            registered_block<decltype(kC)::value>(r0, r1, a.data(), b.data(), add_element);
          }
        };
        if (!with_registered_channels(C, registered)) {
          for_row_batches<scalar_t>(l, r0, r1, [&](int64_t r, auto R) { add_rows(r, R, a.data(), b.data()); });
        }
        block_done(r0, r1);
        for (int64_t c = 0; c < C; ++c) {
          p1[k * C + c] += a[c];
          p2[k * C + c] += b[c];
        }
      }
    }
  });
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += p1[k * C + c];
      s2[c] += p2[k * C + c];
    }
  }
}

// ---------------------------------------------------------------------------- short rows

// Channels-first memory with short rows (1 < S < kShortRow) is walked as channels-last: memory
// (N, C, S) is also N rows of C * S columns, column j belonging to channel j / S. Walked row by
// row, each (n, c) row of a few values costs a loop's setup and a tail (BatchNorm2d eval on
// 8x512x2x2 took 1.6x torch's time in float32 and 2.3x in bfloat16, forward+backward on
// 8x256x4x4 1.3x; TUNING.md). The columns read per-channel operands repeated S times
// (per_column), and their sums are folded into their channel's in double. The reductions take
// columns for rows under kShortRow values, the elementwise pass (no per-task sums to merge) under
// kShortAffineRow: with 4x4 and 5x5 rows the reductions' columns measured slower, its faster.
constexpr int64_t kShortRow = 16;
constexpr int64_t kShortAffineRow = 32;

Layout walked(const Layout& l, int64_t bound = kShortRow) {
  const bool short_rows = !l.channels_last && l.S > 1 && l.S < bound;
  return short_rows ? Layout{l.N, l.C * l.S, 1, true} : l;
}

// Rows of C per-channel values (row-major), each value repeated S times: rows of C * S.
template <typename T>
std::vector<T> per_column(const T* v, int64_t rows, int64_t C, int64_t S) {
  std::vector<T> out(rows * C * S);
  for (int64_t i = 0; i < rows * C; ++i) std::fill_n(out.data() + i * S, S, v[i]);
  return out;
}

// The sum of a channel's S per-column values, in double, in column order.
inline double fold_columns(const double* columns, int64_t S) {
  return std::accumulate(columns + 1, columns + S, columns[0]);
}

// A recomputed gate read per column: its forward coefficients (rows kA to kD) repeated S times
// into `store`. A gate without coefficients is returned as it is.
template <typename scalar_t, typename T>
GateView<scalar_t, T> per_column(const GateView<scalar_t, T>& gate, int64_t S, std::vector<T>& store) {
  if (!gate.coeffs) return gate;
  store = per_column(gate.coeffs, kD + 1, gate.C, S);
  return {gate.g, store.data(), gate.C * S};
}

// ------------------------------------------------------------------------------- moments

template <typename scalar_t>
void moments_kernel(const at::Tensor& x_t, const Layout& layout, const at::Tensor& mean_t,
                    const at::Tensor& var_t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x = x_t.const_data_ptr<scalar_t>();
  const Layout l = walked(layout);
  const int64_t C = l.C;
  const int64_t S = C / layout.C;  // columns per channel
  std::vector<Moments<double>> total(layout.C);
  if (!l.channels_last) {
    const int64_t per = tasks_per_channel(l);
    std::vector<Moments<double>> part(C * per);
    for_channel_tasks(l, per, [&](int64_t t, int64_t c, int64_t n0, int64_t n1) {
      channel_moments<scalar_t, opmath_t>(x, l, c, c + 1, n0, n1, &part[t]);
    });
    for (int64_t t = 0; t < C * per; ++t) total[t / per].merge(part[t]);
  } else {
    // One shift per channel for the whole batch (its first element, for each of its columns where
    // walked), so the tasks' and the columns' shifted sums simply add up, with no per-block
    // divisions or merges. (With a shift per column, walked columns' moments were merged with
    // two divisions each: the statistics of 8x512x3x3 took 25 us on one thread, now 14 us.)
    std::vector<opmath_t> shift(C);
    for (int64_t c = 0; c < C; c += S) std::fill_n(shift.begin() + c, S, shift_from(widen<opmath_t>(x[c])));
    // Value v of channel c into the sums s and q.
    const auto add = [&](opmath_t v, int64_t c, opmath_t& s, opmath_t& q) {
      const opmath_t d = v - shift[c];
      s += d;
      q += d * d;
    };
    // add for the part of channels c on that starts at element i (reads_parts).
    const auto add_part = [&](int64_t i, int64_t c, auto& s, auto& q) MK_SPAN_BODY {
      const auto d = load_lanes<opmath_t>(x + i, 0) - load_lanes<opmath_t>(shift.data() + c, 0);
      s += d;
      q += d * d;
    };
    std::vector<double> s1, s2;
    rows_last_sums<scalar_t, opmath_t>(l, [&](int64_t r, auto R, opmath_t* a, opmath_t* b) {
      const auto cols = [&](int64_t c0, int64_t n, int64_t stride, const auto* xv) MK_SPAN_BODY {
        _Pragma("GCC ivdep")  // column c of R rows: no dependence between iterations
        for (int64_t k = 0; k < n; ++k) {
          const int64_t c = c0 + k;
          opmath_t sum = 0, sq = 0;
          unrolled(R, [&](int64_t j) { add(widen<opmath_t>(xv[j * stride + k]), c, sum, sq); });
          a[c] += sum;
          b[c] += sq;
        }
      };
      row_columns(r, R, C, cols, add_part, a, b, x);
    }, [&](int64_t i, int64_t c, opmath_t& s, opmath_t& q) { add(widen<opmath_t>(x[i]), c, s, q); }, add_part,
    [](int64_t, int64_t) {}, s1, s2);
    for (int64_t c = 0; c < layout.C; ++c) {
      total[c] = shifted_moments(static_cast<double>(l.N * l.S * S), static_cast<double>(shift[c * S]),
                                 fold_columns(s1.data() + c * S, S), fold_columns(s2.data() + c * S, S));
    }
  }
  opmath_t* mean = mean_t.data_ptr<opmath_t>();
  opmath_t* var = var_t.data_ptr<opmath_t>();
  for (int64_t c = 0; c < layout.C; ++c) {
    mean[c] = static_cast<opmath_t>(total[c].mean);
    var[c] = static_cast<opmath_t>(total[c].n > 0 ? total[c].m2 / total[c].n : 0.0);
  }
}

void moments_cpu(const at::Tensor& x, const Layout& l, const at::Tensor& mean, const at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modekernels_bn_moments", [&] {
    moments_kernel<scalar_t>(x, l, mean, var);
  });
}

// ----------------------------------------------------------------------------- grad sums

template <typename scalar_t>
void grad_sums_kernel(const at::Tensor& dy_t, const Gate& gate_t, const at::Tensor& x_t,
                      const Layout& layout, const at::Tensor& mean_t, const at::Tensor& sum_dy_t,
                      const at::Tensor& sum_dy_xmu_t, const at::Tensor& gated_t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* dy = dy_t.const_data_ptr<scalar_t>();
  auto gate = gate_view<scalar_t>(gate_t);
  const scalar_t* x = x_t.const_data_ptr<scalar_t>();
  scalar_t* gated = gated_t.defined() ? gated_t.data_ptr<scalar_t>() : nullptr;
  const opmath_t* mean = mean_t.const_data_ptr<opmath_t>();
  const Layout l = walked(layout);
  const int64_t C = l.C;
  const int64_t S = C / layout.C;  // columns per channel
  std::vector<opmath_t> column_mean, column_gate;
  if (S > 1) {
    column_mean = per_column(mean, 1, layout.C, S);
    mean = column_mean.data();
    gate = per_column(gate, S, column_gate);
  }
  std::vector<double> sdy(C, 0.0), sdx(C, 0.0);
  if (!l.channels_last) {
    const int64_t per = tasks_per_channel(l);
    std::vector<double> pdy(C * per), pdx(C * per);
    for_channel_tasks(l, per, [&](int64_t t, int64_t c, int64_t n0, int64_t n1) {
      channel_grad_sums<scalar_t, opmath_t>(dy, gate, x, gated, l, c, c + 1, n0, n1, mean, &pdy[t],
                                            &pdx[t]);
    });
    for (int64_t t = 0; t < C * per; ++t) {
      sdy[t / per] += pdy[t];
      sdx[t / per] += pdx[t];
    }
  } else {
    // The gate's kind is compiled in, and a recomputed gate's coefficients are read per column as
    // the mean is (GateView::passes per element, which tests which kind it is and indexes the
    // coefficients, kept the loop from vectorizing: BatchNormReLU2d's backward on 128x256x8x8
    // channels_last took 12 ms, 3x its channels-first time). So is how a saved gate's pass
    // writes the gated dy (`write`, a GatedWrite constant).
    const opmath_t* gm = gate.coeffs ? gate.coeffs + kM * gate.C : nullptr;
    const opmath_t* gb = gate.coeffs ? gate.coeffs + kB * gate.C : nullptr;
    const opmath_t* gd = gate.coeffs ? gate.coeffs + kD * gate.C : nullptr;
    const opmath_t above = zero_rounding_bound<scalar_t, opmath_t>();
    const auto sums = [&](auto kind, auto write) {
      constexpr GateKind K = decltype(kind)::value;
      constexpr GatedWrite kWrite = decltype(write)::value;
      using Stores = std::bool_constant<kWrite == GatedWrite::kStore>;
      // dy d (as read: scalar_t, or a float copy of it) and input v of element i, channel c (and
      // its saved gate value s, for kSavedGate) into the sums; with `w` (a std::bool_constant)
      // true, the gated dy into `gated`, stored from d, which is read either way (read again from
      // dy where the gate is open, the loop did not vectorize: float32 BatchNormAddReLU2d's
      // backward on 8x256x56x56 channels_last took 21 ms, not 6).
      const auto adder = [&](auto w) {
        constexpr bool kW = decltype(w)::value;
        return [&](auto d, opmath_t v, [[maybe_unused]] opmath_t s, int64_t c,
                   [[maybe_unused]] int64_t i, opmath_t& sum, opmath_t& dot) {
          opmath_t g = widen<opmath_t>(d);
          // GateView::passes: relu_passes of the saved output, or relu_open of the input.
          if constexpr (K == kSavedGate) {
            const bool passes = relu_passes(s);
            g = passes ? g : opmath_t(0);
            if constexpr (kW) gated[i] = passes ? narrow<scalar_t>(d) : scalar_t(0);
          }
          if constexpr (K == kRecomputedGate) {
            g = relu_passes(gd[c] + (v - gm[c]) * gb[c], above) ? g : opmath_t(0);
          }
          sum += g;
          dot += g * (v - mean[c]);
        };
      };
      const auto gate_value = [](const auto* gv, int64_t i) {
        return K == kSavedGate ? widen<opmath_t>(gv[i]) : opmath_t(0);
      };
      // adder for the part of channels c on that starts at element i (reads_parts), lane by lane.
      const auto part_adder = [&](auto w) {
        constexpr bool kW = decltype(w)::value;
        return [&](int64_t i, int64_t c, auto& sum, auto& dot) MK_SPAN_BODY {
          using Part = std::remove_reference_t<decltype(sum)>;
          const auto at = [&](const opmath_t* v) { return load_lanes<opmath_t>(v + c, 0); };
          Part g = load_lanes<opmath_t>(dy + i, 0);
          const Part v = load_lanes<opmath_t>(x + i, 0);
          if constexpr (K == kSavedGate) {
            const auto closed = load_lanes<opmath_t>(gate.g + i, 0) <= opmath_t(0);
            g = closed ? Part{} : g;
            if constexpr (kW) store_gated<opmath_t>(gated + i, dy + i, 0, closed);
          }
          if constexpr (K == kRecomputedGate) g = at(gd) + (v - at(gm)) * at(gb) <= above ? Part{} : g;
          sum += g;
          dot += g * (v - at(mean));
        };
      };
      const auto add = adder(std::false_type{});
      // Rows that the reductions sweep a few at a time (no registered channels) get their gated dy
      // from a loop of its own over them, from L1: stored in the sweep over their channels, whose
      // sums are in memory, the pass took 1.3x as long (float32, 256 channels: 3.8 ms, not 2.9).
      // Streamed, registered channels store theirs after each block, from L2 (their sums' loops
      // store element by element, which cannot stream).
      constexpr bool kStream = kWrite == GatedWrite::kStream;
      const bool registered = with_registered_channels(C, [](auto) {});
      rows_last_sums<scalar_t, opmath_t>(l, [&](int64_t r, auto R, opmath_t* a, opmath_t* b) {
        const auto cols = [&](int64_t c0, int64_t n, int64_t stride, const auto* dyv, const auto* xv,
                              const auto* gv) MK_SPAN_BODY {
          _Pragma("GCC ivdep")  // column c of R rows: no dependence between iterations
          for (int64_t k = 0; k < n; ++k) {
            const int64_t c = c0 + k;
            opmath_t sum = 0, dot = 0;
            unrolled(R, [&](int64_t j) {
              const int64_t i = j * stride + k;
              add(dyv[i], widen<opmath_t>(xv[i]), gate_value(gv, i), c, i, sum, dot);
            });
            a[c] += sum;
            b[c] += dot;
          }
        };
        row_columns(r, R, C, cols, part_adder(std::false_type{}), a, b, dy, x,
                    K == kSavedGate ? gate.g : nullptr);
        if constexpr (kWrite != GatedWrite::kNone) {
          store_gated_span<opmath_t, kStream>(gated, dy, gate.g, r * C, (r + R) * C);
        }
      }, [&, element = adder(Stores{})](int64_t i, int64_t c, opmath_t& sum, opmath_t& dot) {
        element(dy[i], widen<opmath_t>(x[i]), gate_value(gate.g, i), c, i, sum, dot);
      }, part_adder(Stores{}), [&](int64_t r0, int64_t r1) {
        if constexpr (kStream) {
          if (registered) store_gated_span<opmath_t, true>(gated, dy, gate.g, r0 * C, r1 * C);
          stream_fence();
        }
      }, sdy, sdx);
    };
    if (!gate.g) {
      sums(std::integral_constant<GateKind, kNoGate>{}, Write<GatedWrite::kNone>{});
    } else if (gate.coeffs) {
      sums(std::integral_constant<GateKind, kRecomputedGate>{}, Write<GatedWrite::kNone>{});
    } else if (gated && streams(gated_t)) {
      sums(std::integral_constant<GateKind, kSavedGate>{}, Write<GatedWrite::kStream>{});
    } else if (gated) {
      sums(std::integral_constant<GateKind, kSavedGate>{}, Write<GatedWrite::kStore>{});
    } else {
      sums(std::integral_constant<GateKind, kSavedGate>{}, Write<GatedWrite::kNone>{});
    }
  }
  opmath_t* out_dy = sum_dy_t.data_ptr<opmath_t>();
  opmath_t* out_dx = sum_dy_xmu_t.data_ptr<opmath_t>();
  for (int64_t c = 0; c < layout.C; ++c) {
    out_dy[c] = static_cast<opmath_t>(fold_columns(sdy.data() + c * S, S));
    out_dx[c] = static_cast<opmath_t>(fold_columns(sdx.data() + c * S, S));
  }
}

void grad_sums_cpu(const at::Tensor& dy, const Gate& gate, const at::Tensor& x, const Layout& l,
                   const at::Tensor& mean, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                   const at::Tensor& gated) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modekernels_bn_grad_sums", [&] {
    grad_sums_kernel<scalar_t>(dy, gate, x, l, mean, sum_dy, sum_dy_xmu, gated);
  });
}

// ------------------------------------------------------------------------------- affine

// Which operands an elementwise pass has, fixed at compile time so that every variant's inner
// loop stays branch-free and vectorizes: kGate (the fused-ReLU backward: a GateKind), kResidual,
// kRelu, kGatedOut (the fused-residual backward). A recomputed gate's tensor is the input x, which
// is q itself where the pass has q (training): kGateIsQ, whose loops read and convert x once.

template <bool P, bool Q, GateKind G, bool R, bool L, bool W = false>
struct Variant {
  static constexpr bool kHasP = P, kHasQ = Q, kResidual = R, kRelu = L, kGatedOut = W;
  static constexpr GateKind kGate = G;
  static constexpr bool kGateIsQ = G == kRecomputedGate && Q;
};

// fn(Variant<...>{}) for the combinations the op bodies use: forward (q; + residual, relu),
// backward (p, or p and q in training; + a saved gate, and gated_out, or a recomputed gate).
template <typename scalar_t, typename Fn>
void with_variant(const AffinePtrs<scalar_t>& in, const Fn& fn) {
  if (!in.p) {
    if (in.residual) {
      in.relu ? fn(Variant<false, true, kNoGate, true, true>{}) : fn(Variant<false, true, kNoGate, true, false>{});
    } else {
      in.relu ? fn(Variant<false, true, kNoGate, false, true>{}) : fn(Variant<false, true, kNoGate, false, false>{});
    }
  } else if (!in.gate.g) {
    in.q ? fn(Variant<true, true, kNoGate, false, false>{}) : fn(Variant<true, false, kNoGate, false, false>{});
  } else if (in.gate.coeffs) {
    TORCH_INTERNAL_ASSERT(!in.q || in.q == in.gate.g, "a recomputed gate reads x, which is q");
    in.q ? fn(Variant<true, true, kRecomputedGate, false, false>{})
         : fn(Variant<true, false, kRecomputedGate, false, false>{});
  } else if (in.gated_out) {
    in.q ? fn(Variant<true, true, kSavedGate, false, false, true>{})
         : fn(Variant<true, false, kSavedGate, false, false, true>{});
  } else {
    in.q ? fn(Variant<true, true, kSavedGate, false, false>{}) : fn(Variant<true, false, kSavedGate, false, false>{});
  }
}

// Element i with its channel's coefficients (a, b, m, d; gb, gd for a recomputed gate), its
// operands and results stored as S: scalar_t, or float buffers where staged (affine_span);
// a recomputed gate is tested for scalar_t either way. The pointers are taken by value: held in
// locals, the compiler knows that stores to `out` cannot change them, and the loops that call
// this vectorize.
template <typename V, typename scalar_t, typename S, typename opmath_t>
inline void affine_element(AffinePtrs<S> in, int64_t i, opmath_t a, opmath_t b, opmath_t m,
                           opmath_t d, opmath_t gb, opmath_t gd, S* out) {
  opmath_t v;
  if constexpr (V::kHasP) {
    bool open = true;
    if constexpr (V::kGate == kSavedGate) open = relu_passes(widen<opmath_t>(in.gate.g[i]));
    if constexpr (V::kGate == kRecomputedGate) {
      open = relu_open<scalar_t>(widen<opmath_t>((V::kGateIsQ ? in.q : in.gate.g)[i]), m, gb, gd);
    }
    const opmath_t pv = widen<opmath_t>(in.p[i]);  // loaded either way: no branch
    const opmath_t g = open ? pv : opmath_t(0);
    if constexpr (V::kGatedOut) in.gated_out[i] = narrow<S>(g);
    v = d + g * a;
    if constexpr (V::kHasQ) v += (widen<opmath_t>(in.q[i]) - m) * b;
  } else {
    v = normalized(widen<opmath_t>(in.q[i]), m, b, d);  // what a recomputed gate recomputes
  }
  if constexpr (V::kResidual) v += widen<opmath_t>(in.residual[i]);
  if constexpr (V::kRelu) v = v < opmath_t(0) ? opmath_t(0) : v;  // NaN stays NaN, as in torch.relu
  out[i] = narrow<S>(v);
}

// Calls element(ptrs, k, o) for the elements i0 + k, k < n <= kSpan, of a pass: ptrs and o are
// `in` and `out` from element i0 on or, for float16 and bfloat16 in the AVX2 and AVX-512 builds,
// float copies filled before the loop and stored after it (common/staged.h). With `stream`
// (common/stream.h), staged outputs go past the caches as they are narrowed (narrow_block),
// others to a buffer in L1 first, which stream_span copies to `out`.
template <typename V, typename scalar_t, typename N, typename Element>
MK_SPAN_BODY inline void affine_span(const AffinePtrs<scalar_t>& in, int64_t i0, N n, scalar_t* out,
                                     bool stream, const Element& element) {
  if constexpr (staged_span<scalar_t>) {
    alignas(64) float p[kStagedSpan], q[kStagedSpan], g[kStagedSpan], residual[kStagedSpan],
        o[kStagedSpan], gated[kStagedSpan];
    if constexpr (V::kHasP) widen_block(in.p + i0, p, n);
    if constexpr (V::kHasQ || !V::kHasP) widen_block(in.q + i0, q, n);
    if constexpr (V::kGate != kNoGate && !V::kGateIsQ) widen_block(in.gate.g + i0, g, n);
    if constexpr (V::kResidual) widen_block(in.residual + i0, residual, n);
    const AffinePtrs<float> staged{p, q, {g, in.gate.coeffs, in.gate.C}, residual, in.relu, gated};
    for (int64_t k = 0; k < n; ++k) element(staged, k, o);
    narrow_block(o, out + i0, n, stream);
    if constexpr (V::kGatedOut) narrow_block(gated, in.gated_out + i0, n, stream);
  } else {
    const AffinePtrs<scalar_t> from{shifted(in.p, i0), shifted(in.q, i0),
                                    {shifted(in.gate.g, i0), in.gate.coeffs, in.gate.C},
                                    shifted(in.residual, i0), in.relu, shifted(in.gated_out, i0)};
    if (stream) {
      alignas(64) scalar_t o[kSpan<scalar_t>];
      for (int64_t k = 0; k < n; ++k) element(from, k, o);
      stream_span(out + i0, o, n);
    } else {
      for (int64_t k = 0; k < n; ++k) element(from, k, out + i0);
    }
  }
}

// One channels-first row: elements [begin, begin + len) of one channel, k its kChannelCoeffs.
// Inlined into the loops over rows, which so set up the conversions' constants once, not per row:
// with a call per row, BatchNorm eval on 64x256x7x7 took 1.12-1.25x as long in float16, 1.04-1.22x
// in bfloat16.
template <typename V, typename scalar_t, typename opmath_t>
__attribute__((always_inline)) inline void affine_row(const AffinePtrs<scalar_t>& in, int64_t begin,
                                                      int64_t len, const opmath_t* k, scalar_t* out,
                                                      bool stream) {
  const opmath_t a = k[kA], b = k[kB], m = k[kM], d = k[kD], gb = k[kGateB], gd = k[kGateD];
  for_spans_overlapping<scalar_t>(begin, begin + len, kSpan<scalar_t>, [&](int64_t i0, auto n) MK_SPAN_BODY {
    affine_span<V>(in, i0, n, out, stream, [=](auto ptrs, int64_t i, auto* o) {
      affine_element<V, scalar_t>(ptrs, i, a, b, m, d, gb, gd, o);
    });
  });
}

// The gate coefficients of channel c in k[kGateB], k[kGateD] (zeros without a recomputed gate).
template <typename scalar_t, typename opmath_t>
void gate_coeffs(const GateOf<scalar_t>& gate, int64_t c, opmath_t* k) {
  k[kGateB] = gate.coeffs ? gate.coeffs[kB * gate.C + c] : opmath_t(0);
  k[kGateD] = gate.coeffs ? gate.coeffs[kD * gate.C + c] : opmath_t(0);
}

// The elementwise pass over rows r0 <= r < r1 of channels-last memory, in the calling thread.
// `in` is taken by value (affine_element). Streamed, the rows go span by span (affine_span).
template <typename V, typename scalar_t>
void affine_last_rows(AffinePtrs<scalar_t> in, const Layout& l,
                      const at::opmath_type<scalar_t>* coeffs, int64_t r0, int64_t r1, scalar_t* out,
                      bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = l.C;
  const opmath_t* A = coeffs + kA * C;
  const opmath_t* B = coeffs + kB * C;
  const opmath_t* M = coeffs + kM * C;
  const opmath_t* D = coeffs + kD * C;
  const auto gate_coeff = [&](int64_t row, int64_t c) {
    return V::kGate == kRecomputedGate ? in.gate.coeffs[row * C + c] : opmath_t(0);
  };
  // With C of 32, 64 or 128 the coefficients are held across rows (with_registered_channels;
  // for float16 and bfloat16 GCC keeps them on the stack, a row's spans unrolled).
  const auto registered = [&](auto kC) {
    constexpr int64_t K = decltype(kC)::value;
    opmath_t a[K], b[K], m[K], d[K], gb[K], gd[K];
    for (int64_t c = 0; c < K; ++c) {
      a[c] = A[c], b[c] = B[c], m[c] = M[c], d[c] = D[c];
      gb[c] = gate_coeff(kB, c), gd[c] = gate_coeff(kD, c);
    }
    for (int64_t r = r0; r < r1; ++r) {
      if (staged_span<scalar_t> || stream) {
        for_spans_overlapping<scalar_t>(0, K, kSpan<scalar_t>, [&](int64_t c0, auto n) MK_SPAN_BODY {
          affine_span<V>(in, r * K + c0, n, out, stream, [&](auto ptrs, int64_t i, auto* o) {
            const int64_t c = c0 + i;
            affine_element<V, scalar_t>(ptrs, i, a[c], b[c], m[c], d[c], gb[c], gd[c], o);
          });
        });
      } else {
        _Pragma("GCC ivdep")  // outputs never alias operands (batch_norm.h)
        for (int64_t c = 0; c < K; ++c) {
          affine_element<V, scalar_t>(in, r * K + c, a[c], b[c], m[c], d[c], gb[c], gd[c], out);
        }
      }
    }
  };
  if (with_registered_channels<!V::kHasP>(C, registered)) return;
  if (staged_span<scalar_t> || stream) {
    // The bodies take copies: with references, the compiler reloads the pointers after each
    // store of a span.
    for (int64_t r = r0; r < r1; ++r) {
      for_spans_overlapping<scalar_t>(0, C, kSpan<scalar_t>, [=](int64_t c0, auto n) MK_SPAN_BODY {
        affine_span<V>(in, r * C + c0, n, out, stream, [=](auto ptrs, int64_t i, auto* o) {
          const int64_t c = c0 + i;
          affine_element<V, scalar_t>(ptrs, i, A[c], B[c], M[c], D[c], gate_coeff(kB, c), gate_coeff(kD, c), o);
        });
      });
    }
  } else {
    // kBatchRows rows per sweep over the channels: each channel's coefficients are loaded
    // once for them (with thousands of channels they come from L2).
    for_row_batches<scalar_t>(l, r0, r1, [&](int64_t r, auto R) {
      _Pragma("GCC ivdep")  // column c of R rows: no dependence between iterations
      for (int64_t c = 0; c < C; ++c) {
        const opmath_t gb = gate_coeff(kB, c), gd = gate_coeff(kD, c);
        unrolled(R, [&](int64_t j) {
          affine_element<V, scalar_t>(in, (r + j) * C + c, A[c], B[c], M[c], D[c], gb, gd, out);
        });
      }
    });
  }
}

template <typename V, typename scalar_t>
void affine_kernel(AffinePtrs<scalar_t> in, const Layout& l,
                   const at::opmath_type<scalar_t>* coeffs, scalar_t* out, bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = l.C;
  if (!l.channels_last) {
    at::parallel_for(0, l.N * C, grain_for(l.S), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % C;
        opmath_t k[kChannelCoeffs] = {coeffs[kA * C + c], coeffs[kB * C + c], coeffs[kM * C + c],
                                      coeffs[kD * C + c]};
        gate_coeffs(in.gate, c, k);
        affine_row<V>(in, r * l.S, l.S, k, out, stream);
      }
      if (stream) stream_fence();
    });
  } else {
    at::parallel_for(0, l.N * l.S, grain_for(C), [&](int64_t r0, int64_t r1) {
      affine_last_rows<V>(in, l, coeffs, r0, r1, out, stream);
      if (stream) stream_fence();
    });
  }
}

void affine_cpu(const Operands& in, const Layout& layout, const at::Tensor& coeffs, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "modekernels_bn_affine", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto ptrs = affine_ptrs<scalar_t>(in);
    const opmath_t* k = coeffs.const_data_ptr<opmath_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const Layout l = walked(layout, kShortAffineRow);
    const int64_t S = l.C / layout.C;  // columns per channel
    const bool stream = streams(out);
    if (S == 1) {
      with_variant(ptrs, [&](auto v) { affine_kernel<decltype(v)>(ptrs, l, k, o, stream); });
      return;
    }
    // Short rows walked as columns: each task repeats the coefficients per column for itself.
    // (Repeated once and shared, they moved from the core that wrote them to the other: BatchNorm
    // eval on 8x256x5x5 took 22 us on two threads, 12 us on one.)
    at::parallel_for(0, l.N, grain_for(l.C), [&](int64_t r0, int64_t r1) {
      const std::vector<opmath_t> column_k = per_column(k, coeffs.size(0), layout.C, S);
      std::vector<opmath_t> column_gate;
      auto task = ptrs;
      task.gate = per_column(ptrs.gate, S, column_gate);
      with_variant(task, [&](auto v) { affine_last_rows<decltype(v)>(task, l, column_k.data(), r0, r1, o, stream); });
      if (stream) stream_fence();
    });
  });
}

// ----------------------------------------------------------------------- cache-resident

// Channels-first memory with at least one channel per thread and small channels: a task takes a
// group of channels, runs the reduction over their rows and then, with their coefficients, the
// elementwise pass over the same rows, which it finds in cache. Memory traffic drops from two
// reads to one (training forward: read x, write y; backward: read dy, x [, gate], write dx
// [, the gated dy]). Both passes walk the group's rows in memory order, G * S elements at a time,
// so that small spatial sizes still read long runs of memory.
// Each channel's sums run in the same order as in the separate passes (whose tasks are single
// channels when there are as many channels as threads), so results are bit-identical.
// A channel's operands that the second pass reads again must stay in cache between the passes:
// 384 KB of them, three quarters of a 512 KB L2 per core (AMD Zen 2 and 3; the development
// machine's Zen 4 has 1 MB, where a budget of 768 KB measured the same within the noise on
// 16x64x56x56 and 8x64x112x112, 2026-12-04). A group of several channels also keeps its writes
// within that budget: the second pass's stores allocate cache lines too, and would otherwise evict
// the group's operands just before they are read.
constexpr int64_t kResidentBytes = 384 << 10;

// The backward's resident pass is for rows of at least kMinResidentRow elements: on 512x32x4x4 it
// took 1.03-2.9x the time of the separate passes (float32 and bfloat16, alternating processes,
// five runs; 2026-12-05). With rows of 64 (256x64x8x8) float32 was 1.8-2.2x faster apart too
// (medians over seven runs) but bfloat16 0.93-1.05x, and with 49 (64x512x7x7) 1.09-1.22x and
// 0.90-0.97x: those keep the resident pass.
constexpr int64_t kMinResidentRow = 32;

// Channels per group of the cache-resident passes, or 0 where the layout does not suit them. The
// second pass reads `reread` and writes `written` bytes per element. At least two groups per
// thread.
int64_t resident_group(const Layout& l, int64_t reread, int64_t written) {
  const int64_t threads = at::get_num_threads();
  const int64_t elems = std::max<int64_t>(1, l.N * l.S);
  if (walked(l).channels_last || l.C < threads || elems * reread > kResidentBytes) return 0;
  return std::clamp<int64_t>(kResidentBytes / (elems * (reread + written)), 1,
                             std::max<int64_t>(1, l.C / (2 * threads)));
}

// fn(c0, c1) for each group of G channels, in parallel.
template <typename Fn>
void for_groups(const Layout& l, int64_t G, const Fn& fn) {
  at::parallel_for(0, (l.C + G - 1) / G, grain_for(G * l.N * l.S), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) fn(g * G, std::min(l.C, (g + 1) * G));
  });
}

// The kChannelCoeffs coefficients of each channel of a group, and the group's elementwise pass
// with them (the second pass of both resident functions), in memory order.
template <typename opmath_t>
using GroupCoeffs = std::vector<std::array<opmath_t, kChannelCoeffs>>;

template <typename V, typename scalar_t, typename opmath_t>
void affine_group(const AffinePtrs<scalar_t>& in, const Layout& l, int64_t c0, int64_t c1,
                  const GroupCoeffs<opmath_t>& k, scalar_t* out) {
  for_rows<1, scalar_t>(l, c0, c1, 0, l.N, [&](int64_t c, int64_t off, int64_t, auto) {
    affine_row<V>(in, off, l.S, k[c - c0].data(), out, false);
  });
}

bool train_resident_cpu(const Operands& in, const Layout& l, const at::Tensor& weight,
                        const at::Tensor& bias, double eps, const at::Tensor& mean_t,
                        const at::Tensor& var_t, const at::Tensor& out) {
  const int64_t G = resident_group(l, out.element_size(), out.element_size());  // x read, out written
  if (G == 0) return false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "modekernels_bn_train_resident", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    dispatch_param(weight.defined() ? weight : bias, mean_t.scalar_type(), [&](auto tag) {
      using P = std::remove_pointer_t<decltype(tag)>;
      const auto ptrs = affine_ptrs<scalar_t>(in);
      const P* w = ptr_or_null<P>(weight);
      const P* b = ptr_or_null<P>(bias);
      opmath_t* mean = mean_t.data_ptr<opmath_t>();
      opmath_t* var = var_t.data_ptr<opmath_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      with_variant(ptrs, [&](auto v) {
        for_groups(l, G, [&](int64_t c0, int64_t c1) {
          std::vector<Moments<double>> m(c1 - c0);
          GroupCoeffs<opmath_t> k(c1 - c0);
          channel_moments<scalar_t, opmath_t>(ptrs.q, l, c0, c1, 0, l.N, m.data());
          for (int64_t c = c0; c < c1; ++c) {
            mean[c] = static_cast<opmath_t>(m[c - c0].mean);
            var[c] = static_cast<opmath_t>(m[c - c0].m2 / m[c - c0].n);
            forward_coeffs<opmath_t, P>(0, 1, mean + c, var + c, w ? w + c : nullptr,
                                        b ? b + c : nullptr, eps, k[c - c0].data());
          }
          affine_group<decltype(v)>(ptrs, l, c0, c1, k, o);
        });
      });
    });
  });
  return true;
}

bool backward_resident_cpu(const Operands& in, const Layout& l, const at::Tensor& mean_t,
                           const at::Tensor& var_t, const at::Tensor& weight, double eps,
                           const at::Tensor& gated_out, const at::Tensor& grad_input,
                           const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  // The second pass reads dy (or the gated dy) and x again and writes dx; with a saved gate the
  // first also reads the gate and writes the gated dy.
  const bool saved_gate = gated_out.defined();
  TORCH_INTERNAL_ASSERT(saved_gate == (in.gate.tensor.defined() && !in.gate.coeffs.defined()),
                        "a saved gate's backward writes the gated dy");
  const int64_t es = grad_input.element_size();
  const int64_t G = resident_group(l, 2 * es, (saved_gate ? 3 : 1) * es);
  if (G == 0 || l.S < kMinResidentRow) return false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_input.scalar_type(), "modekernels_bn_backward_resident", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    dispatch_param(weight.defined() ? weight : grad_bias, mean_t.scalar_type(), [&](auto tag) {
      using P = std::remove_pointer_t<decltype(tag)>;
      const auto ptrs = affine_ptrs<scalar_t>(in);
      scalar_t* gated = saved_gate ? gated_out.data_ptr<scalar_t>() : nullptr;
      // The elementwise pass's operands: the gated dy for a saved gate's dy, with no gate.
      const auto second =
          saved_gate ? AffinePtrs<scalar_t>{gated, ptrs.q, {}, nullptr, false, nullptr} : ptrs;
      const P* w = ptr_or_null<P>(weight);
      P* gw = ptr_or_null<P>(grad_weight);
      P* gb = ptr_or_null<P>(grad_bias);
      const opmath_t* mean = mean_t.const_data_ptr<opmath_t>();
      const opmath_t* var = var_t.const_data_ptr<opmath_t>();
      const auto count = static_cast<opmath_t>(l.N * l.S);
      scalar_t* o = grad_input.data_ptr<scalar_t>();
      with_variant(second, [&](auto v) {
        for_groups(l, G, [&](int64_t c0, int64_t c1) {
          std::vector<double> sdy(c1 - c0), sdx(c1 - c0);
          GroupCoeffs<opmath_t> k(c1 - c0);
          channel_grad_sums<scalar_t, opmath_t>(ptrs.p, ptrs.gate, ptrs.q, gated, l, c0, c1, 0, l.N,
                                                mean, sdy.data(), sdx.data());
          for (int64_t c = c0; c < c1; ++c) {
            const auto dy_sum = static_cast<opmath_t>(sdy[c - c0]);
            const auto dxmu_sum = static_cast<opmath_t>(sdx[c - c0]);
            opmath_t* kc = k[c - c0].data();
            backward_coeffs<opmath_t, P>(0, 1, true, mean + c, var + c, w ? w + c : nullptr, eps,
                                         &dy_sum, &dxmu_sum, count, kc, gw ? gw + c : nullptr,
                                         gb ? gb + c : nullptr);
            gate_coeffs(second.gate, c, kc);
          }
          affine_group<decltype(v)>(second, l, c0, c1, k, o);
        });
      });
    });
  });
  return true;
}

// -------------------------------------------------------------------------- per channel

void forward_coeffs_cpu(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                        const at::Tensor& bias, double eps, const at::Tensor& coeffs) {
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "modekernels_bn_forward_coeffs", [&] {
    using T = scalar_t;
    dispatch_param(weight.defined() ? weight : bias, mean.scalar_type(), [&](auto tag) {
      using P = std::remove_pointer_t<decltype(tag)>;
      const int64_t C = mean.numel();
      const T* m = mean.const_data_ptr<T>();
      const T* v = var.const_data_ptr<T>();
      const P* w = ptr_or_null<P>(weight);
      const P* b = ptr_or_null<P>(bias);
      T* k = coeffs.data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) forward_coeffs<T, P>(c, C, m, v, w, b, eps, k);
    });
  });
}

void backward_coeffs_cpu(bool train, const at::Tensor& mean, const at::Tensor& var,
                         const at::Tensor& weight, double eps, const at::Tensor& sum_dy,
                         const at::Tensor& sum_dy_xmu, int64_t count, const at::Tensor& coeffs,
                         const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "modekernels_bn_backward_coeffs", [&] {
    using T = scalar_t;
    const at::Tensor& typed = weight.defined() ? weight : grad_bias;
    dispatch_param(typed, mean.scalar_type(), [&](auto tag) {
      using P = std::remove_pointer_t<decltype(tag)>;
      const int64_t C = mean.numel();
      const T* m = mean.const_data_ptr<T>();
      const T* v = var.const_data_ptr<T>();
      const P* w = ptr_or_null<P>(weight);
      const T* sdy = sum_dy.const_data_ptr<T>();
      const T* sdx = sum_dy_xmu.const_data_ptr<T>();
      T* k = coeffs.data_ptr<T>();
      P* gw = ptr_or_null<P>(grad_weight);
      P* gb = ptr_or_null<P>(grad_bias);
      for (int64_t c = 0; c < C; ++c) {
        backward_coeffs<T, P>(c, C, train, m, v, w, eps, sdy, sdx, static_cast<T>(count), k, gw, gb);
      }
    });
  });
}

void update_running_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                        const at::Tensor& mean, const at::Tensor& var, int64_t count, double factor,
                        const at::Tensor& num_batches_tracked) {
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "modekernels_bn_update", [&] {
    using T = scalar_t;
    dispatch_param(running_mean, mean.scalar_type(), [&](auto tag) {
      using P = std::remove_pointer_t<decltype(tag)>;
      const double f = num_batches_tracked.defined()
                           ? 1.0 / static_cast<double>(num_batches_tracked.item<int64_t>())
                           : factor;
      const T* m = mean.const_data_ptr<T>();
      const T* v = var.const_data_ptr<T>();
      P* rm = running_mean.data_ptr<P>();
      P* rv = running_var.data_ptr<P>();
      for (int64_t c = 0; c < mean.numel(); ++c) {
        update_running<double, T, P>(c, m, v, static_cast<double>(count), f, rm, rv);
      }
    });
  });
}

}  // namespace

extern const Backend kCpu;
const Backend kCpu = {moments_cpu,        grad_sums_cpu,      forward_coeffs_cpu,
                      backward_coeffs_cpu, affine_cpu,         update_running_cpu,
                      train_resident_cpu,  backward_resident_cpu};

}  // namespace MK_CPU_ISA

#ifdef MK_CPU_BASELINE_BUILD
#ifdef MK_CPU_AVX2
namespace avx2 {
extern const Backend kCpu;
}
namespace avx512 {
extern const Backend kCpu;
}
#endif

namespace {
const Backend& cpu_backend() {
#ifdef MK_CPU_AVX2
  if (cpu_avx512()) return avx512::kCpu;
  if (cpu_avx2()) return avx2::kCpu;
#endif
  return baseline::kCpu;
}
// Chosen once, when the library loads.
const Backend kCpu = cpu_backend();
}  // namespace

TORCH_LIBRARY_IMPL(modekernels, CPU, m) {
  Ops<kCpu>::register_all(m);
}
#endif

}  // namespace modekernels::batch_norm
