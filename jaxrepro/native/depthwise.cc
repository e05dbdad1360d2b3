// Depthwise convolution kernels for XLA:CPU, called through JAX's FFI
// (jaxrepro.native builds and registers them).
//
// XLA:CPU runs a depthwise convolution as a generic grouped-convolution loop, and
// the shifted multiply-adds jaxrepro wrote instead take one pass over memory per tap
// and per reduction. These kernels take one pass: each output row reads its input
// rows from cache.
//
// Bits. Every sum has one order, written out below, and the code is compiled
// without floating-point contraction (-ffp-contract=off, no fast-math), so each
// value is the same IEEE float32 arithmetic on every x86-64 CPU, whatever the
// compiler vectorises (it vectorises over channels, which are independent). Work is
// split into fixed items (output rows; whole images for the tap gradients) whose
// results are combined in a fixed order, so the core count changes no bit. Each item
// runs with flush-to-zero and denormals-are-zero on, as XLA:CPU's own code does.
//
//   jaxrepro_shifted_sum:  y[n,h,w,c] = sum over taps (i, j) in row-major order of
//                          x[n, h+i-pad_top, w+j-pad_left, c] * taps[i, j, c], with
//                          zero outside x; the sum starts from the (0, 0) term and
//                          adds the others one by one, zero terms included. This is
//                          the depthwise convolution and, with the taps flipped and
//                          the padding transposed, its input gradient.
//   jaxrepro_tap_gradients: dtaps[i,j,c] = sum over n, h, w of
//                          x[n, h+i-pad_top, w+j-pad_left, c] * g[n,h,w,c]: per
//                          image, per row the sum over w (ascending, from +0), rows
//                          added in ascending order (from +0); the images' sums
//                          added in ascending order (from +0).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

// One-name types: a comma inside the handler macros' arguments would split them.
using Map = ffi::BufferR4<ffi::F32>;
using Taps = ffi::BufferR3<ffi::F32>;

namespace {

using jaxrepro::FlushDenormals;
using jaxrepro::ParallelFor;

struct Shape {
  int64_t n, h, w, c;
};

Shape ShapeOf(Map& x) {
  auto d = x.dimensions();
  return {d[0], d[1], d[2], d[3]};
}

// Input row h of image n, or a row of zeros where h lies outside the image (the
// convolution's zero padding, multiplied like any other input: 0 * tap is a signed
// zero, as in the XLA form of the same sum).
const float* InputRow(const float* x, const Shape& s, int64_t n, int64_t h,
                      const float* zeros) {
  return (h < 0 || h >= s.h) ? zeros : x + ((n * s.h + h) * s.w) * s.c;
}

// dst[w] op= src[w + j - pad_left] * factor (per channel; zeros outside the row) for
// every column w of one row, where op is `=` if `first` else `+=`. `factor_stride` 0:
// one factor vector for all columns (a tap); c: one per column (a gradient row).
void MultiplyAccumulateRow(float* __restrict__ dst, const float* __restrict__ src,
                           const float* __restrict__ factor, int64_t factor_stride,
                           const float* __restrict__ zeros, int64_t width, int64_t c,
                           int64_t shift, bool first) {
  for (int64_t w = 0; w < width; ++w) {
    const int64_t col = w + shift;
    const float* __restrict__ in = (col < 0 || col >= width) ? zeros : src + col * c;
    const float* __restrict__ f = factor + w * factor_stride;
    float* __restrict__ o = dst + w * c;
    if (first) {
      for (int64_t k = 0; k < c; ++k) o[k] = in[k] * f[k];
    } else {
      for (int64_t k = 0; k < c; ++k) o[k] = o[k] + in[k] * f[k];
    }
  }
}

ffi::Error ShiftedSum(ffi::ThreadPool pool, Map x, Taps taps, ffi::Result<Map> y,
                      int64_t pad_top, int64_t pad_left) {
  const Shape s = ShapeOf(x);
  auto td = taps.dimensions();
  const int64_t kh = td[0], kw = td[1];
  if (td[2] != s.c) return ffi::Error::InvalidArgument("taps and input channels differ");
  const float* xd = x.typed_data();
  const float* t = taps.typed_data();
  float* yd = y->typed_data();
  const std::vector<float> zeros(s.w * s.c, 0.0f);
  ParallelFor(pool, s.n * s.h, [&](int64_t item) {
    const int64_t n = item / s.h, h = item % s.h;
    float* out = yd + ((n * s.h + h) * s.w) * s.c;
    // Tap by tap in row-major order over the whole output row: each output's sum
    // starts from the (0, 0) term and adds the others in that order.
    for (int64_t i = 0; i < kh; ++i) {
      const float* row = InputRow(xd, s, n, h + i - pad_top, zeros.data());
      for (int64_t j = 0; j < kw; ++j) {
        MultiplyAccumulateRow(out, row, t + (i * kw + j) * s.c, 0, zeros.data(), s.w, s.c,
                              j - pad_left, i == 0 && j == 0);
      }
    }
  });
  return ffi::Error::Success();
}

// acc[k] += sum over w (ascending) of src[w + shift][k] * g[w][k], the row's terms
// summed from +0 first and then added to acc.
void RowTapSum(float* __restrict__ acc, float* __restrict__ row_sum,
               const float* __restrict__ src, const float* __restrict__ g,
               const float* __restrict__ zeros, int64_t width, int64_t c, int64_t shift) {
  std::fill(row_sum, row_sum + c, 0.0f);
  for (int64_t w = 0; w < width; ++w) {
    const int64_t col = w + shift;
    const float* __restrict__ in = (col < 0 || col >= width) ? zeros : src + col * c;
    const float* __restrict__ gw = g + w * c;
    for (int64_t k = 0; k < c; ++k) row_sum[k] = row_sum[k] + in[k] * gw[k];
  }
  for (int64_t k = 0; k < c; ++k) acc[k] = acc[k] + row_sum[k];
}

ffi::Error TapGradients(ffi::ThreadPool pool, Map x, Map g, ffi::Result<Taps> dtaps,
                        int64_t pad_top, int64_t pad_left) {
  const Shape s = ShapeOf(x);
  auto gd = g.dimensions();
  auto td = dtaps->dimensions();
  const int64_t kh = td[0], kw = td[1];
  if (gd[0] != s.n || gd[1] != s.h || gd[2] != s.w || gd[3] != s.c || td[2] != s.c) {
    return ffi::Error::InvalidArgument("input, gradient and taps shapes disagree");
  }
  const float* xd = x.typed_data();
  const float* gp = g.typed_data();
  const int64_t c = s.c, count = kh * kw * c;
  const std::vector<float> zeros(s.w * c, 0.0f);
  std::vector<float> partial(s.n * count);
  ParallelFor(pool, s.n, [&](int64_t n) {
    thread_local std::vector<float> row_sum;
    row_sum.resize(c);
    float* image_sum = partial.data() + n * count;
    std::fill(image_sum, image_sum + count, 0.0f);
    for (int64_t h = 0; h < s.h; ++h) {
      const float* grow = gp + ((n * s.h + h) * s.w) * c;
      for (int64_t i = 0; i < kh; ++i) {
        const float* row = InputRow(xd, s, n, h + i - pad_top, zeros.data());
        for (int64_t j = 0; j < kw; ++j) {
          RowTapSum(image_sum + (i * kw + j) * c, row_sum.data(), row, grow, zeros.data(),
                    s.w, c, j - pad_left);
        }
      }
    }
  });
  FlushDenormals flush;
  float* out = dtaps->typed_data();
  std::fill(out, out + count, 0.0f);
  for (int64_t n = 0; n < s.n; ++n) {
    const float* image_sum = partial.data() + n * count;
    for (int64_t k = 0; k < count; ++k) out[k] = out[k] + image_sum[k];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxreproShiftedSum, ShiftedSum,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Arg<Taps>()
                                  .Ret<Map>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxreproTapGradients, TapGradients,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Arg<Map>()
                                  .Ret<Taps>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
