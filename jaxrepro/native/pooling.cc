// Max pooling's backward pass for XLA:CPU, called through JAX's FFI
// (jaxrepro.native builds and registers it with depthwise.cc).
//
// jaxrepro's XLA form of this gradient (jaxrepro.models.ops.pooling) finds each
// window's first maximum with strided compares and routes the gradient with selects,
// pads and interleaves, one pass over memory each. This kernel takes one pass: the
// mini Xception's first pool, forward and backward, took 141 against 206 ms (180 px,
// batch 32, 2-core AMD EPYC).
//
// Bits: the gradient of select-and-scatter, which JAX's `nn.max_pool` gradient is.
//
//   jaxrepro_max_pool_gradient: dx for y = max pool of x (window kh x kw, strides
//       sh, sw, padding pad_top and pad_left; y and g are [N, Ho, Wo, C]). dx starts
//       at +0.0. Windows are walked in row-major order; each window's gradient goes to
//       the first input (in row-major window order, padding never) that equals the
//       window's maximum, and is added there to what earlier windows left. A -0.0
//       gradient is added as +0.0, as select-and-scatter's add to a zero does.
//
// Only compares and additions (vectorised over channels, which are independent),
// each an IEEE float32 operation in the order written,
// so any conforming compiler gives the same bits. Work items are whole images, each
// written by one thread, so the core count changes no bit. Items run with
// flush-to-zero and denormals-are-zero on, as XLA:CPU's own code does.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

using Map = ffi::BufferR4<ffi::F32>;

namespace {

struct Window {
  int64_t kh, kw, sh, sw, top, left;
};

// The gradient of image n: dx[n] from x[n], y[n], g[n].
void ImageGradient(const float* x, const float* y, const float* g, float* dx, int64_t h,
                   int64_t w, int64_t ho, int64_t wo, int64_t c, const Window& win,
                   int32_t* taken, float* gradient) {
  std::fill(dx, dx + h * w * c, 0.0f);
  for (int64_t a = 0; a < ho; ++a) {
    for (int64_t b = 0; b < wo; ++b) {
      const float* __restrict__ ym = y + (a * wo + b) * c;
      const float* __restrict__ gm = g + (a * wo + b) * c;
      for (int64_t k = 0; k < c; ++k) {
        taken[k] = 0;
        gradient[k] = gm[k] == 0.0f ? 0.0f : gm[k];  // -0.0 as +0.0
      }
      for (int64_t i = 0; i < win.kh; ++i) {
        const int64_t row = a * win.sh + i - win.top;
        if (row < 0 || row >= h) continue;  // padding: never picked
        for (int64_t j = 0; j < win.kw; ++j) {
          const int64_t col = b * win.sw + j - win.left;
          if (col < 0 || col >= w) continue;
          const float* __restrict__ xm = x + (row * w + col) * c;
          float* __restrict__ d = dx + (row * w + col) * c;
          // hit: not yet taken and x == y. Adding +0.0 where this input is not chosen
          // leaves d as it is: d is never -0.0 (it starts at +0.0 and only values
          // other than -0.0 are added), and x + +0.0 == x for every other x.
          for (int64_t k = 0; k < c; ++k) {
            const int32_t hit = (taken[k] == 0) & (xm[k] == ym[k]);
            d[k] = d[k] + (hit ? gradient[k] : 0.0f);
            taken[k] |= hit;
          }
        }
      }
    }
  }
}

ffi::Error MaxPoolGradient(ffi::ThreadPool pool, Map x, Map y, Map g, ffi::Result<Map> dx,
                           int64_t window_h, int64_t window_w, int64_t stride_h,
                           int64_t stride_w, int64_t pad_top, int64_t pad_left) {
  auto xd = x.dimensions();
  auto yd = y.dimensions();
  auto gd = g.dimensions();
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3];
  const int64_t ho = yd[1], wo = yd[2];
  if (yd[0] != n || yd[3] != c || gd[0] != n || gd[1] != ho || gd[2] != wo || gd[3] != c) {
    return ffi::Error::InvalidArgument("input, output and gradient shapes disagree");
  }
  const Window win{window_h, window_w, stride_h, stride_w, pad_top, pad_left};
  const float* xp = x.typed_data();
  const float* yp = y.typed_data();
  const float* gp = g.typed_data();
  float* out = dx->typed_data();
  jaxrepro::ParallelFor(pool, n, [&](int64_t item) {
    thread_local std::vector<int32_t> taken;
    thread_local std::vector<float> gradient;
    taken.resize(c);
    gradient.resize(c);
    ImageGradient(xp + item * h * w * c, yp + item * ho * wo * c, gp + item * ho * wo * c,
                  out + item * h * w * c, h, w, ho, wo, c, win, taken.data(),
                  gradient.data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxreproMaxPoolGradient, MaxPoolGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Arg<Map>()
                                  .Arg<Map>()
                                  .Ret<Map>()
                                  .Attr<int64_t>("window_h")
                                  .Attr<int64_t>("window_w")
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
