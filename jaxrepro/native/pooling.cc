// Max pooling's forward and backward passes for XLA:CPU, called through JAX's FFI
// (jaxrepro.native builds and registers them with the other kernels).
//
// jaxrepro's XLA form of this gradient (jaxrepro.models.ops.pooling) finds each
// window's first maximum with strided compares and routes the gradient with selects,
// pads and interleaves, one pass over memory each. This kernel takes one pass: the
// mini Xception's first pool, forward and backward, took 141 against 206 ms (180 px,
// batch 32, 2-core AMD EPYC). The XLA form's forward pass pads the map with -inf,
// then folds nine strided slices; the forward kernel reads the map once and writes
// the pooled map, with no padded copy.
//
// Bits: the forward pass is the XLA form's (XLA's maximum, folded in the same order);
// the gradient is select-and-scatter's, which JAX's `nn.max_pool` gradient is.
//
//   jaxrepro_max_pool: y (window kh x kw, strides sh, sw, padding pad_top and
//       pad_left; y is [N, Ho, Wo, C]) for x [N, H, W, C]: each window's maximum,
//       folded in row-major window order from -inf.
//
//   jaxrepro_max_pool_gradient: dx for y = max pool of x (window kh x kw, strides
//       sh, sw, padding pad_top and pad_left; y and g are [N, Ho, Wo, C]). dx starts
//       at +0.0. Windows are walked in row-major order; each window's gradient goes to
//       the first input (in row-major window order, padding never) that equals the
//       window's maximum, and is added there to what earlier windows left. A -0.0
//       gradient is added as +0.0, as select-and-scatter's add to a zero does.
//
// Only compares, selects and additions (vectorised over channels, which are
// independent; the forward pass's as AVX instructions), each an IEEE float32 operation
// in the order written, so any conforming compiler gives the same bits. Work items are
// output rows (forward) or whole images (backward), each written by one thread, so the
// core count changes no bit. Items run with flush-to-zero and denormals-are-zero on,
// as XLA:CPU's own code does.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

using Map = ffi::BufferR4<ffi::F32>;

namespace {

struct Window {
  int64_t kh, kw, sh, sw, top, left;
};

// `vblendvps`: per lane, if_set where mask's sign bit is set, else if_clear. Written
// as the instruction itself: GCC folds the intrinsic into a generic select, which for
// a sign-bit mask it lowers to scalar code under AVX (no 256-bit integer compare),
// 5x slower here.
inline __m256 Blend(__m256 if_clear, __m256 if_set, __m256 mask) {
  __m256 r;
  asm("vblendvps %3, %2, %1, %0" : "=x"(r) : "x"(if_clear), "x"(if_set), "x"(mask));
  return r;
}

// XLA:CPU's maximum of 8 float32s, m (the maximum so far) and v, as the pinned jaxlib
// compiles `jnp.maximum` for AVX (tested against it on signed zeros, denormals, NaNs
// and infinities): a NaN m is the result; else a NaN v, its sign cleared unless m is
// negative; else the larger, +0.0 above -0.0, by `vmaxps` with the operands ordered by
// m's sign, which under denormals-are-zero also flushes a denormal result to zero.
inline __m256 Maximum8(__m256 m, __m256 v) {
  const __m256 first = Blend(v, m, m);  // m's sign set: m, else v
  const __m256 second = Blend(m, v, m);
  __m256 r = _mm256_max_ps(first, second);  // first > second ? first : second
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 v_nan = Blend(_mm256_and_ps(v, magnitude), v, m);
  r = Blend(r, v_nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return Blend(r, m, _mm256_cmp_ps(m, m, _CMP_UNORD_Q));
}

// The first `count` (<= 8) floats at p in a register, the rest -inf.
inline __m256 LoadPart(const float* p, int64_t count) {
  if (count == 8) return _mm256_loadu_ps(p);
  float part[8];
  std::fill(part, part + 8, -std::numeric_limits<float>::infinity());
  std::copy(p, p + count, part);
  return _mm256_loadu_ps(part);
}

// Output row a of one image's forward pass (x and y point at the image). Each window's
// maximum is folded in row-major window order from -inf, as `max_pool_3x3_s2`'s XLA
// form folds its strided slices of the input padded with -inf (Maximum8(m, -inf) is
// m, so padding is skipped), 8 channels at a time in a register.
void PoolRow(const float* x, float* y, int64_t a, int64_t h, int64_t w, int64_t wo,
             int64_t c, const Window& win) {
  const int64_t row0 = a * win.sh - win.top;
  const int64_t rows_begin = std::max<int64_t>(0, -row0);
  const int64_t rows_end = std::min<int64_t>(win.kh, h - row0);
  for (int64_t b = 0; b < wo; ++b) {
    const int64_t col0 = b * win.sw - win.left;
    const int64_t cols_begin = std::max<int64_t>(0, -col0);
    const int64_t cols_end = std::min<int64_t>(win.kw, w - col0);
    float* ym = y + (a * wo + b) * c;
    for (int64_t k = 0; k < c; k += 8) {
      const int64_t count = std::min<int64_t>(8, c - k);
      __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t i = rows_begin; i < rows_end; ++i) {
        const float* xr = x + ((row0 + i) * w + col0) * c + k;
        for (int64_t j = cols_begin; j < cols_end; ++j) {
          m = Maximum8(m, LoadPart(xr + j * c, count));
        }
      }
      if (count == 8) {
        _mm256_storeu_ps(ym + k, m);
      } else {
        float part[8];
        _mm256_storeu_ps(part, m);
        std::copy(part, part + count, ym + k);
      }
    }
  }
}

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

ffi::Error MaxPool(ffi::ThreadPool pool, Map x, ffi::Result<Map> y, int64_t window_h,
                   int64_t window_w, int64_t stride_h, int64_t stride_w, int64_t pad_top,
                   int64_t pad_left) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3];
  const int64_t ho = yd[1], wo = yd[2];
  if (yd[0] != n || yd[3] != c) {
    return ffi::Error::InvalidArgument("input and output shapes disagree");
  }
  const Window win{window_h, window_w, stride_h, stride_w, pad_top, pad_left};
  const float* xp = x.typed_data();
  float* out = y->typed_data();
  // Items are output rows: the first pools have few, large images.
  jaxrepro::ParallelFor(pool, n * ho, [&](int64_t item) {
    const int64_t image = item / ho, row = item % ho;
    PoolRow(xp + image * h * w * c, out + image * ho * wo * c, row, h, w, wo, c, win);
  });
  return ffi::Error::Success();
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxreproMaxPool, MaxPool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Ret<Map>()
                                  .Attr<int64_t>("window_h")
                                  .Attr<int64_t>("window_w")
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

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
