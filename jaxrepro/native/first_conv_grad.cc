// The kernel gradient of a network's first convolution (over an image's few channels),
// for XLA:CPU, called through JAX's FFI (jaxrepro.native builds and registers it).
//
// XLA:CPU computes a kernel gradient as a convolution over the whole batch, in Eigen's
// packed product; for the first convolution the product's rows are the window's 27 or
// 75 inputs, and Eigen ran it at 40 GFLOP/s on a 2-core AMD EPYC (Zen 3; the ConvNet's
// conv1, batch 32 at 180 px: 44 ms), where the layers after it run at 100-160. This
// kernel keeps 6 window inputs by 16 output channels of the gradient in registers and
// walks the image's output pixels once per group.
//
// Bits: jaxrepro's own, not Eigen's.
//
//   jaxrepro_first_conv_kernel_gradient: dw [KH, KW, Ci, Co] of the VALID, stride-1
//       convolution of x [N, H, W, Ci] (Co a multiple of 16), given the output's
//       gradient g [N, H-KH+1, W-KW+1, Co]:
//       p_n[i, j, c, o] = (((+0.0 + x[n, 0+i, 0+j, c] * g[n, 0, 0, o])
//                          + x[n, 0+i, 1+j, c] * g[n, 0, 1, o]) + ...)
//           over image n's output pixels (a, b) in (row, column) order;
//       dw[i, j, c, o] = (((+0.0 + p_0[i, j, c, o]) + p_1[i, j, c, o]) + ...)
//           over the images in order,
//       each product and sum rounded to float32.
//
// Only multiplies and adds (AVX intrinsics, 8 output channels per instruction; no
// fused multiply-add), each an IEEE float32 operation in the order written, so any
// conforming compiler gives the same bits. Work items are (image, 16 output channels),
// each written by one thread to its own partial sums, which one thread then adds in
// image order: the core count changes no bit. Items run with flush-to-zero and
// denormals-are-zero on, as XLA:CPU's own code does.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

using Map = ffi::BufferR4<ffi::F32>;

namespace {

constexpr int64_t kChannels = 16;  // output channels per item: two 8-float registers
constexpr int64_t kTaps = 6;       // window inputs per pass over a row: 12 accumulators

struct Shape {
  int64_t h, w, ci, kh, kw, co, ho, wo;
};

// The window's inputs in (row, column, input channel) order, as offsets from its
// corner (the order of dw's first three dimensions).
std::vector<int64_t> WindowOffsets(const Shape& s) {
  std::vector<int64_t> offsets;
  for (int64_t i = 0; i < s.kh; ++i) {
    for (int64_t j = 0; j < s.kw; ++j) {
      for (int64_t c = 0; c < s.ci; ++c) offsets.push_back((i * s.w + j) * s.ci + c);
    }
  }
  return offsets;
}

// Adds output row a's products to the partial sums of taps [t0, t0 + T) and 16 output
// channels: x points at the image, g at the row's first pixel's first channel of the
// item, p at the partial sum of tap t0's first channel of the item (taps co apart).
// The accumulators are named variables, not an array: GCC kept an array's copy in
// memory up to date on every pixel, twelve stores that halved the speed.
template <int T>
void RowTaps(const float* x, const float* g, float* p, const int64_t* offsets, int64_t a,
             const Shape& s) {
  const int64_t co = s.co;
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
#define JAXREPRO_TAPS(F) \
  F(0, a00, a01)         \
  F(1, a10, a11)         \
  F(2, a20, a21)         \
  F(3, a30, a31)         \
  F(4, a40, a41)         \
  F(5, a50, a51)
#define JAXREPRO_LOAD(t, lo, hi)                                        \
  if constexpr (T > t) {                                                \
    lo = _mm256_loadu_ps(p + t * co), hi = _mm256_loadu_ps(p + t * co + 8); \
  }
  JAXREPRO_TAPS(JAXREPRO_LOAD)
  int64_t o0 = 0, o1 = 0, o2 = 0, o3 = 0, o4 = 0, o5 = 0;
  if constexpr (T > 0) o0 = offsets[0];
  if constexpr (T > 1) o1 = offsets[1];
  if constexpr (T > 2) o2 = offsets[2];
  if constexpr (T > 3) o3 = offsets[3];
  if constexpr (T > 4) o4 = offsets[4];
  if constexpr (T > 5) o5 = offsets[5];
  const int64_t off[6] = {o0, o1, o2, o3, o4, o5};
  const float* corner = x + a * s.w * s.ci;
  for (int64_t b = 0; b < s.wo; ++b) {
    const __m256 g0 = _mm256_loadu_ps(g + b * co);
    const __m256 g1 = _mm256_loadu_ps(g + b * co + 8);
    const float* xb = corner + b * s.ci;
#define JAXREPRO_ACCUMULATE(t, lo, hi)                          \
  if constexpr (T > t) {                                        \
    const __m256 v = _mm256_broadcast_ss(xb + off[t]);          \
    lo = _mm256_add_ps(lo, _mm256_mul_ps(v, g0));               \
    hi = _mm256_add_ps(hi, _mm256_mul_ps(v, g1));               \
  }
    JAXREPRO_TAPS(JAXREPRO_ACCUMULATE)
  }
#define JAXREPRO_STORE(t, lo, hi)                                              \
  if constexpr (T > t) {                                                       \
    _mm256_storeu_ps(p + t * co, lo), _mm256_storeu_ps(p + t * co + 8, hi);    \
  }
  JAXREPRO_TAPS(JAXREPRO_STORE)
#undef JAXREPRO_STORE
#undef JAXREPRO_ACCUMULATE
#undef JAXREPRO_LOAD
#undef JAXREPRO_TAPS
}

void RowTapsUpTo6(int taps, const float* x, const float* g, float* p, const int64_t* offsets,
                  int64_t a, const Shape& s) {
  switch (taps) {
    case 6: return RowTaps<6>(x, g, p, offsets, a, s);
    case 5: return RowTaps<5>(x, g, p, offsets, a, s);
    case 4: return RowTaps<4>(x, g, p, offsets, a, s);
    case 3: return RowTaps<3>(x, g, p, offsets, a, s);
    case 2: return RowTaps<2>(x, g, p, offsets, a, s);
    default: return RowTaps<1>(x, g, p, offsets, a, s);
  }
}

// Image n's partial sums p [taps, co] for output channels [o, o + 16), from +0.0, one
// output row after the other; within a row every group of taps sees the pixels in
// column order, so each sum runs over the pixels in (row, column) order.
void ImagePartial(const float* x, const float* g, float* p, int64_t o,
                  const std::vector<int64_t>& offsets, const Shape& s) {
  const int64_t taps = static_cast<int64_t>(offsets.size());
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t k = 0; k < kChannels; ++k) p[t * s.co + o + k] = 0.0f;
  }
  for (int64_t a = 0; a < s.ho; ++a) {
    const float* g_row = g + a * s.wo * s.co + o;
    for (int64_t t0 = 0; t0 < taps; t0 += kTaps) {
      const int group = static_cast<int>(std::min<int64_t>(kTaps, taps - t0));
      RowTapsUpTo6(group, x, g_row, p + t0 * s.co + o, offsets.data() + t0, a, s);
    }
  }
}

ffi::Error FirstConvKernelGradient(ffi::ThreadPool pool, Map x, Map g, ffi::Result<Map> dw) {
  auto xd = x.dimensions();
  auto gd = g.dimensions();
  auto wd = dw->dimensions();
  const Shape s{xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], gd[1], gd[2]};
  if (wd[2] != s.ci || s.co % kChannels != 0 || gd[0] != xd[0] || gd[3] != s.co ||
      s.ho != s.h - s.kh + 1 || s.wo != s.w - s.kw + 1) {
    return ffi::Error::InvalidArgument("input, gradient and kernel shapes disagree");
  }
  const int64_t n = xd[0];
  const int64_t size = s.kh * s.kw * s.ci * s.co;
  const std::vector<int64_t> offsets = WindowOffsets(s);
  std::vector<float> partials(static_cast<size_t>(n * size));
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  const int64_t blocks = s.co / kChannels;
  jaxrepro::ParallelFor(pool, n * blocks, [&](int64_t item) {
    const int64_t image = item / blocks, o = (item % blocks) * kChannels;
    ImagePartial(xp + image * s.h * s.w * s.ci, gp + image * s.ho * s.wo * s.co,
                 partials.data() + image * size, o, offsets, s);
  });
  float* out = dw->typed_data();
  jaxrepro::FlushDenormals flush;
  for (int64_t k = 0; k < size; ++k) out[k] = 0.0f;
  for (int64_t image = 0; image < n; ++image) {
    const float* p = partials.data() + image * size;
    for (int64_t k = 0; k < size; ++k) out[k] = out[k] + p[k];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxreproFirstConvKernelGradient, FirstConvKernelGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Arg<Map>()
                                  .Ret<Map>());
