// Bilinear resampling with reflect fill for XLA:CPU, called through JAX's FFI: the
// training step's rotation and zoom (jaxrepro.data.augment), in one pass per image.
//
// jaxrepro's XLA form (`augment.affine_transform`) computes each output pixel's input
// coordinates, reflects the four neighbours' indices with an integer `mod` and fetches
// them with gathers; XLA:CPU runs the gathers element by element and the `mod` as a
// division. This kernel does the same arithmetic in one loop over the output pixels.
//
//   jaxrepro_affine_resample: out[..., y, x, :] for images [..., H, W, C] and
//       coefficients [..., 6] = (a0, a1, a2, b0, b1, b2) of each image, with the input
//       coordinates x_in = a0*x + a1*y + a2 and y_in = b0*x + b1*y + b2.
//
// Bits: those of the XLA form, operation for operation: the coordinates as
// (a0*x + a1*y) + a2; per axis lower = floor(c), upper weight c - lower, lower weight
// 1 - (c - lower), index lower converted as XLA converts (NaN to 0, out of range
// saturated), reflected half-sample symmetric (Python's `mod` by 2*size); the
// neighbours' terms (wy*wx)*pixel summed in the order (top left, top right, bottom
// left, bottom right). Every multiply and add is a separate IEEE float32 operation
// (the library is built with -ffp-contract=off and no fast-math; XLA's code has no
// FMA under jaxrepro's AVX cap), so the two give the same bits (tested). Work items
// are output rows, each written by one thread, so the core count changes no bit.

#include <cmath>
#include <cstdint>
#include <limits>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

// XLA:CPU's float32 -> int32 conversion: NaN is 0, values out of range saturate.
int32_t ToInt32(float value) {
  if (std::isnan(value)) return 0;
  if (value >= 2147483648.0f) return std::numeric_limits<int32_t>::max();
  if (value < -2147483648.0f) return std::numeric_limits<int32_t>::min();
  return static_cast<int32_t>(value);
}

// Half-sample symmetric reflection into [0, size): `mod(index, 2*size)` as Python
// (and jnp.mod) define it, then the upper half mirrored.
int64_t Reflect(int32_t index, int32_t size) {
  const int32_t period = 2 * size;
  // Within one period of the image (every rotation and zoom of the paper's ranges):
  // the same result without a division.
  if (index >= 0 && index < size) return index;
  if (index >= size && index < period) return period - 1 - index;
  if (index < 0 && index >= -size) return -1 - index;
  int32_t r = index % period;
  if (r < 0) r += period;
  return r >= size ? period - 1 - r : r;
}

// index + 1 with int32 wrap-around, as XLA adds.
int32_t Next(int32_t index) {
  return static_cast<int32_t>(static_cast<uint32_t>(index) + 1u);
}

struct Nodes {
  int64_t lower, upper;    // reflected indices
  float lower_w, upper_w;  // their weights
};

Nodes Interpolate(float coordinate, int32_t size) {
  const float lower = std::floor(coordinate);
  const float upper_w = coordinate - lower;
  const float lower_w = 1.0f - upper_w;
  const int32_t index = ToInt32(lower);
  return {Reflect(index, size), Reflect(Next(index), size), lower_w, upper_w};
}

void ResampleRow(const float* image, const float* k, float* out, int64_t y, int64_t h,
                 int64_t w, int64_t c) {
  const float fy = static_cast<float>(y);
  const int32_t hh = static_cast<int32_t>(h), ww = static_cast<int32_t>(w);
  for (int64_t x = 0; x < w; ++x) {
    const float fx = static_cast<float>(x);
    const float x_in = (k[0] * fx + k[1] * fy) + k[2];
    const float y_in = (k[3] * fx + k[4] * fy) + k[5];
    const Nodes ny = Interpolate(y_in, hh), nx = Interpolate(x_in, ww);
    const float w00 = ny.lower_w * nx.lower_w, w01 = ny.lower_w * nx.upper_w;
    const float w10 = ny.upper_w * nx.lower_w, w11 = ny.upper_w * nx.upper_w;
    const float* __restrict__ p00 = image + (ny.lower * w + nx.lower) * c;
    const float* __restrict__ p01 = image + (ny.lower * w + nx.upper) * c;
    const float* __restrict__ p10 = image + (ny.upper * w + nx.lower) * c;
    const float* __restrict__ p11 = image + (ny.upper * w + nx.upper) * c;
    float* __restrict__ o = out + x * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      float sum = w00 * p00[ch];
      sum = sum + w01 * p01[ch];
      sum = sum + w10 * p10[ch];
      sum = sum + w11 * p11[ch];
      o[ch] = sum;
    }
  }
}

ffi::Error AffineResample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> images,
                          ffi::Buffer<ffi::F32> coefficients,
                          ffi::Result<ffi::Buffer<ffi::F32>> out) {
  // images [..., H, W, C] and coefficients [..., 6]: the leading axes are the batch
  // (any number of them, so that vmap can add its own).
  auto d = images.dimensions();
  auto kd = coefficients.dimensions();
  const size_t rank = d.size();
  if (rank < 3 || kd.size() != rank - 2 || kd[rank - 3] != 6) {
    return ffi::Error::InvalidArgument("images must be [..., H, W, C], coefficients [..., 6]");
  }
  int64_t n = 1;
  for (size_t i = 0; i + 3 < rank; ++i) {
    if (kd[i] != d[i]) return ffi::Error::InvalidArgument("batch axes of images and coefficients differ");
    n *= d[i];
  }
  const int64_t h = d[rank - 3], w = d[rank - 2], c = d[rank - 1];
  if (h > std::numeric_limits<int32_t>::max() / 2 || w > std::numeric_limits<int32_t>::max() / 2) {
    return ffi::Error::InvalidArgument("images too large for int32 indices");
  }
  const float* ip = images.typed_data();
  const float* kp = coefficients.typed_data();
  float* op = out->typed_data();
  jaxrepro::ParallelFor(pool, n * h, [&](int64_t item) {
    const int64_t image = item / h, y = item % h;
    ResampleRow(ip + image * h * w * c, kp + image * 6, op + (image * h + y) * w * c, y, h, w,
                c);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxreproAffineResample, AffineResample,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
