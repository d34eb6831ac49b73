// CPU kernels that XLA calls through its typed FFI (built and registered by
// model/cpu_kernels.py). XLA's CPU backend converts an int8 weight to fp32 in memory
// before its dot (docs/benchmarks.md), so a decode step that should stream a quarter of
// the fp32 bytes streams 1.25x them instead; this kernel reads the int8 bytes once.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;         // floats per vector (one AVX register)
constexpr int64_t kColumns = 64;  // outputs per chunk of the input-major kernel (a cache line)
constexpr int64_t kPrefetch = 16;  // inputs ahead

// GCC/Clang vector extensions: the compiler picks the instructions -march=native allows.
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef uint8_t Codes __attribute__((vector_size(kLanes)));

inline Floats LoadCodes(const uint8_t* p) {
#ifdef __AVX2__  // GCC 12 scalarizes the generic conversion below, one byte at a time
  const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(p))));
  Floats out;
  std::memcpy(&out, &f, sizeof(out));
  return out;
#else
  Codes c;
  std::memcpy(&c, p, sizeof(c));
  return __builtin_convertvector(c, Floats);
#endif
}

inline Floats LoadFloats(const float* p) {
  Floats f;
  std::memcpy(&f, p, sizeof(f));
  return f;
}

inline Floats Splat(float v) { return Floats{} + v; }

inline float Sum(Floats f) {
  float total = 0.0f;
  for (int j = 0; j < kLanes; ++j) total += f[j];
  return total;
}

// Sizes of one call: x [rows, in], W [in, out] in groups of `group` inputs.
struct Shape {
  int64_t rows, in, out, group;
  int64_t groups() const { return in / group; }
};

// Per row and group, the sum of the row's inputs in the group (the minimum's share).
std::vector<float> GroupSums(const float* x, const Shape& s) {
  std::vector<float> sums(s.rows * s.groups());
  for (int64_t r = 0; r < s.rows; ++r) {
    for (int64_t g = 0; g < s.groups(); ++g) {
      float total = 0.0f;
      for (int64_t i = 0; i < s.group; ++i) total += x[r * s.in + g * s.group + i];
      sums[r * s.groups() + g] = total;
    }
  }
  return sums;
}

// Output-major codes q [out, in], scale and low [out, groups] (an embedding read as the
// tied head): outputs [first, last) of every row.
void OutInRange(const float* x, const uint8_t* q, const float* scale, const float* low,
                const float* sums, float* y, const Shape& s, int64_t first, int64_t last) {
  const int64_t groups = s.groups();
  for (int64_t o = first; o < last; ++o) {
    for (int64_t r = 0; r < s.rows; ++r) {
      const float* x_row = x + r * s.in;
      Floats acc{};
      float shift = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        Floats part{};
        const int64_t start = g * s.group;
        for (int64_t i = start; i < start + s.group; i += kLanes) {
          part += LoadCodes(q + o * s.in + i) * LoadFloats(x_row + i);
        }
        acc += scale[o * groups + g] * part;
        shift += low[o * groups + g] * sums[r * groups + g];
      }
      y[r * s.out + o] = Sum(acc) + shift;
    }
  }
}

// Input-major codes q [in, out], scale and low [groups, out]: kRows rows of x times
// kVectors * kLanes columns from `first`, each code converted once for all the rows.
template <int kRows, int kVectors>
void InOutBlock(const float* x, const uint8_t* q, const float* scale, const float* low,
                const float* sums, float* y, const Shape& s, int64_t row, int64_t first) {
  Floats acc[kRows][kVectors] = {};
  for (int64_t g = 0; g < s.groups(); ++g) {
    Floats part[kRows][kVectors] = {};
    for (int64_t i = g * s.group; i < (g + 1) * s.group; ++i) {
      // The codes of one chunk are a column strip, one cache line per input: fetch ahead.
      __builtin_prefetch(q + (i + kPrefetch) * s.out + first);
      Floats w[kVectors];
      for (int v = 0; v < kVectors; ++v) w[v] = LoadCodes(q + i * s.out + first + v * kLanes);
      for (int r = 0; r < kRows; ++r) {
        const Floats xi = Splat(x[(row + r) * s.in + i]);
        for (int v = 0; v < kVectors; ++v) part[r][v] += xi * w[v];
      }
    }
    for (int v = 0; v < kVectors; ++v) {
      const Floats sc = LoadFloats(scale + g * s.out + first + v * kLanes);
      const Floats lo = LoadFloats(low + g * s.out + first + v * kLanes);
      for (int r = 0; r < kRows; ++r) {
        acc[r][v] += sc * part[r][v] + lo * sums[(row + r) * s.groups() + g];
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVectors; ++v) {
      std::memcpy(y + (row + r) * s.out + first + v * kLanes, &acc[r][v], sizeof(Floats));
    }
  }
}

// The columns past the last whole vector, one at a time.
void InOutTail(const float* x, const uint8_t* q, const float* scale, const float* low,
               const float* sums, float* y, const Shape& s, int64_t first, int64_t last) {
  for (int64_t r = 0; r < s.rows; ++r) {
    for (int64_t c = first; c < last; ++c) {
      float total = 0.0f;
      for (int64_t g = 0; g < s.groups(); ++g) {
        float part = 0.0f;
        for (int64_t i = g * s.group; i < (g + 1) * s.group; ++i) {
          part += x[r * s.in + i] * static_cast<float>(q[i * s.out + c]);
        }
        total += scale[g * s.out + c] * part + low[g * s.out + c] * sums[r * s.groups() + g];
      }
      y[r * s.out + c] = total;
    }
  }
}

// Outputs [first, last) of every row: 8 vectors of columns for one row at a time, 4 for
// two, 2 for four (at most 16 accumulators, the AVX register count), then the tail.
void InOutRange(const float* x, const uint8_t* q, const float* scale, const float* low,
                const float* sums, float* y, const Shape& s, int64_t first, int64_t last) {
  int64_t row = 0;
  for (; row + 4 <= s.rows; row += 4) {
    int64_t c = first;
    for (; c + 2 * kLanes <= last; c += 2 * kLanes) {
      InOutBlock<4, 2>(x, q, scale, low, sums, y, s, row, c);
    }
    for (; c + kLanes <= last; c += kLanes) InOutBlock<4, 1>(x, q, scale, low, sums, y, s, row, c);
  }
  for (; row + 2 <= s.rows; row += 2) {
    int64_t c = first;
    for (; c + 4 * kLanes <= last; c += 4 * kLanes) {
      InOutBlock<2, 4>(x, q, scale, low, sums, y, s, row, c);
    }
    for (; c + kLanes <= last; c += kLanes) InOutBlock<2, 1>(x, q, scale, low, sums, y, s, row, c);
  }
  for (; row < s.rows; ++row) {
    int64_t c = first;
    for (; c + 8 * kLanes <= last; c += 8 * kLanes) {
      InOutBlock<1, 8>(x, q, scale, low, sums, y, s, row, c);
    }
    for (; c + kLanes <= last; c += kLanes) InOutBlock<1, 1>(x, q, scale, low, sums, y, s, row, c);
  }
  const int64_t whole = first + (last - first) / kLanes * kLanes;
  if (whole < last) InOutTail(x, q, scale, low, sums, y, s, whole, last);
}

// Work split into chunks of outputs that the calling thread and the pool's threads take
// in turn; the caller never waits on a chunk nobody has started, so a pool that is busy
// elsewhere only means the caller does more of the work itself.
struct SharedWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename Range>
void RunChunks(ffi::ThreadPool& pool, int64_t out, int64_t chunk, Range range) {
  const int64_t chunks = (out + chunk - 1) / chunk;
  auto work = std::make_shared<SharedWork>();
  auto run = [=](SharedWork& w) {
    for (int64_t c; (c = w.next.fetch_add(1)) < chunks;) {
      range(c * chunk, std::min(out, (c + 1) * chunk));
      w.done.fetch_add(1);
    }
  };
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), chunks);
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work, run] { run(*work); });
  run(*work);
  while (work->done.load() < chunks) {
  }
}

// Checks the operands and fills `s`; `out_in` says which layout q has.
ffi::Error ReadShape(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::U8>& q,
                     const ffi::Buffer<ffi::F32>& scale, bool out_in, Shape& s) {
  auto q_dims = q.dimensions();
  auto s_dims = scale.dimensions();
  if (q_dims.size() != 2 || s_dims.size() != 2) {
    return ffi::Error::InvalidArgument("int8_matmul: q and scale must be matrices");
  }
  s.in = out_in ? q_dims[1] : q_dims[0];
  s.out = out_in ? q_dims[0] : q_dims[1];
  const int64_t groups = out_in ? s_dims[1] : s_dims[0];
  if ((out_in ? s_dims[0] : s_dims[1]) != s.out || groups == 0 || s.in % groups != 0) {
    return ffi::Error::InvalidArgument("int8_matmul: scale's shape does not match q's");
  }
  s.group = s.in / groups;
  if (out_in && s.group % kLanes != 0) {
    return ffi::Error::InvalidArgument("int8_matmul: group size must be a multiple of 8");
  }
  auto x_dims = x.dimensions();
  if (x_dims.size() == 0 || x_dims[x_dims.size() - 1] != s.in) {
    return ffi::Error::InvalidArgument("int8_matmul: x's last axis must match q's inputs");
  }
  s.rows = static_cast<int64_t>(x.element_count()) / s.in;
  return ffi::Error::Success();
}

template <bool kOutIn>
ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> low,
                          ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  if (ffi::Error error = ReadShape(x, q, scale, kOutIn, s); error.failure()) return error;
  const float* xd = x.typed_data();
  std::vector<float> sums = GroupSums(xd, s);
  const uint8_t* qd = q.typed_data();
  const float *sd = scale.typed_data(), *ld = low.typed_data(), *gs = sums.data();
  float* yd = y->typed_data();
  if (kOutIn) {
    RunChunks(pool, s.out, 256, [&](int64_t first, int64_t last) {
      OutInRange(xd, qd, sd, ld, gs, yd, s, first, last);
    });
  } else {
    RunChunks(pool, s.out, kColumns, [&](int64_t first, int64_t last) {
      InOutRange(xd, qd, sd, ld, gs, yd, s, first, last);
    });
  }
  return ffi::Error::Success();
}

}  // namespace

#define FLAXLM_INT8_MATMUL(symbol, out_in)                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, Int8MatmulImpl<out_in>,        \
                                ffi::Ffi::Bind()                       \
                                    .Ctx<ffi::ThreadPool>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Arg<ffi::Buffer<ffi::U8>>()       \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Ret<ffi::Buffer<ffi::F32>>());

FLAXLM_INT8_MATMUL(FlaxlmInt8MatmulInOut, false)
FLAXLM_INT8_MATMUL(FlaxlmInt8MatmulOutIn, true)
