// CPU kernels that XLA calls through its typed FFI (built and registered by
// model/cpu_kernels.py). XLA's CPU backend converts an int8 weight to fp32 in memory
// before its dot (docs/benchmarks.md), so a decode step that should stream a quarter of
// the fp32 bytes streams 1.25x them instead; this kernel reads the int8 bytes once.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <thread>
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
#ifdef __AVX2__  // a few shuffles instead of eight dependent adds
  __m256 v;
  std::memcpy(&v, &f, sizeof(v));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  float total = 0.0f;
  for (int j = 0; j < kLanes; ++j) total += f[j];
  return total;
#endif
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

// ---------------------------------------------------------------------------------------
// One fp32 decode step through every layer of a plain Llama block stack (RMSNorm, RoPE,
// grouped-query attention over the KV cache, SwiGLU), as one call. XLA runs such a step
// as dozens of small ops per layer and copies each layer's weights and cache out of the
// stacked arrays first (docs/benchmarks.md, "What a batch-1 step can cost here"); here
// each weight is read in place, once per block of rows.

namespace {

// kRows rows of x [rows, in] times kVectors * kLanes columns of W [in, out] from `first`.
template <int kRows, int kVectors>
void F32Block(const float* x, const float* w, float* y, int64_t in, int64_t out, int64_t row,
              int64_t first) {
  Floats acc[kRows][kVectors] = {};
  for (int64_t i = 0; i < in; ++i) {
    __builtin_prefetch(w + (i + kPrefetch) * out + first);
    Floats wi[kVectors];
    for (int v = 0; v < kVectors; ++v) wi[v] = LoadFloats(w + i * out + first + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const Floats xi = Splat(x[(row + r) * in + i]);
      for (int v = 0; v < kVectors; ++v) acc[r][v] += xi * wi[v];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVectors; ++v) {
      std::memcpy(y + (row + r) * out + first + v * kLanes, &acc[r][v], sizeof(Floats));
    }
  }
}

// Columns [first, last) of y = x W for every row, in register blocks as InOutRange.
void F32Range(const float* x, const float* w, float* y, int64_t rows, int64_t in, int64_t out,
              int64_t first, int64_t last) {
  int64_t row = 0;
  for (; row + 6 <= rows; row += 6) {
    int64_t c = first;
    for (; c + 2 * kLanes <= last; c += 2 * kLanes) F32Block<6, 2>(x, w, y, in, out, row, c);
    for (; c + kLanes <= last; c += kLanes) F32Block<6, 1>(x, w, y, in, out, row, c);
  }
  for (; row + 4 <= rows; row += 4) {
    int64_t c = first;
    for (; c + 2 * kLanes <= last; c += 2 * kLanes) F32Block<4, 2>(x, w, y, in, out, row, c);
    for (; c + kLanes <= last; c += kLanes) F32Block<4, 1>(x, w, y, in, out, row, c);
  }
  for (; row + 2 <= rows; row += 2) {
    int64_t c = first;
    for (; c + 4 * kLanes <= last; c += 4 * kLanes) F32Block<2, 4>(x, w, y, in, out, row, c);
    for (; c + kLanes <= last; c += kLanes) F32Block<2, 1>(x, w, y, in, out, row, c);
  }
  for (; row < rows; ++row) {
    int64_t c = first;
    for (; c + 8 * kLanes <= last; c += 8 * kLanes) F32Block<1, 8>(x, w, y, in, out, row, c);
    for (; c + kLanes <= last; c += kLanes) F32Block<1, 1>(x, w, y, in, out, row, c);
  }
  for (int64_t c = first + (last - first) / kLanes * kLanes; c < last; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      float total = 0.0f;
      for (int64_t i = 0; i < in; ++i) total += x[r * in + i] * w[i * out + c];
      y[r * out + c] = total;
    }
  }
}

// One call's parallel phases. A decode step has ~8 per layer, each a few microseconds of
// work, so scheduling pool tasks per phase (RunChunks) would cost about as much as the
// work: instead one helper per other pool thread joins for the whole call and takes
// chunks of whichever phase the calling thread has published last. The caller takes
// chunks too and waits only for chunks already taken, so a helper that starts late or
// never (a busy pool) just leaves it more of the work.
class Crew {
 public:
  Crew(ffi::ThreadPool& pool, int64_t max_phases) : state_(std::make_shared<State>(max_phases)) {
    const int64_t helpers = std::max<int64_t>(0, pool.num_threads() - 1);
    for (int64_t t = 0; t < helpers; ++t) {
      pool.Schedule([state = state_] { Help(*state); });
    }
  }
  ~Crew() { state_->stop.store(true, std::memory_order_release); }

  // range(first, last) over [0, total) in chunks of `chunk`, with whoever is helping.
  template <typename Range>
  void Run(int64_t total, int64_t chunk, Range range) {
    State& s = *state_;
    if (s.published.load(std::memory_order_relaxed) >= static_cast<int64_t>(s.phases.size())) {
      range(0, total);  // more phases than planned for: run this one alone
      return;
    }
    Phase& p = s.phases[s.published.load(std::memory_order_relaxed)];
    p.range = [&range, total, chunk](int64_t c) {
      range(c * chunk, std::min(total, (c + 1) * chunk));
    };
    p.chunks = (total + chunk - 1) / chunk;
    s.published.fetch_add(1, std::memory_order_release);
    Work(p);
    while (p.done.load(std::memory_order_acquire) < p.chunks) Pause();
  }

 private:
  struct Phase {
    std::function<void(int64_t)> range;
    int64_t chunks = 0;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  struct State {
    explicit State(int64_t max_phases) : phases(max_phases) {}
    std::vector<Phase> phases;  // never resized: helpers hold references into it
    std::atomic<int64_t> published{0};
    std::atomic<bool> stop{false};
  };

  static void Pause() {
#ifdef __AVX2__
    _mm_pause();
#endif
  }

  static void Work(Phase& p) {
    for (int64_t c; (c = p.next.fetch_add(1, std::memory_order_relaxed)) < p.chunks;) {
      p.range(c);
      p.done.fetch_add(1, std::memory_order_release);
    }
  }

  // A helper: the latest published phase, until the call ends. It spins between phases
  // (they come microseconds apart), yielding its core after a while without work.
  static void Help(State& s) {
    int64_t seen = 0;
    for (int64_t idle = 0; !s.stop.load(std::memory_order_acquire); ++idle) {
      const int64_t published = s.published.load(std::memory_order_acquire);
      if (published > seen) {
        seen = published;
        Work(s.phases[published - 1]);
        idle = 0;
      } else if (idle < 4096) {
        Pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

  std::shared_ptr<State> state_;
};

// One weight's product y = x W: W [in, out], y [rows, out].
struct Product {
  const float* w;
  float* y;
  int64_t out;
};

// Products of the same x [rows, in] as one phase, in chunks of kColumns columns.
void F32Matmuls(Crew& crew, const float* x, int64_t rows, int64_t in,
                std::initializer_list<Product> products) {
  std::vector<std::pair<const Product*, int64_t>> chunks;  // (product, first column)
  for (const Product& p : products) {
    for (int64_t c = 0; c < p.out; c += kColumns) chunks.emplace_back(&p, c);
  }
  crew.Run(static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const auto [p, column] = chunks[c];
      F32Range(x, p->w, p->y, rows, in, p->out, column, std::min(p->out, column + kColumns));
    }
  });
}

// Sum of a[j] * b[j], eight lanes at a time (a plain loop would add one product at a time:
// the compiler may not reorder a float sum).
// Four accumulators, so consecutive multiply-adds do not wait on each other.
inline float Dot(const float* a, const float* b, int64_t n) {
  Floats acc[4] = {};
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    for (int k = 0; k < 4; ++k) {
      acc[k] += LoadFloats(a + j + k * kLanes) * LoadFloats(b + j + k * kLanes);
    }
  }
  for (; j + kLanes <= n; j += kLanes) acc[0] += LoadFloats(a + j) * LoadFloats(b + j);
  float total = Sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

// y[r] = x[r] / rms(x[r]) * scale, rows of width d.
void RmsNorm(const float* x, const float* scale, float* y, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float squares = Dot(x + r * d, x + r * d, d);
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) y[r * d + i] = x[r * d + i] * inv * scale[i];
  }
}

// Rotary embedding of one head vector (the 'rotate half' layout of layers.apply_rope).
void Rope(float* v, int64_t h, const float* cos, const float* sin) {
  const int64_t half = h / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float a = v[j], b = v[j + half];
    v[j] = a * cos[j] - b * sin[j];
    v[j + half] = b * cos[j] + a * sin[j];
  }
}

// The sizes of one decode call, read from the operands' shapes.
struct DecodeShape {
  int64_t layers, batch, d, heads, kv_heads, head_dim, mlp, slots;
};

ffi::Error ReadDecodeShape(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& wq,
                           const ffi::Buffer<ffi::F32>& wgate, const ffi::Buffer<ffi::F32>& k,
                           DecodeShape& s) {
  auto xd = x.dimensions(), qd = wq.dimensions(), gd = wgate.dimensions(),
       kd = k.dimensions();
  if (xd.size() != 2 || qd.size() != 4 || gd.size() != 3 || kd.size() != 5) {
    return ffi::Error::InvalidArgument(
        "llama_decode: want x [B, D], q [L, D, N, H], gate [L, D, F], cache [L, B, K, S, H]");
  }
  s = {qd[0], xd[0], xd[1], qd[2], kd[2], qd[3], gd[2], kd[3]};
  if (qd[1] != s.d || kd[0] != s.layers || kd[1] != s.batch || kd[4] != s.head_dim ||
      s.heads % s.kv_heads != 0 || s.head_dim % 2 != 0) {
    return ffi::Error::InvalidArgument("llama_decode: the operands' shapes disagree");
  }
  return ffi::Error::Success();
}

// The lane sums of eight vectors, as one vector (lane i: the sum of v[i]).
inline Floats Sum8(const Floats v[8]) {
#ifdef __AVX2__
  __m256 w[8];
  std::memcpy(w, v, sizeof(w));
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(w[0], w[1]), _mm256_hadd_ps(w[2], w[3]));
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(w[4], w[5]), _mm256_hadd_ps(w[6], w[7]));
  const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20),
                                    _mm256_permute2f128_ps(ab, cd, 0x31));
  Floats out;
  std::memcpy(&out, &sums, sizeof(out));
  return out;
#else
  Floats out;
  for (int i = 0; i < kLanes; ++i) out[i] = Sum(v[i]);
  return out;
#endif
}

// exp(x) for x <= 0 (scores minus their maximum), eight at a time: 2^n * e^f with
// f = x - n ln 2 in [-ln2/2, ln2/2] and e^f by its Taylor series to f^7/7! (relative
// error ~1e-7, fp32's rounding); x below -87 gives 0.
inline Floats ExpNonPositive(Floats x) {
  Floats n;  // x clamped first: converting -inf to an integer below is undefined
  for (int i = 0; i < kLanes; ++i) {
    n[i] = __builtin_nearbyintf(std::max(x[i], -88.0f) * 1.44269504f);
  }
  const Floats f = (x - n * 0.693145752f) - n * 1.42860677e-06f;  // ln 2 in two parts
  Floats p = Splat(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
    p = p * f + c;
  }
  Floats out;
  for (int i = 0; i < kLanes; ++i) {
    const int32_t e = static_cast<int32_t>(n[i]);
    const int32_t bits = (e + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    out[i] = x[i] < -87.0f ? 0.0f : p[i] * scale;
  }
  return out;
}

// Attention of the `group` query heads q [group, h] that share one kv head, for one row,
// over that head's cache: a decode query is segment 1 at `slot`, so its keys are the
// segment-1 slots up to and including `slot`. Each block of 8 keys (then each value) is
// read from memory once for the whole group and stays in L1 for the other heads; scores
// eight slots at a time (eight dot products summed as one vector), exp eight at a time.
// scores: room for group * (slot + 8); out [group, h].
void AttendGroup(const float* q, const float* keys, const float* values, const int32_t* seg,
                 int64_t slot, int64_t h, int64_t group, float* out, float* scores) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));
  const int64_t live = slot + 1, stride = live + kLanes, whole = h / kLanes * kLanes;
  for (int64_t s0 = 0; s0 < live; s0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, live - s0);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * h;
      Floats parts[kLanes] = {};
      for (int64_t i = 0; i < n; ++i) {
        const float* key = keys + (s0 + i) * h;
        for (int64_t j = 0; j < whole; j += kLanes) {
          parts[i] += LoadFloats(qg + j) * LoadFloats(key + j);
        }
        for (int64_t j = whole; j < h; ++j) parts[i][0] += qg[j] * key[j];
      }
      const Floats sums = Sum8(parts) * scale;
      std::memcpy(scores + g * stride + s0, &sums, sizeof(sums));
    }
  }
  std::vector<float> inv_total(group);
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * stride;
    float top = -INFINITY;
    for (int64_t s = 0; s < live; ++s) {
      if (seg[s] != 1) sg[s] = -INFINITY;
      top = std::max(top, sg[s]);
    }
    Floats totals = {};
    for (int64_t s0 = 0; s0 < live; s0 += kLanes) {
      Floats e = ExpNonPositive(LoadFloats(sg + s0) - top);
      for (int64_t i = live - s0; i < kLanes; ++i) e[i] = 0.0f;  // past the live slots
      totals += e;
      std::memcpy(sg + s0, &e, sizeof(e));
    }
    inv_total[g] = 1.0f / Sum(totals);
  }
  std::fill(out, out + group * h, 0.0f);
  for (int64_t s = 0; s < live; ++s) {
    if (seg[s] != 1) continue;
    const float* value = values + s * h;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * stride + s] * inv_total[g];
      float* og = out + g * h;
      for (int64_t j = 0; j < h; ++j) og[j] += p * value[j];
    }
  }
}

ffi::Error LlamaDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_in,
                           ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> slot_in,
                           ffi::Buffer<ffi::S32> segments, ffi::Buffer<ffi::F32> attn_norm,
                           ffi::Buffer<ffi::F32> wq, ffi::Buffer<ffi::F32> wk,
                           ffi::Buffer<ffi::F32> wv, ffi::Buffer<ffi::F32> wo,
                           ffi::Buffer<ffi::F32> mlp_norm, ffi::Buffer<ffi::F32> wgate,
                           ffi::Buffer<ffi::F32> wup, ffi::Buffer<ffi::F32> wdown,
                           ffi::Buffer<ffi::F32> k_in, ffi::Buffer<ffi::F32> v_in,
                           ffi::Buffer<ffi::F32> final_norm, ffi::Buffer<ffi::F32> head,
                           float eps, float theta, int32_t tied_head,
                           ffi::ResultBuffer<ffi::F32> logits_out,
                           ffi::ResultBuffer<ffi::F32> k_cache,
                           ffi::ResultBuffer<ffi::F32> v_cache) {
  DecodeShape s;
  if (ffi::Error e = ReadDecodeShape(x_in, wq, wgate, k_in, s); e.failure()) return e;
  const int64_t B = s.batch, D = s.d, N = s.heads, K = s.kv_heads, H = s.head_dim, F = s.mlp,
                S = s.slots, group = N / K;
  const int64_t slot = slot_in.typed_data()[0];
  if (slot < 0 || slot >= S) return ffi::Error::InvalidArgument("llama_decode: slot out of range");
  // k_cache/v_cache alias k_in/v_in (input_output_aliases): read and write them in place.
  float *kc = k_cache->typed_data(), *vc = v_cache->typed_data();
  const int64_t V = static_cast<int64_t>(head.element_count()) / D;
  std::vector<float> x(x_in.typed_data(), x_in.typed_data() + B * D);
  const int32_t* seg = segments.typed_data();

  // cos/sin of every row's position, [B, H/2], the same for every layer.
  std::vector<float> cos(B * H / 2), sin(B * H / 2);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < H / 2; ++j) {
      const float inv_freq = std::pow(theta, -static_cast<float>(j) / static_cast<float>(H / 2));
      const float angle = static_cast<float>(positions.typed_data()[b]) * inv_freq;
      cos[b * H / 2 + j] = std::cos(angle);
      sin[b * H / 2 + j] = std::sin(angle);
    }
  }
  std::vector<float> h(B * D), q(B * N * H), k(B * K * H), v(B * K * H), att(B * N * H),
      gate(B * F), up(B * F), delta(B * D), scores(B * N * (S + kLanes));
  Crew crew(pool, 5 * s.layers + 1);  // 5 parallel phases per layer, then the head

  for (int64_t l = 0; l < s.layers; ++l) {
    RmsNorm(x.data(), attn_norm.typed_data() + l * D, h.data(), B, D, eps);
    F32Matmuls(crew, h.data(), B, D,
               {{wq.typed_data() + l * D * N * H, q.data(), N * H},
                {wk.typed_data() + l * D * K * H, k.data(), K * H},
                {wv.typed_data() + l * D * K * H, v.data(), K * H}});
    for (int64_t b = 0; b < B; ++b) {
      const float *c = cos.data() + b * H / 2, *sn = sin.data() + b * H / 2;
      for (int64_t n = 0; n < N; ++n) Rope(q.data() + (b * N + n) * H, H, c, sn);
      for (int64_t n = 0; n < K; ++n) {
        Rope(k.data() + (b * K + n) * H, H, c, sn);
        const int64_t at = (((l * B + b) * K + n) * S + slot) * H;
        std::memcpy(kc + at, k.data() + (b * K + n) * H, sizeof(float) * H);
        std::memcpy(vc + at, v.data() + (b * K + n) * H, sizeof(float) * H);
      }
    }
    crew.Run(B * K, 1, [&](int64_t first, int64_t last) {
      for (int64_t bk = first; bk < last; ++bk) {
        const int64_t b = bk / K, base = (l * B * K + bk) * S * H;
        // Query heads n of kv head n / group are consecutive: bk's are q[bk * group ...].
        AttendGroup(q.data() + bk * group * H, kc + base, vc + base, seg + b * S, slot, H, group,
                    att.data() + bk * group * H, scores.data() + bk * group * (S + kLanes));
      }
    });
    F32Matmuls(crew, att.data(), B, N * H, {{wo.typed_data() + l * N * H * D, delta.data(), D}});
    for (int64_t i = 0; i < B * D; ++i) x[i] += delta[i];

    RmsNorm(x.data(), mlp_norm.typed_data() + l * D, h.data(), B, D, eps);
    F32Matmuls(crew, h.data(), B, D,
               {{wgate.typed_data() + l * D * F, gate.data(), F},
                {wup.typed_data() + l * D * F, up.data(), F}});
    for (int64_t i = 0; i < B * F; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    F32Matmuls(crew, gate.data(), B, F, {{wdown.typed_data() + l * F * D, delta.data(), D}});
    for (int64_t i = 0; i < B * D; ++i) x[i] += delta[i];
  }

  // The final norm and the LM head: the embedding [V, D] (tied) or a kernel [D, V].
  RmsNorm(x.data(), final_norm.typed_data(), h.data(), B, D, eps);
  float* logits = logits_out->typed_data();
  if (tied_head) {
    crew.Run(V, 256, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        for (int64_t b = 0; b < B; ++b) {
          logits[b * V + t] = Dot(h.data() + b * D, head.typed_data() + t * D, D);
        }
      }
    });
  } else {
    F32Matmuls(crew, h.data(), B, D, {{head.typed_data(), logits, V}});
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxlmLlamaDecode, LlamaDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // RoPE positions [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cache slot []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cache segment ids [B, S]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // attn_norm [L, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [L, D, N, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [L, D, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [L, D, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // o [L, N, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mlp_norm [L, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate [L, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // up [L, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // down [L, F, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache [L, B, K, S, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // final_norm [D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // head [V, D] or [D, V]
                                  .Attr<float>("eps")
                                  .Attr<float>("theta")
                                  .Attr<int32_t>("tied_head")  // 1: the embedding [V, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // logits [B, V]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // k cache, in place
                                  .Ret<ffi::Buffer<ffi::F32>>());  // v cache, in place
