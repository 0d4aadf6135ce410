// Depthwise 2D convolution of NHWC float32 tensors for XLA's CPU backend.
//
// XLA's CPU backend runs a grouped convolution with one channel per group far
// below memory speed, and the shifted multiply-add form (depthwise.py's
// 'shift') writes padded copies and, for the kernel gradient, reads the input
// and output gradient once per tap. These loops read each tensor once: for
// every output pixel the taps that fall inside the image are accumulated over
// a contiguous channel vector (what the compiler vectorises), rows are shared
// among XLA's intra-op threads.
//
// Conventions (those of lax.conv_general_dilated with NHWC / HWIO and
// feature_group_count == C): out[b, y, x, c] =
//   sum_{i, j} in[b, y * sh + i * dh - top, x * sw + j * dw - left, c] * k[i, j, c]
// with zero outside the image.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mnv2::ParallelFor;
using mnv2::SumOverRanges;

struct Geometry {
  int64_t n, h, w, c;        // input (n: the images of every kernel)
  int64_t kh, kw;            // kernel
  int64_t oh, ow;            // output
  int64_t sh, sw, dh, dw;    // strides, dilation
  int64_t top, left;         // leading padding
  int64_t kernels;           // kernels (seeds): images [s * n / kernels,
                             // (s + 1) * n / kernels) use kernel s
};

// Dimensions past the last `rank` multiplied: the leading (vmap) axes.
int64_t Leading(const ffi::AnyBuffer::Dimensions& dims, size_t rank) {
  int64_t product = 1;
  for (size_t i = 0; i + rank < dims.size(); ++i) product *= dims[i];
  return product;
}

// NHWC input and output, (kh, kw, C) kernel, each with optional leading
// axes (a vmap over stacked kernels, vmap_method='broadcast_all'): the
// inputs of kernel s are those at the same leading index.
Geometry MakeGeometry(const ffi::AnyBuffer::Dimensions& in,
                      const ffi::AnyBuffer::Dimensions& kernel,
                      const ffi::AnyBuffer::Dimensions& out, int64_t sh,
                      int64_t sw, int64_t dh, int64_t dw, int64_t top,
                      int64_t left) {
  const size_t r = in.size(), k = kernel.size(), o = out.size();
  return Geometry{Leading(in, 3), in[r - 3], in[r - 2], in[r - 1],
                  kernel[k - 3],  kernel[k - 2],
                  out[o - 3],     out[o - 2],
                  sh, sw, dh, dw, top, left, Leading(kernel, 3)};
}

// The kernel taps that image b uses.
inline const float* KernelOf(const Geometry& g, const float* kernel,
                             int64_t b) {
  return kernel + (b / (g.n / g.kernels)) * g.kh * g.kw * g.c;
}

// The outputs x in [*begin, *end) whose tap at column offset `offset`
// (= j * dilation - left padding) reads an input column in [0, w).
inline void ValidColumns(int64_t offset, int64_t stride, int64_t w,
                         int64_t ow, int64_t* begin, int64_t* end) {
  // x * stride + offset >= 0  and  x * stride + offset <= w - 1.
  int64_t lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  int64_t hi = w - 1 - offset < 0 ? 0 : (w - 1 - offset) / stride + 1;
  *begin = std::min(lo, ow);
  *end = std::max(*begin, std::min(hi, ow));
}

// dst[x * c + ch] += src[(x * stride + offset) * c + ch] * k[ch] over the
// valid x: every tap of a row is one tight loop, no bounds tests inside.
inline void RowTap(float* __restrict dst, const float* __restrict src,
                   const float* __restrict k, int64_t c, int64_t stride,
                   int64_t offset, int64_t begin, int64_t end) {
  for (int64_t x = begin; x < end; ++x) {
    float* __restrict o = dst + x * c;
    const float* __restrict v = src + (x * stride + offset) * c;
    for (int64_t ch = 0; ch < c; ++ch) o[ch] += v[ch] * k[ch];
  }
}

// Calls f(tap, in_row, offset, begin, end) for every tap (i, j) of output
// row y of image b that reads a real input row: `tap` = i * kw + j, the
// valid outputs x in [begin, end) read in_row[(x * sw + offset) * c ...].
template <typename F>
inline void ForEachTap(const Geometry& g, const float* in, int64_t b,
                       int64_t y, F&& f) {
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t iy = y * g.sh + i * g.dh - g.top;
    if (iy < 0 || iy >= g.h) continue;
    const float* in_row = in + ((b * g.h + iy) * g.w) * g.c;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t offset = j * g.dw - g.left;
      int64_t begin, end;
      ValidColumns(offset, g.sw, g.w, g.ow, &begin, &end);
      f(i * g.kw + j, in_row, offset, begin, end);
    }
  }
}

// Forward: one output row (b, y) at a time.
void ForwardRows(const Geometry& g, const float* __restrict in,
                 const float* __restrict kernel, float* __restrict out,
                 int64_t row_begin, int64_t row_end) {
  const int64_t c = g.c;
  for (int64_t row = row_begin; row < row_end; ++row) {
    float* __restrict out_row = out + row * g.ow * c;
    std::memset(out_row, 0, sizeof(float) * g.ow * c);
    const float* k = KernelOf(g, kernel, row / g.oh);
    ForEachTap(g, in, row / g.oh, row % g.oh,
               [&](int64_t tap, const float* in_row, int64_t offset,
                   int64_t begin, int64_t end) {
                 RowTap(out_row, in_row, k + tap * c, c, g.sw, offset, begin,
                        end);
               });
  }
}

// Input gradient: one input row (b, iy) at a time. Each output pixel of the
// output rows that read this input row adds its gradient times the tap
// weight to the input pixel it read (a scatter within the row, which this
// thread owns).
void InputGradRows(const Geometry& g, const float* __restrict dout,
                   const float* __restrict kernel, float* __restrict din,
                   int64_t row_begin, int64_t row_end) {
  const int64_t c = g.c;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / g.h, iy = row % g.h;
    const float* __restrict taps = KernelOf(g, kernel, b);
    float* __restrict din_row = din + row * g.w * c;
    std::memset(din_row, 0, sizeof(float) * g.w * c);
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ny = iy + g.top - i * g.dh;  // = y * sh
      if (ny < 0 || ny % g.sh != 0) continue;
      const int64_t y = ny / g.sh;
      if (y >= g.oh) continue;
      const float* __restrict dout_row = dout + ((b * g.oh + y) * g.ow) * c;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t offset = j * g.dw - g.left;
        int64_t begin, end;
        ValidColumns(offset, g.sw, g.w, g.ow, &begin, &end);
        const float* __restrict k = taps + (i * g.kw + j) * c;
        for (int64_t x = begin; x < end; ++x) {
          float* __restrict d = din_row + (x * g.sw + offset) * c;
          const float* __restrict v = dout_row + x * c;
          for (int64_t ch = 0; ch < c; ++ch) d[ch] += v[ch] * k[ch];
        }
      }
    }
  }
}

// Kernel gradient of output rows [row_begin, row_end), added to `acc`
// (kh * kw * c floats).
void KernelGradRows(const Geometry& g, const float* __restrict in,
                    const float* __restrict dout, float* __restrict acc,
                    int64_t row_begin, int64_t row_end) {
  const int64_t c = g.c;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const float* __restrict dout_row = dout + row * g.ow * c;
    ForEachTap(g, in, row / g.oh, row % g.oh,
               [&](int64_t tap, const float* in_row, int64_t offset,
                   int64_t begin, int64_t end) {
                 float* __restrict a = acc + tap * c;
                 for (int64_t x = begin; x < end; ++x) {
                   const float* __restrict v = in_row + (x * g.sw + offset) * c;
                   const float* __restrict d = dout_row + x * c;
                   for (int64_t ch = 0; ch < c; ++ch) a[ch] += v[ch] * d[ch];
                 }
               });
  }
}

// Rows per chunk: about 64 KiB of output each, at least one row.
int64_t Grain(int64_t row_floats) {
  return std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, row_floats));
}

ffi::Error CheckShapes(const Geometry& g) {
  if (g.oh <= 0 || g.ow <= 0 || g.sh <= 0 || g.sw <= 0 || g.dh <= 0 ||
      g.dw <= 0 || g.kernels <= 0 || g.n % g.kernels != 0) {
    return ffi::Error::InvalidArgument("depthwise: bad output shape or stride");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> in,
                   ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> out, int64_t stride_h,
                   int64_t stride_w, int64_t dilation_h, int64_t dilation_w,
                   int64_t pad_top, int64_t pad_left) {
  Geometry g = MakeGeometry(in.dimensions(), kernel.dimensions(),
                            out->dimensions(), stride_h, stride_w, dilation_h,
                            dilation_w, pad_top, pad_left);
  if (auto error = CheckShapes(g); error.failure()) return error;
  const float* x = in.typed_data();
  const float* k = kernel.typed_data();
  float* y = out->typed_data();
  ParallelFor(pool, g.n * g.oh, Grain(g.ow * g.c),
              [&](int64_t begin, int64_t end) {
                ForwardRows(g, x, k, y, begin, end);
              });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> in,
                    ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> din,
                    ffi::ResultBuffer<ffi::F32> dkernel, int64_t stride_h,
                    int64_t stride_w, int64_t dilation_h, int64_t dilation_w,
                    int64_t pad_top, int64_t pad_left) {
  Geometry g = MakeGeometry(in.dimensions(), kernel.dimensions(),
                            dout.dimensions(), stride_h, stride_w, dilation_h,
                            dilation_w, pad_top, pad_left);
  if (auto error = CheckShapes(g); error.failure()) return error;
  const float* x = in.typed_data();
  const float* k = kernel.typed_data();
  const float* dy = dout.typed_data();
  float* dx = din->typed_data();
  float* dk = dkernel->typed_data();
  ParallelFor(pool, g.n * g.h, Grain(g.w * g.c),
              [&](int64_t begin, int64_t end) {
                InputGradRows(g, dy, k, dx, begin, end);
              });
  // Kernel gradient, per kernel: a private accumulator per range of its
  // output rows, summed in range order (bitwise reproducible, and the same
  // bits as the kernel's images alone).
  const int64_t rows = g.n / g.kernels * g.oh, taps = g.kh * g.kw * g.c;
  for (int64_t s = 0; s < g.kernels; ++s) {
    SumOverRanges(
        pool, rows, taps,
        [&](int64_t begin, int64_t end, float* acc) {
          KernelGradRows(g, x, dy, acc, s * rows + begin, s * rows + end);
        },
        dk + s * taps);
  }
  return ffi::Error::Success();
}

// The attributes both handlers take, in their parameter order.
template <typename Binding>
auto WithGeometry(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("dilation_h")
      .template Attr<int64_t>("dilation_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_left");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mnv2DepthwiseForward, Forward,
                              WithGeometry(ffi::Ffi::Bind()
                                               .Ctx<ffi::ThreadPool>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mnv2DepthwiseBackward, Backward,
                              WithGeometry(ffi::Ffi::Bind()
                                               .Ctx<ffi::ThreadPool>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::F32>>()));
