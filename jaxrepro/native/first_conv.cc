// A network's first convolution, over few input channels (an image's three), for
// XLA:CPU, called through JAX's FFI (jaxrepro.native builds and registers it).
//
// XLA:CPU runs every convolution as Eigen's spatial convolution, which packs the
// input's patches for a matrix product; with three input channels the product is
// short (27 or 75 long) and the packing dominates: the mini Xception's 5x5 stem took
// 219 ms per batch of 32 at 180 px, and the ConvNet's 3x3 conv1 55 ms, at 20-30
// GFLOP/s on a 2-core AMD EPYC (Zen 3), where the layers after them run at 160-170.
// This kernel keeps each output pixel's 32 channels in registers and walks its window
// once.
//
// Bits: jaxrepro's own, not Eigen's (Eigen's sum order depends on its blocking).
//
//   jaxrepro_first_conv: y = the VALID, stride-1 convolution of x [N, H, W, Ci] with
//       w [KH, KW, Ci, Co] (Co a multiple of 32), y [N, H-KH+1, W-KW+1, Co]:
//       y[n, a, b, o] = (((+0.0 + x[n, a, b, 0] * w[0, 0, 0, o])
//                          + x[n, a, b, 1] * w[0, 0, 1, o]) + ...)
//       over the window in (row, column, input channel) order, each product and sum
//       rounded to float32.
//
// Only multiplies and adds (AVX intrinsics, 8 output channels per instruction; no
// fused multiply-add), each an IEEE float32 operation in the order written, so any
// conforming compiler gives the same bits. Work items are output rows, each written
// by one thread, so the core count changes no bit. Items run with flush-to-zero and
// denormals-are-zero on, as XLA:CPU's own code does.

#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

using Map = ffi::BufferR4<ffi::F32>;

namespace {

constexpr int64_t kBlock = 32;  // output channels per pass: four 8-float registers

struct Shape {
  int64_t h, w, ci, kh, kw, co, ho, wo;
};

// The window's inputs in (row, column, input channel) order, as offsets from its
// corner: the kernel's HWIO rows are in that order, so window input t meets kernel
// row t.
std::vector<int64_t> WindowOffsets(const Shape& s) {
  std::vector<int64_t> offsets;
  for (int64_t i = 0; i < s.kh; ++i) {
    for (int64_t j = 0; j < s.kw; ++j) {
      for (int64_t c = 0; c < s.ci; ++c) offsets.push_back((i * s.w + j) * s.ci + c);
    }
  }
  return offsets;
}

#define JAXREPRO_ACCUMULATE(a0, a1, a2, a3, v) \
  a0 = _mm256_add_ps(a0, _mm256_mul_ps(v, w0));  \
  a1 = _mm256_add_ps(a1, _mm256_mul_ps(v, w1));  \
  a2 = _mm256_add_ps(a2, _mm256_mul_ps(v, w2));  \
  a3 = _mm256_add_ps(a3, _mm256_mul_ps(v, w3));

// Two adjacent output pixels, output channels [o, o + 32): x points at the first
// pixel's window corner, w at channel o of the kernel's first row, y at the first
// pixel's output channel o. Eight accumulators, four kernel registers, a broadcast
// and a product: 14 of AVX's 16 registers, so nothing is spilled to memory.
void TwoPixels(const float* x, const float* w, float* y, const int64_t* offsets,
               int64_t taps, const Shape& s) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  const int64_t ci = s.ci;
  for (int64_t t = 0; t < taps; ++t) {
    const float* wt = w + t * s.co;
    const __m256 w0 = _mm256_loadu_ps(wt), w1 = _mm256_loadu_ps(wt + 8);
    const __m256 w2 = _mm256_loadu_ps(wt + 16), w3 = _mm256_loadu_ps(wt + 24);
    const float* xt = x + offsets[t];
    const __m256 v0 = _mm256_broadcast_ss(xt);
    JAXREPRO_ACCUMULATE(a00, a01, a02, a03, v0)
    const __m256 v1 = _mm256_broadcast_ss(xt + ci);
    JAXREPRO_ACCUMULATE(a10, a11, a12, a13, v1)
  }
  const int64_t co = s.co;
  _mm256_storeu_ps(y, a00), _mm256_storeu_ps(y + 8, a01);
  _mm256_storeu_ps(y + 16, a02), _mm256_storeu_ps(y + 24, a03);
  _mm256_storeu_ps(y + co, a10), _mm256_storeu_ps(y + co + 8, a11);
  _mm256_storeu_ps(y + co + 16, a12), _mm256_storeu_ps(y + co + 24, a13);
}

// One output pixel, as `TwoPixels` computes each of its two.
void OnePixel(const float* x, const float* w, float* y, const int64_t* offsets,
              int64_t taps, const Shape& s) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  for (int64_t t = 0; t < taps; ++t) {
    const float* wt = w + t * s.co;
    const __m256 w0 = _mm256_loadu_ps(wt), w1 = _mm256_loadu_ps(wt + 8);
    const __m256 w2 = _mm256_loadu_ps(wt + 16), w3 = _mm256_loadu_ps(wt + 24);
    const __m256 v0 = _mm256_broadcast_ss(x + offsets[t]);
    JAXREPRO_ACCUMULATE(a00, a01, a02, a03, v0)
  }
  _mm256_storeu_ps(y, a00), _mm256_storeu_ps(y + 8, a01);
  _mm256_storeu_ps(y + 16, a02), _mm256_storeu_ps(y + 24, a03);
}

#undef JAXREPRO_ACCUMULATE

// Output row a of one image (x and y point at the image).
void Row(const float* x, const float* w, float* y, int64_t a, const int64_t* offsets,
         const Shape& s) {
  const int64_t taps = s.kh * s.kw * s.ci;
  for (int64_t o = 0; o < s.co; o += kBlock) {
    int64_t b = 0;
    for (; b + 2 <= s.wo; b += 2) {
      TwoPixels(x + (a * s.w + b) * s.ci, w + o, y + (a * s.wo + b) * s.co + o, offsets,
                  taps, s);
    }
    for (; b < s.wo; ++b) {
      OnePixel(x + (a * s.w + b) * s.ci, w + o, y + (a * s.wo + b) * s.co + o, offsets, taps,
               s);
    }
  }
}

ffi::Error FirstConv(ffi::ThreadPool pool, Map x, Map w, ffi::Result<Map> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  const Shape s{xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2]};
  if (wd[2] != s.ci || s.co % kBlock != 0 || yd[0] != xd[0] || yd[3] != s.co ||
      s.ho != s.h - s.kh + 1 || s.wo != s.w - s.kw + 1) {
    return ffi::Error::InvalidArgument("input, kernel and output shapes disagree");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* out = y->typed_data();
  const int64_t n = xd[0];
  const std::vector<int64_t> offsets = WindowOffsets(s);
  jaxrepro::ParallelFor(pool, n * s.ho, [&](int64_t item) {
    const int64_t image = item / s.ho, row = item % s.ho;
    Row(xp + image * s.h * s.w * s.ci, wp, out + image * s.ho * s.wo * s.co, row,
        offsets.data(), s);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxreproFirstConv, FirstConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Arg<Map>()
                                  .Ret<Map>());
