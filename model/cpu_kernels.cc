// CPU kernels that XLA calls through its typed FFI (built and registered by
// model/cpu_kernels.py). XLA's CPU backend converts an int8 weight to fp32 in memory
// before its dot (docs/benchmarks.md), so a decode step that should stream a quarter of
// the fp32 bytes streams 1.25x them instead; this kernel reads the int8 bytes once.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;  // one AVX register of floats; gcc vectorizes the lane loops
constexpr int64_t kColumns = 64;  // outputs per chunk of the input-major kernel

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
      float acc[kLanes] = {0};
      float shift = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float part[kLanes] = {0};
        const uint8_t* qg = q + o * s.in + g * s.group;
        const float* xg = x_row + g * s.group;
        for (int64_t i = 0; i < s.group; i += kLanes) {
          for (int j = 0; j < kLanes; ++j) part[j] += static_cast<float>(qg[i + j]) * xg[i + j];
        }
        for (int j = 0; j < kLanes; ++j) acc[j] += scale[o * groups + g] * part[j];
        shift += low[o * groups + g] * sums[r * groups + g];
      }
      float total = shift;
      for (int j = 0; j < kLanes; ++j) total += acc[j];
      y[r * s.out + o] = total;
    }
  }
}

// Input-major codes q [in, out], scale and low [groups, out] (every other kernel, stored
// in the layout of the fp32 weight it replaces): outputs [first, last) of every row.
void InOutRange(const float* x, const uint8_t* q, const float* scale, const float* low,
                const float* sums, float* y, const Shape& s, int64_t first, int64_t last) {
  const int64_t width = last - first;
  float acc[kColumns], part[kColumns];
  for (int64_t r = 0; r < s.rows; ++r) {
    std::fill(acc, acc + width, 0.0f);
    for (int64_t g = 0; g < s.groups(); ++g) {
      std::fill(part, part + width, 0.0f);
      for (int64_t i = g * s.group; i < (g + 1) * s.group; ++i) {
        const float xi = x[r * s.in + i];
        const uint8_t* q_row = q + i * s.out + first;
        for (int64_t c = 0; c < width; ++c) part[c] += xi * static_cast<float>(q_row[c]);
      }
      const float* s_row = scale + g * s.out + first;
      const float* l_row = low + g * s.out + first;
      const float sum = sums[r * s.groups() + g];
      for (int64_t c = 0; c < width; ++c) acc[c] += s_row[c] * part[c] + l_row[c] * sum;
    }
    std::copy(acc, acc + width, y + r * s.out + first);
  }
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
