// CPU kernels of patchddm_fast's fused ops: GroupNorm -> SiLU (forward and backward,
// with an optional per-(sample, channel) bias added before the normalisation) and the
// in-place averaging skip h <- (h + skip) / 2.
//
// Why this file exists: the composite PyTorch path materialises x + bias, the normalised
// tensor and the activation, and reads/writes each of them; here every element is read
// once for the statistics and once for the output (forward), or twice for the gradient
// (backward), with nothing saved but x and the per-group (mean, rstd).
//
// Layouts: (N, C, D, H, W) contiguous ("NCS", a channel is a contiguous plane of S
// elements) or channels_last_3d ("NSC", a spatial position is a contiguous row of C
// channels).  Dtypes: float, half, bfloat16; all arithmetic in fp32, statistics combined
// in double with Chan's parallel formula over cache-resident chunks whose own mean and
// M2 come from a two-pass in fp32 (stable even when |mean| >> std).  Work items and the
// order of every reduction are fixed by the shape alone, so results do not depend on the
// number of threads.
//
// The kernels are the CPU implementation of the custom ops patchddm::gn_silu_fwd,
// patchddm::gn_silu_bwd and patchddm::average_skip_, whose schemas are defined in Python
// (patchddm_fast/kernels/gn_silu.py, average_skip.py): TORCH_LIBRARY_IMPL below registers
// them for the CPU dispatch key of those schemas -- no namespace of their own, no pybind11,
// no Python headers.  patchddm_fast/kernels/cpu_ext.py builds this file with
// torch.utils.cpp_extension.load and keeps the Python CPU selector (C++ / composite /
// Triton interpreter) in front of these kernels.
// The build defines CPU_CAPABILITY / CPU_CAPABILITY_AVX2|AVX512 like ATen's own kernels,
// so at::vec::Vectorized maps to the widest SIMD the running torch uses.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace patchddm_cpu {
namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
// Elements per cache-resident chunk (16 KiB of fp32: two passes over it stay in L1/L2).
constexpr int64_t kChunk = 4096;
// Elements per parallel work item (256 KiB of fp32): enough items to spread one group
// of a 256^3 volume over all threads, few enough to keep per-item partials tiny.
constexpr int64_t kBlock = 1 << 16;

// ---------------------------------------------------------------------------------
// dtype plumbing: every kernel works on fp32 chunks; reduced types go through a
// thread-local buffer, fp32 is used in place.

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  using VT = at::vec::Vectorized<T>;
  static_assert(VT::size() == 2 * kV, "reduced-precision vector must hold two float vectors");
  int64_t i = 0;
  for (; i + VT::size() <= n; i += VT::size()) {
    auto [a, b] = at::vec::convert_to_float<T>(VT::loadu(src + i));
    a.store(dst + i);
    b.store(dst + i + kV);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  using VT = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + VT::size() <= n; i += VT::size()) {
    at::vec::convert_from_float<T>(Vec::loadu(src + i), Vec::loadu(src + i + kV)).store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// fp32 view of n elements at src: src itself for float, else converted into buf.
template <typename T>
inline const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float(src, buf, n);
    return buf;
  }
}

// Where to write n fp32 results destined for dst (dst itself for float).
template <typename T>
inline float* out_float(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename T>
inline void commit(const float* res, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) from_float(res, dst, n);
}

// ---------------------------------------------------------------------------------
// math helpers

inline Vec sigmoid_v(const Vec& z) {
  // exp_u20: polynomial exp, ~20 ulp, saturates cleanly (no inf/NaN for finite z).
  return Vec(1.f) / (Vec(1.f) + z.neg().exp_u20());
}

// d silu(z) / dz = s * (1 + z (1 - s)), s = sigmoid(z)
inline Vec dsilu_v(const Vec& z) {
  const Vec one(1.f);
  Vec s = sigmoid_v(z);
  return s * at::vec::fmadd(z, one - s, one);
}

// Mean/M2 of a set of values, combinable with Chan et al.'s parallel update.
struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
  void merge(double nb, double mb, double m2b) {
    if (nb <= 0.0) return;
    const double tot = n + nb;
    const double d = mb - mean;
    mean += d * (nb / tot);
    m2 += m2b + d * d * (n * nb / tot);
    n = tot;
  }
};

// Per-(sample, channel) partial sums of the backward reduction.
struct GradSums {
  double dz = 0.0, dzx = 0.0, xh = 0.0;
};

// ---------------------------------------------------------------------------------
// work decomposition shared by all kernels
//
// Both layouts are processed as flat runs of memory.  NCS: a run lies inside one
// channel plane, every element has the same per-(n, c) coefficients.  NSC: a run is a
// sequence of rows of C channels; element i of a run (starting on a row boundary)
// belongs to channel i mod C.  Per-channel coefficients are therefore laid out as a
// "tile" of period P (a multiple of C and of the vector width), tile[j] = coef[j mod C],
// and the flat loops read tile[i mod P]; per-channel sums accumulate into P slots that
// are folded to channels at the end of a chunk.  No per-row loops, no per-row tails.

struct Geometry {
  int64_t N, C, S, G, cpg;
  bool cl;        // channels_last_3d
  int64_t nchan;  // channels interleaved in a run: 1 (NCS) or C (NSC)
  int64_t P;      // tile period: multiple of nchan and of kV, >= 8 kV (independent slots)
  int64_t chunk;  // elements per cache-resident chunk: multiple of P
  int64_t span;   // elements per work item: multiple of chunk
  int64_t plane;  // elements owned by one (n, c) (NCS) or one n (NSC)
  int64_t nblk;   // work items per owner
  int64_t items() const { return N * (cl ? 1 : C) * nblk; }
};

Geometry make_geometry(const Tensor& x, int64_t groups, bool cl) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = x.size(2) * x.size(3) * x.size(4);
  g.G = groups;
  g.cpg = g.C / groups;
  g.cl = cl;
  g.nchan = cl ? g.C : 1;
  const int64_t period = g.nchan * (kV / std::gcd(g.nchan, kV));
  g.P = period * ((8 * kV + period - 1) / period);
  g.chunk = g.P * std::max<int64_t>(1, kChunk / g.P);
  g.span = g.chunk * std::max<int64_t>(1, kBlock / g.chunk);
  g.plane = cl ? g.S * g.C : g.S;
  g.nblk = (g.plane + g.span - 1) / g.span;
  return g;
}

// One work item: the flat element range [begin, end) and the index (n*C + c) of the
// first channel it touches (its channels are first .. first + nchan - 1).
struct Item {
  int64_t begin, end, first, blk;
};

inline Item item_of(const Geometry& g, int64_t it) {
  const int64_t owner = it / g.nblk, blk = it % g.nblk;
  const int64_t begin = owner * g.plane + blk * g.span;
  return {begin, std::min(owner * g.plane + g.plane, begin + g.span), owner * g.nchan, blk};
}

// tile[j] = coef[first + j mod nchan], j < P
inline void make_tile(const float* coef, const Geometry& g, int64_t first, float* tile) {
  if (g.nchan == 1) {
    std::fill(tile, tile + g.P, coef[first]);
    return;
  }
  for (int64_t j = 0; j < g.P; j += g.nchan) std::copy(coef + first, coef + first + g.nchan, tile + j);
}

// out[c] = sum of slots j with j mod nchan == c
inline void fold(const float* __restrict slots, const Geometry& g, float* __restrict out) {
  if (g.nchan == 1) {
    Vec acc(0.f);
    for (int64_t j = 0; j < g.P; j += kV) acc += Vec::loadu(slots + j);
    out[0] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
    return;
  }
  std::copy(slots, slots + g.nchan, out);
  for (int64_t j = g.nchan; j < g.P; j += g.nchan) {
    for (int64_t c = 0; c < g.nchan; ++c) out[c] += slots[j + c];
  }
}

// Calls f(i, j, k) for each vector of a chunk of len elements: i = element offset,
// j = i mod P (tile/slot offset), k = live lanes (kV except for the ragged last one).
template <typename F>
inline void for_vectors(int64_t len, int64_t P, F&& f) {
  int64_t i = 0, j = 0;
  for (; i + kV <= len; i += kV) {
    f(i, j, kV);
    j += kV;
    if (j == P) j = 0;
  }
  if (i < len) f(i, j, len - i);
}

// Lanes >= k set to zero (loadu(p, k) zero-fills, but values derived from it may not be 0).
inline Vec live(const Vec& v, int64_t k) {
  return k == kV ? v : Vec::set(Vec(0.f), v, k);
}

inline void slot_add(float* slots, int64_t j, const Vec& v) {
  (Vec::loadu(slots + j) + v).store(slots + j);
}

// ---------------------------------------------------------------------------------
// forward

// Per-(n, c, block) moments of x (without bias_in), layout [N*C][nblk]: exact two-pass
// mean/M2 per chunk in fp32, chunks merged in double.
template <typename T>
std::vector<Moments> channel_moments(const T* xp, const Geometry& g) {
  std::vector<Moments> part(g.N * g.C * g.nblk);
  at::parallel_for(0, g.items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : g.chunk);
    std::vector<float> slots(g.P), mut(g.P), col(g.nchan), mu(g.nchan);
    std::vector<Moments> m(g.nchan);
    for (int64_t it = begin; it < end; ++it) {
      const Item item = item_of(g, it);
      std::fill(m.begin(), m.end(), Moments{});
      for (int64_t off = item.begin; off < item.end; off += g.chunk) {
        const int64_t len = std::min(g.chunk, item.end - off);
        const float cnt = static_cast<float>(len / g.nchan);
        const float* p = as_float(xp + off, len, buf.data());
        std::fill(slots.begin(), slots.end(), 0.f);
        for_vectors(len, g.P, [&](int64_t i, int64_t j, int64_t k) {
          slot_add(slots.data(), j, Vec::loadu(p + i, k));
        });
        fold(slots.data(), g, col.data());
        for (int64_t c = 0; c < g.nchan; ++c) mu[c] = col[c] / cnt;
        make_tile(mu.data(), g, 0, mut.data());
        std::fill(slots.begin(), slots.end(), 0.f);
        for_vectors(len, g.P, [&](int64_t i, int64_t j, int64_t k) {
          const Vec d = live(Vec::loadu(p + i, k) - Vec::loadu(mut.data() + j), k);
          slot_add(slots.data(), j, d * d);
        });
        fold(slots.data(), g, col.data());
        for (int64_t c = 0; c < g.nchan; ++c) m[c].merge(cnt, mu[c], col[c]);
      }
      for (int64_t c = 0; c < g.nchan; ++c) part[(item.first + c) * g.nblk + item.blk] = m[c];
    }
  });
  return part;
}

// Elementwise y = silu(x * A[n,c] + B[n,c]).
template <typename T>
void apply_silu_affine(const T* xp, T* yp, const float* A, const float* B, const Geometry& g) {
  at::parallel_for(0, g.items(), 1, [&](int64_t begin, int64_t end) {
    constexpr bool kF = std::is_same_v<T, float>;
    std::vector<float> ibuf(kF ? 0 : g.chunk), obuf(kF ? 0 : g.chunk), At(g.P), Bt(g.P);
    int64_t tiled = -1;
    for (int64_t it = begin; it < end; ++it) {
      const Item item = item_of(g, it);
      if (item.first != tiled) {
        make_tile(A, g, item.first, At.data());
        make_tile(B, g, item.first, Bt.data());
        tiled = item.first;
      }
      for (int64_t off = item.begin; off < item.end; off += g.chunk) {
        const int64_t len = std::min(g.chunk, item.end - off);
        const float* p = as_float(xp + off, len, ibuf.data());
        float* o = out_float(yp + off, obuf.data());
        for_vectors(len, g.P, [&](int64_t i, int64_t j, int64_t k) {
          const Vec z = at::vec::fmadd(Vec::loadu(p + i, k), Vec::loadu(At.data() + j), Vec::loadu(Bt.data() + j));
          (z * sigmoid_v(z)).store(o + i, k);
        });
        commit(o, yp + off, len);
      }
    }
  });
}

// ---------------------------------------------------------------------------------
// backward

// Per-(n, c, block) sums of dz, dz*xhat and xhat, layout [N*C][nblk], where
// z = x*A + B (pre-activation), xhat = x*RA + RB (normalised), dz = dy * silu'(z).
template <typename T>
std::vector<GradSums> grad_sums(const T* xp, const T* dyp, const float* A, const float* B,
                                const float* RA, const float* RB, const Geometry& g) {
  std::vector<GradSums> part(g.N * g.C * g.nblk);
  at::parallel_for(0, g.items(), 1, [&](int64_t begin, int64_t end) {
    constexpr bool kF = std::is_same_v<T, float>;
    std::vector<float> xbuf(kF ? 0 : g.chunk), dybuf(kF ? 0 : g.chunk);
    std::vector<float> At(g.P), Bt(g.P), RAt(g.P), RBt(g.P), s1(g.P), s2(g.P), s3(g.P), col(g.nchan);
    std::vector<GradSums> acc(g.nchan);
    int64_t tiled = -1;
    for (int64_t it = begin; it < end; ++it) {
      const Item item = item_of(g, it);
      if (item.first != tiled) {
        make_tile(A, g, item.first, At.data());
        make_tile(B, g, item.first, Bt.data());
        make_tile(RA, g, item.first, RAt.data());
        make_tile(RB, g, item.first, RBt.data());
        tiled = item.first;
      }
      std::fill(acc.begin(), acc.end(), GradSums{});
      for (int64_t off = item.begin; off < item.end; off += g.chunk) {
        const int64_t len = std::min(g.chunk, item.end - off);
        const float* px = as_float(xp + off, len, xbuf.data());
        const float* pd = as_float(dyp + off, len, dybuf.data());
        std::fill(s1.begin(), s1.end(), 0.f);
        std::fill(s2.begin(), s2.end(), 0.f);
        std::fill(s3.begin(), s3.end(), 0.f);
        for_vectors(len, g.P, [&](int64_t i, int64_t j, int64_t k) {
          const Vec xv = Vec::loadu(px + i, k);
          const Vec z = at::vec::fmadd(xv, Vec::loadu(At.data() + j), Vec::loadu(Bt.data() + j));
          const Vec xh = live(at::vec::fmadd(xv, Vec::loadu(RAt.data() + j), Vec::loadu(RBt.data() + j)), k);
          const Vec dz = Vec::loadu(pd + i, k) * dsilu_v(z);  // dy lanes >= k are 0
          slot_add(s1.data(), j, dz);
          slot_add(s2.data(), j, dz * xh);
          slot_add(s3.data(), j, xh);
        });
        fold(s1.data(), g, col.data());
        for (int64_t c = 0; c < g.nchan; ++c) acc[c].dz += col[c];
        fold(s2.data(), g, col.data());
        for (int64_t c = 0; c < g.nchan; ++c) acc[c].dzx += col[c];
        fold(s3.data(), g, col.data());
        for (int64_t c = 0; c < g.nchan; ++c) acc[c].xh += col[c];
      }
      for (int64_t c = 0; c < g.nchan; ++c) part[(item.first + c) * g.nblk + item.blk] = acc[c];
    }
  });
  return part;
}

// Elementwise dx = K1 * silu'(z) * dy + K2 * x + K3, z = x*A + B.
template <typename T>
void apply_grad_input(const T* xp, const T* dyp, T* dxp, const float* A, const float* B,
                      const float* K1, const float* K2, const float* K3, const Geometry& g) {
  at::parallel_for(0, g.items(), 1, [&](int64_t begin, int64_t end) {
    constexpr bool kF = std::is_same_v<T, float>;
    std::vector<float> xbuf(kF ? 0 : g.chunk), dybuf(kF ? 0 : g.chunk), obuf(kF ? 0 : g.chunk);
    std::vector<float> At(g.P), Bt(g.P), K1t(g.P), K2t(g.P), K3t(g.P);
    int64_t tiled = -1;
    for (int64_t it = begin; it < end; ++it) {
      const Item item = item_of(g, it);
      if (item.first != tiled) {
        make_tile(A, g, item.first, At.data());
        make_tile(B, g, item.first, Bt.data());
        make_tile(K1, g, item.first, K1t.data());
        make_tile(K2, g, item.first, K2t.data());
        make_tile(K3, g, item.first, K3t.data());
        tiled = item.first;
      }
      for (int64_t off = item.begin; off < item.end; off += g.chunk) {
        const int64_t len = std::min(g.chunk, item.end - off);
        const float* px = as_float(xp + off, len, xbuf.data());
        const float* pd = as_float(dyp + off, len, dybuf.data());
        float* o = out_float(dxp + off, obuf.data());
        for_vectors(len, g.P, [&](int64_t i, int64_t j, int64_t k) {
          const Vec xv = Vec::loadu(px + i, k);
          const Vec z = at::vec::fmadd(xv, Vec::loadu(At.data() + j), Vec::loadu(Bt.data() + j));
          const Vec dz = Vec::loadu(pd + i, k) * dsilu_v(z);
          const Vec lin = at::vec::fmadd(Vec::loadu(K2t.data() + j), xv, Vec::loadu(K3t.data() + j));
          at::vec::fmadd(Vec::loadu(K1t.data() + j), dz, lin).store(o + i, k);
        });
        commit(o, dxp + off, len);
      }
    }
  });
}

// ---------------------------------------------------------------------------------
// argument checking and layout handling

void check_float_type(const Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "patchddm_cpu_ext: ", name, " must be float32, float16 or bfloat16, got ", st);
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "patchddm_cpu_ext: ", name, " must be a CPU tensor, got ", t.device());
}

// Returns x in a layout the kernels index directly, and whether it is channels_last_3d.
std::pair<Tensor, bool> normalise_layout(const Tensor& x) {
  if (x.is_contiguous()) return {x, false};
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return {x, true};
  return {x.contiguous(), false};
}

Tensor per_channel_float(const Tensor& t, int64_t C, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "patchddm_cpu_ext: ", name, " must have shape (", C,
              ",), got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

struct Checked {
  Tensor x, w, b, bin;  // bin undefined when absent; w, b, bin fp32 contiguous
  bool cl;
};

Checked check_inputs(const Tensor& x_in, const Tensor& weight, const Tensor& bias,
                     const std::optional<Tensor>& bias_in, int64_t groups) {
  check_cpu(x_in, "x");
  check_float_type(x_in, "x");
  TORCH_CHECK(x_in.dim() == 5, "patchddm_cpu_ext: x must be 5-D (N, C, D, H, W), got shape ", x_in.sizes());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, "patchddm_cpu_ext: groups=", groups,
              " must be positive and divide the channel count ", C);
  TORCH_CHECK(x_in.numel() > 0, "patchddm_cpu_ext: x must not be empty, got shape ", x_in.sizes());
  Checked r;
  std::tie(r.x, r.cl) = normalise_layout(x_in);
  r.w = per_channel_float(weight, C, "weight");
  r.b = per_channel_float(bias, C, "bias");
  if (bias_in.has_value() && bias_in->defined()) {
    check_cpu(*bias_in, "bias_in");
    TORCH_CHECK(bias_in->dim() == 2 && bias_in->size(0) == N && bias_in->size(1) == C,
                "patchddm_cpu_ext: bias_in must have shape (", N, ", ", C, "), got ", bias_in->sizes());
    r.bin = bias_in->to(at::kFloat).contiguous();
  }
  return r;
}

template <typename F>
void dispatch_float_types(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "patchddm_cpu_ext: unsupported dtype ", st);
  }
}

// ---------------------------------------------------------------------------------
// ops

std::tuple<Tensor, Tensor, Tensor> gn_silu_forward(const Tensor& x_in, const Tensor& weight,
                                                   const Tensor& bias,
                                                   const std::optional<Tensor>& bias_in,
                                                   int64_t groups, double eps) {
  Checked in = check_inputs(x_in, weight, bias, bias_in, groups);
  const Geometry g = make_geometry(in.x, groups, in.cl);
  Tensor y = at::empty_like(in.x);  // same strides as the (dense) normalised x
  Tensor mean = at::empty({g.N, g.G}, in.x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  Tensor rstd = at::empty_like(mean);
  const float* w = in.w.data_ptr<float>();
  const float* b = in.b.data_ptr<float>();
  const float* bin = in.bin.defined() ? in.bin.data_ptr<float>() : nullptr;
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();

  dispatch_float_types(in.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = in.x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const std::vector<Moments> part = channel_moments(xp, g);
    std::vector<float> A(g.N * g.C), B(g.N * g.C);
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t gi = 0; gi < g.G; ++gi) {
        Moments m;
        for (int64_t c = gi * g.cpg; c < (gi + 1) * g.cpg; ++c) {
          const double shift = bin ? bin[n * g.C + c] : 0.0;
          for (int64_t k = 0; k < g.nblk; ++k) {
            const Moments& e = part[(n * g.C + c) * g.nblk + k];
            m.merge(e.n, e.mean + shift, e.m2);
          }
        }
        const double var = std::max(m.m2 / m.n, 0.0);
        const double r = 1.0 / std::sqrt(var + eps);
        mp[n * g.G + gi] = static_cast<float>(m.mean);
        rp[n * g.G + gi] = static_cast<float>(r);
        for (int64_t c = gi * g.cpg; c < (gi + 1) * g.cpg; ++c) {
          const double shift = bin ? bin[n * g.C + c] : 0.0;
          const double a = r * w[c];
          A[n * g.C + c] = static_cast<float>(a);
          B[n * g.C + c] = static_cast<float>(b[c] + (shift - m.mean) * a);
        }
      }
    }
    apply_silu_affine(xp, yp, A.data(), B.data(), g);
  });
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gn_silu_backward(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& weight, const Tensor& bias,
    const std::optional<Tensor>& bias_in, const Tensor& mean_in, const Tensor& rstd_in, int64_t groups) {
  Checked in = check_inputs(x_in, weight, bias, bias_in, groups);
  check_cpu(dy_in, "dy");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "patchddm_cpu_ext: dy shape ", dy_in.sizes(),
              " does not match x shape ", x_in.sizes());
  const Geometry g = make_geometry(in.x, groups, in.cl);
  TORCH_CHECK(mean_in.numel() == g.N * g.G && rstd_in.numel() == g.N * g.G,
              "patchddm_cpu_ext: mean and rstd must have N*groups = ", g.N * g.G, " elements, got ",
              mean_in.numel(), " and ", rstd_in.numel());
  check_cpu(mean_in, "mean");
  check_cpu(rstd_in, "rstd");
  // dy in x's dtype and x's layout (gradients arriving from a conv may use the other one)
  Tensor dy = dy_in.to(in.x.scalar_type())
                  .contiguous(in.cl ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous);
  const Tensor meanf = mean_in.to(at::kFloat).contiguous();
  const Tensor rstdf = rstd_in.to(at::kFloat).contiguous();
  const float* mp = meanf.data_ptr<float>();
  const float* rp = rstdf.data_ptr<float>();
  const float* w = in.w.data_ptr<float>();
  const float* b = in.b.data_ptr<float>();
  const float* bin = in.bin.defined() ? in.bin.data_ptr<float>() : nullptr;
  const int64_t NC = g.N * g.C;

  // z = x*A + B, xhat = x*RA + RB, per (n, c)
  std::vector<float> A(NC), B(NC), RA(NC), RB(NC);
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t gi = c / g.cpg;
      const double r = rp[n * g.G + gi];
      const double rb = ((bin ? bin[n * g.C + c] : 0.0) - static_cast<double>(mp[n * g.G + gi])) * r;
      RA[n * g.C + c] = static_cast<float>(r);
      RB[n * g.C + c] = static_cast<float>(rb);
      A[n * g.C + c] = static_cast<float>(r * w[c]);
      B[n * g.C + c] = static_cast<float>(rb * w[c] + b[c]);
    }
  }

  Tensor dx = at::empty_like(in.x);
  Tensor dwf = at::empty({g.C}, in.x.options().dtype(at::kFloat));
  Tensor dbf = at::empty({g.C}, in.x.options().dtype(at::kFloat));
  Tensor dbin;
  if (bin) dbin = at::empty({g.N, g.C}, in.x.options().dtype(at::kFloat));

  dispatch_float_types(in.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = in.x.data_ptr<T>();
    const T* dyp = dy.data_ptr<T>();
    const std::vector<GradSums> part = grad_sums(xp, dyp, A.data(), B.data(), RA.data(), RB.data(), g);
    std::vector<GradSums> sums(NC);
    for (int64_t nc = 0; nc < NC; ++nc) {
      for (int64_t k = 0; k < g.nblk; ++k) {
        const GradSums& e = part[nc * g.nblk + k];
        sums[nc].dz += e.dz;
        sums[nc].dzx += e.dzx;
        sums[nc].xh += e.xh;
      }
    }
    // dv = rstd * (w dz - c1 - xhat c2), c1 = mean_group(w dz), c2 = mean_group(w dz xhat)
    std::vector<float> K1(NC), K2(NC), K3(NC);
    const double M = static_cast<double>(g.cpg * g.S);
    float* dw = dwf.data_ptr<float>();
    float* db = dbf.data_ptr<float>();
    std::vector<double> dw_acc(g.C, 0.0), db_acc(g.C, 0.0);
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t gi = 0; gi < g.G; ++gi) {
        double c1 = 0.0, c2 = 0.0;
        for (int64_t c = gi * g.cpg; c < (gi + 1) * g.cpg; ++c) {
          c1 += w[c] * sums[n * g.C + c].dz;
          c2 += w[c] * sums[n * g.C + c].dzx;
        }
        c1 /= M;
        c2 /= M;
        const double r = rp[n * g.G + gi];
        for (int64_t c = gi * g.cpg; c < (gi + 1) * g.cpg; ++c) {
          const int64_t nc = n * g.C + c;
          const double rb = RB[nc];
          K1[nc] = static_cast<float>(r * w[c]);
          K2[nc] = static_cast<float>(-r * c2 * r);
          K3[nc] = static_cast<float>(-r * (c1 + c2 * rb));
          if (bin) {
            dbin.data_ptr<float>()[nc] = static_cast<float>(
                r * (w[c] * sums[nc].dz - static_cast<double>(g.S) * c1 - c2 * sums[nc].xh));
          }
          dw_acc[c] += sums[nc].dzx;
          db_acc[c] += sums[nc].dz;
        }
      }
    }
    for (int64_t c = 0; c < g.C; ++c) {
      dw[c] = static_cast<float>(dw_acc[c]);
      db[c] = static_cast<float>(db_acc[c]);
    }
    apply_grad_input(xp, dyp, dx.data_ptr<T>(), A.data(), B.data(), K1.data(), K2.data(), K3.data(), g);
  });
  Tensor dweight = dwf.to(weight.scalar_type());
  Tensor dbias = dbf.to(bias.scalar_type());
  // The schema returns a tensor in every slot: without bias_in an empty (0,) one in x's dtype.
  dbin = dbin.defined() ? dbin.to(bias_in->scalar_type()) : at::empty({0}, x_in.options());
  return {dx, dweight, dbias, dbin};
}

template <typename T>
void average_kernel(T* hp, const T* sp, int64_t numel) {
  constexpr int64_t kGrain = 1 << 15;
  at::parallel_for(0, (numel + kChunk - 1) / kChunk, std::max<int64_t>(1, kGrain / kChunk),
                   [&](int64_t begin, int64_t end) {
    constexpr bool kF = std::is_same_v<T, float>;
    std::vector<float> hbuf(kF ? 0 : kChunk), sbuf(kF ? 0 : kChunk), obuf(kF ? 0 : kChunk);
    const Vec half(0.5f);
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t off = ch * kChunk, len = std::min(kChunk, numel - off);
      const float* ph = as_float(hp + off, len, hbuf.data());
      const float* ps = as_float(sp + off, len, sbuf.data());
      float* o = out_float(hp + off, obuf.data());
      int64_t i = 0;
      for (; i + kV <= len; i += kV) ((Vec::loadu(ph + i) + Vec::loadu(ps + i)) * half).store(o + i);
      if (i < len) {
        const int64_t k = len - i;
        ((Vec::loadu(ph + i, k) + Vec::loadu(ps + i, k)) * half).store(o + i, k);
      }
      commit(o, hp + off, len);
    }
  });
}

void average_skip_(Tensor& h, const Tensor& skip) {
  check_cpu(h, "h");
  check_cpu(skip, "skip");
  check_float_type(h, "h");
  TORCH_CHECK(h.sizes() == skip.sizes(), "patchddm_cpu_ext: average_skip_: h shape ", h.sizes(),
              " does not match skip shape ", skip.sizes());
  if (h.numel() == 0) return;
  if (!h.is_non_overlapping_and_dense()) {
    // A view with gaps: no flat pass over its storage; keep the semantics, two passes.
    h.add_(skip).mul_(0.5);
    return;
  }
  Tensor s = skip;
  if (s.scalar_type() != h.scalar_type() || s.strides() != h.strides()) {
    s = at::empty_like(h);  // dense h: empty_like keeps h's strides
    s.copy_(skip);
  }
  dispatch_float_types(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    average_kernel<T>(h.data_ptr<T>(), s.data_ptr<T>(), h.numel());
  });
}

}  // namespace
}  // namespace patchddm_cpu

// The schemas (patchddm::gn_silu_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? bias_in,
// SymInt groups, float eps) -> (Tensor, Tensor, Tensor), ...) are defined by torch.library
// in Python before this library is loaded; int64_t kernels serve their SymInt arguments.
TORCH_LIBRARY_IMPL(patchddm, CPU, m) {
  m.impl("gn_silu_fwd", &patchddm_cpu::gn_silu_forward);
  m.impl("gn_silu_bwd", &patchddm_cpu::gn_silu_backward);
  m.impl("average_skip_", &patchddm_cpu::average_skip_);
}
