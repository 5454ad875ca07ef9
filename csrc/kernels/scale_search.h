// Error evaluation and threshold search for choosing quantization parameters.
//
// The quantizer everywhere is the one of ONNX QuantizeLinear/DequantizeLinear:
//   q(x) = scale * (clamp(round(x / scale) + zp, qmin, qmax) - zp)
// The kernels evaluate candidates; the choice of candidates (power-of-two
// exponents, clipping fractions) is made by the Python calibration methods.
#pragma once
#include <cstdint>

namespace pyquant {

// Total squared error sum_i c_i * E[(x - q(x))^2 | x in bin i] of the
// distribution described by a histogram (nbins equal bins over [lo, hi], density
// uniform inside each bin), computed in closed form: the rounding error inside
// the clipping range integrates exactly over any bin width, the clipping error
// outside it is the integral of (x - clip)^2.
// Preconditions: nbins >= 1, hi > lo, scale > 0, qmin < qmax, zp integral.
double histogram_quant_error(const double* hist, int64_t nbins, double lo, double hi,
                             double scale, double zp, double qmin, double qmax);

// histogram_quant_error for ncand (scale, zp) pairs: out[k] for candidate k.
void histogram_quant_errors(const double* hist, int64_t nbins, double lo, double hi,
                            const double* scales, const double* zps, int64_t ncand,
                            double qmin, double qmax, double* out);

// Exact squared error of quantizing each row of x ([rows, cols], row-major) with
// each of ncand candidates of that row: scales/zps/out are [rows, ncand].
// Rounding is half-to-even, as in QuantizeLinear. Non-finite values are skipped. Computed
// in double for either input type.
void tensor_quant_errors(const float* x, int64_t rows, int64_t cols,
                         const double* scales, const double* zps, int64_t ncand,
                         double qmin, double qmax, double* out);
void tensor_quant_errors(const double* x, int64_t rows, int64_t cols,
                         const double* scales, const double* zps, int64_t ncand,
                         double qmin, double qmax, double* out);

// Values below which fraction qs[k] (in [0, 1]) of the histogram's mass lies,
// interpolating linearly inside a bin. An empty histogram gives lo.
void histogram_quantiles(const double* hist, int64_t nbins, double lo, double hi,
                         const double* qs, int64_t nq, double* out);

// Entropy calibration (the KL-divergence threshold of TensorRT's INT8
// calibrator, Migacz 2017). abs_hist is a histogram of |x| over [0, hi]. For
// each candidate i (num_quant_bins <= i <= nbins) the reference distribution P
// is the first i bins with the tail folded into bin i-1, Q is the first i bins
// (tail not folded) merged into num_quant_bins levels and expanded back over P's
// non-zero bins; the returned
// threshold is the upper edge of the bin i that minimises KL(P || Q).
// Preconditions: nbins >= num_quant_bins >= 1, hi > 0.
double histogram_entropy_threshold(const double* abs_hist, int64_t nbins, double hi,
                                   int64_t num_quant_bins);

}  // namespace pyquant
