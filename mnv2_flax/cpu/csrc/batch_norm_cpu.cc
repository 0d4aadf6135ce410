// Per-channel batch sums for BatchNorm (+ ReLU6) on XLA's CPU backend.
//
// Written with jax.numpy, the two-pass variance mean((x - mean)^2) makes XLA
// write x - mean as a full-size temporary (it shares it with the output), and
// the backward's two sums and its input gradient recompute and write the
// masked gradient in separate passes. On this backend writing a fresh tensor
// costs several times more than reading one, so these kernels only read:
// the statistics are two reads of x (mean, then mean((x - mean)^2), as
// nn.BatchNorm(use_fast_variance=False)), the backward's sums one read of x
// and dy; XLA then writes the output / input gradient in one fused pass.
//
// A tensor is viewed as rows of C channels (NHWC: N * H * W rows), in
// groups where it has leading (vmap) axes: with vmap_method='broadcast_all'
// x of (S, N, H, W, C) gives (S, C) statistics, each group's own. Rows are
// split into at most 16 fixed ranges; each range is summed in blocks of a
// few thousand values in float (vectorised) added into a double accumulator,
// and the ranges are added in order, so the result does not depend on the
// number of threads or on scheduling.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mnv2::SumOverRanges;

struct Rows {
  int64_t groups, rows, c;  // rows per group
};

// x's rows per group of `out` (one group per C values of `out`).
Rows RowsOf(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& out) {
  auto dims = x.dimensions();
  const int64_t c = dims.size() == 0 ? 1 : dims.back();
  const int64_t groups = c > 0 ? static_cast<int64_t>(out.element_count()) / c : 0;
  const int64_t rows = groups > 0 ? static_cast<int64_t>(x.element_count()) / c / groups : 0;
  return Rows{groups, rows, c};
}

// Sums over all rows: block(begin, end, acc) adds rows [begin, end) into
// `acc`, `width` zeroed floats. Each of SumOverRanges' fixed row ranges is
// summed in blocks of a few thousand values in float (vectorised), added
// into the range's double accumulator.
template <typename F>
std::vector<double> SumRows(ffi::ThreadPool& pool, int64_t rows, int64_t c,
                            int64_t width, F&& block) {
  const int64_t per_block = std::clamp<int64_t>(4096 / c, 1, 64);
  std::vector<double> sums(width);
  SumOverRanges(
      pool, rows, width,
      [&](int64_t begin, int64_t end, double* total) {
        std::vector<float> acc(width);
        for (int64_t row = begin; row < end; row += per_block) {
          std::fill(acc.begin(), acc.end(), 0.0f);
          block(row, std::min(end, row + per_block), acc.data());
          for (int64_t i = 0; i < width; ++i) total[i] += acc[i];
        }
      },
      sums.data());
  return sums;
}

// s[ch] += x[ch], or (x[ch] - mean[ch])^2 when `mean`, over `rows` rows.
// Plain functions with restrict pointers (not lambda captures, which the
// compiler reloads every iteration) so that the channel loops vectorise.
inline void SumRowsOf(const float* __restrict x, const float* __restrict mean,
                      int64_t c, int64_t rows, float* __restrict s) {
  for (int64_t row = 0; row < rows; ++row, x += c) {
    if (mean == nullptr) {
      for (int64_t ch = 0; ch < c; ++ch) s[ch] += x[ch];
    } else {
      for (int64_t ch = 0; ch < c; ++ch) {
        const float d = x[ch] - mean[ch];
        s[ch] += d * d;
      }
    }
  }
}

// g = dy where lo < (x - mean) * mul + bias < hi, else 0:
// s[ch] += g and sc[ch] += g * (x - mean), over `rows` rows.
inline void GradSumRows(const float* __restrict x, const float* __restrict dy,
                        const float* __restrict mean,
                        const float* __restrict mul,
                        const float* __restrict bias, float lo, float hi,
                        int64_t c, int64_t rows, float* __restrict s,
                        float* __restrict sc) {
  for (int64_t row = 0; row < rows; ++row, x += c, dy += c) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const float centred = x[ch] - mean[ch];
      const float z = centred * mul[ch] + bias[ch];
      const float d = dy[ch];  // loaded unconditionally: vectorises
      const float g = (z > lo && z < hi) ? d : 0.0f;
      s[ch] += g;
      sc[ch] += g * centred;
    }
  }
}

// mean[c] and (biased) var[c] = mean((x - mean)^2) of x over all rows: two
// reads of x, as nn.BatchNorm(use_fast_variance=False).
ffi::Error Stats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                 ffi::ResultBuffer<ffi::F32> mean,
                 ffi::ResultBuffer<ffi::F32> var) {
  const Rows r = RowsOf(x, *mean);
  if (r.rows <= 0) return ffi::Error::InvalidArgument("batch_norm: empty x");
  const int64_t c = r.c;
  const double n = static_cast<double>(r.rows);
  for (int64_t group = 0; group < r.groups; ++group) {
    const float* data = x.typed_data() + group * r.rows * c;
    float* m = mean->typed_data() + group * c;
    float* v = var->typed_data() + group * c;
    std::vector<double> sums = SumRows(
        pool, r.rows, c, c,
        [&](int64_t begin, int64_t end, float* __restrict acc) {
          SumRowsOf(data + begin * c, nullptr, c, end - begin, acc);
        });
    for (int64_t ch = 0; ch < c; ++ch) m[ch] = static_cast<float>(sums[ch] / n);
    sums = SumRows(pool, r.rows, c, c,
                   [&](int64_t begin, int64_t end, float* __restrict acc) {
                     SumRowsOf(data + begin * c, m, c, end - begin, acc);
                   });
    for (int64_t ch = 0; ch < c; ++ch) v[ch] = static_cast<float>(sums[ch] / n);
  }
  return ffi::Error::Success();
}

// The backward's two sums: g = dy, or dy where 0 < (x - mean) * mul + bias < 6
// when `relu6` (the ReLU6 mask recomputed from x, as jax.nn.relu6's gradient);
// sum_g[c] = sum g and sum_gc[c] = sum g * (x - mean).
ffi::Error GradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias,
                    ffi::ResultBuffer<ffi::F32> sum_g,
                    ffi::ResultBuffer<ffi::F32> sum_gc, bool relu6) {
  const Rows r = RowsOf(x, *sum_g);
  if (r.rows <= 0) return ffi::Error::InvalidArgument("batch_norm: empty x");
  const int64_t c = r.c;
  // relu6 = false: the mask's bounds never exclude a value.
  const float lo = relu6 ? 0.0f : -std::numeric_limits<float>::infinity();
  const float hi = relu6 ? 6.0f : std::numeric_limits<float>::infinity();
  for (int64_t group = 0; group < r.groups; ++group) {
    const float* xd = x.typed_data() + group * r.rows * c;
    const float* dyd = dy.typed_data() + group * r.rows * c;
    const float* __restrict mu = mean.typed_data() + group * c;
    const float* __restrict k = mul.typed_data() + group * c;
    const float* __restrict b = bias.typed_data() + group * c;
    std::vector<double> sums = SumRows(
        pool, r.rows, c, 2 * c,
        [&](int64_t begin, int64_t end, float* __restrict acc) {
          GradSumRows(xd + begin * c, dyd + begin * c, mu, k, b, lo, hi, c,
                      end - begin, acc, acc + c);
        });
    float* out_g = sum_g->typed_data() + group * c;
    float* out_gc = sum_gc->typed_data() + group * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      out_g[ch] = static_cast<float>(sums[ch]);
      out_gc[ch] = static_cast<float>(sums[c + ch]);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mnv2BatchNormStats, Stats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mnv2BatchNormGradSums, GradSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("relu6"));
