// The only file that includes pybind11. Each binding checks dtype, shape,
// contiguity and writability of its arrays (no hidden copies: a wrong array is
// an error, not a conversion), takes the data pointers while holding the GIL,
// then releases the GIL around the kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <optional>
#include <sstream>
#include <string>

#include "kernels/channel_stats.h"
#include "kernels/cle.h"
#include "kernels/histogram.h"
#include "kernels/multiversion.h"
#include "kernels/parallel.h"
#include "kernels/rounding.h"
#include "kernels/window_gram.h"
#include "kernels/scale_search.h"

namespace py = pybind11;

namespace {

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

template <typename T>
void require(const py::array& a, const char* name, const char* dtype_name,
             py::ssize_t ndim = -1, bool writable = false) {
  // Equivalence, not identity: two equal dtypes need not be the same object.
  if (!py::isinstance<py::array_t<T>>(a))
    throw py::type_error(std::string(name) + " must be " + dtype_name + ", got " +
                         py::str(a.dtype()).cast<std::string>());
  if (ndim >= 0 && a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) +
                          "-D, got shape " + shape_of(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous (shape " + shape_of(a) +
                          "); pass numpy.ascontiguousarray(" + name + ")");
  if (writable && !a.writeable())
    throw py::value_error(std::string(name) + " must be writable");
}

std::string str(double v) {
  std::ostringstream s;
  s << std::setprecision(17) << v;
  return s.str();
}

// The bin edges are lo + i (hi - lo) / nbins: hi - lo must be finite too (for float64 data
// a range like [-1e308, 1e308] is not).
void require_range(double lo, double hi, const char* what) {
  if (!std::isfinite(lo) || !std::isfinite(hi) || !(hi > lo) || !std::isfinite(hi - lo))
    throw py::value_error(std::string(what) + " range must be finite with hi > lo and a finite width hi - lo, got [" +
                          str(lo) + ", " + str(hi) + "]");
}

// Histograms have 1 to kMaxBins bins: the accumulating kernel takes 48 bytes per bin and
// thread of temporary counts, and the entropy search is quadratic in the bins.
constexpr int64_t kMaxBins = int64_t{1} << 20;

void require_bins(int64_t nbins, const char* name) {
  if (nbins < 1 || nbins > kMaxBins)
    throw py::value_error(std::string(name) + " must have 1 to " + std::to_string(kMaxBins) + " bins, got " +
                          std::to_string(nbins));
}

void require_nonempty(const py::array& a, const char* name) { require_bins(a.size(), name); }

// The tensor kernels of the statistics path compute in the type of their data.
enum class Real { F32, F64 };

Real real_type(const py::array& x, const char* name, const char* function) {
  if (py::isinstance<py::array_t<float>>(x)) {
    require<float>(x, name, "float32");
    return Real::F32;
  }
  if (py::isinstance<py::array_t<double>>(x)) {
    require<double>(x, name, "float64");
    return Real::F64;
  }
  throw py::type_error(std::string(function) + ": " + name + " must be float32 or float64, got " +
                       py::str(x.dtype()).cast<std::string>());
}

std::string shape_str(const std::vector<py::ssize_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// A float64 accumulator of exactly `shape`, C-contiguous and writable; its data pointer.
double* accumulator(py::array& a, const char* name, const std::vector<py::ssize_t>& shape) {
  require<double>(a, name, "float64", -1, true);
  if (a.ndim() != static_cast<py::ssize_t>(shape.size()) || !std::equal(shape.begin(), shape.end(), a.shape()))
    throw py::value_error(std::string(name) + " must have shape " + shape_str(shape) + ", got " + shape_of(a));
  return static_cast<double*>(a.mutable_data());
}

// The checked arguments of the two histogram-accumulating kernels.
struct HistogramArgs {
  Real type;
  const void* x;
  int64_t n;
  double* hist;
  int64_t nbins;
};

HistogramArgs histogram_args(const py::array& x, py::array& hist, double lo, double hi, const char* function) {
  const Real type = real_type(x, "x", function);
  require<double>(hist, "hist", "float64", 1, true);
  require_nonempty(hist, "hist");
  require_range(lo, hi, "histogram");
  return {type, x.data(), static_cast<int64_t>(x.size()), static_cast<double*>(hist.mutable_data()),
          static_cast<int64_t>(hist.size())};
}

// What histogram_accumulate_if_in_range returns.
struct CheckedAccumulate {
  bool added;
  pyquant::RangeStats stats;
};

const float* f32(const void* p) { return static_cast<const float*>(p); }
const double* f64(const void* p) { return static_cast<const double*>(p); }

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "pyquant C++ calibration kernels (see csrc/kernels/*.h for the math)";

  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("the number of threads must be at least 1, got " + std::to_string(n));
    pyquant::set_num_threads(n);
  }, py::arg("n"), "Threads of every later kernel call (process-wide); small inputs still run on one.");
  m.def("get_num_threads", &pyquant::num_threads, "Threads the kernels may use (see set_num_threads).");
  m.def("_set_parallel_thresholds", &pyquant::set_parallel_thresholds, py::arg("enabled"),
        "Benchmarks only: False runs every region on get_num_threads() threads, however small.");
  m.def("_parallel_thresholds", &pyquant::parallel_thresholds);
  m.def("_threads_for", &pyquant::threads_for, py::arg("work"), py::arg("min_work"),
        "The threads a region of `work` units with threshold `min_work` runs on (for tests).");

  constexpr pyquant::Isa kLevels[] = {pyquant::Isa::Avx512, pyquant::Isa::Avx2, pyquant::Isa::Baseline};
  m.def("supported_isas", [kLevels] {
    std::vector<std::string> names;
    for (pyquant::Isa isa : kLevels)
      if (pyquant::isa_supported(isa)) names.push_back(pyquant::isa_name(isa));
    return names;
  }, "The ISA levels this CPU runs, best first.");
  m.def("isa", [] { return std::string(pyquant::isa_name(pyquant::active_isa())); },
        "The ISA level whose copies of the hot kernels run.");
  m.def("set_isa", [kLevels](const std::string& name) {
    for (pyquant::Isa isa : kLevels) {
      if (name != pyquant::isa_name(isa)) continue;
      if (!pyquant::isa_supported(isa))
        throw py::value_error("this CPU does not support the ISA level " + name + " (best: " +
                              pyquant::isa_name(pyquant::best_isa()) + ")");
      pyquant::set_active_isa(isa);
      return;
    }
    throw py::value_error("unknown ISA level '" + name + "': expected avx512, avx2 or baseline");
  }, py::arg("name"), "Run the copies of the hot kernels compiled for this level (process-wide).");

  py::class_<pyquant::RangeStats>(m, "RangeStats")
      .def_readonly("finite", &pyquant::RangeStats::finite)
      .def_readonly("nan", &pyquant::RangeStats::nan)
      .def_readonly("pos_inf", &pyquant::RangeStats::pos_inf)
      .def_readonly("neg_inf", &pyquant::RangeStats::neg_inf)
      .def_readonly("min", &pyquant::RangeStats::min)
      .def_readonly("max", &pyquant::RangeStats::max)
      .def("__repr__", [](const pyquant::RangeStats& s) {
        return "RangeStats(finite=" + std::to_string(s.finite) + ", nan=" + std::to_string(s.nan) +
               ", pos_inf=" + std::to_string(s.pos_inf) + ", neg_inf=" + std::to_string(s.neg_inf) +
               ", min=" + std::to_string(s.min) + ", max=" + std::to_string(s.max) + ")";
      });

  m.attr("MAX_BINS") = kMaxBins;

  py::class_<CheckedAccumulate>(m, "CheckedAccumulate")
      .def_readonly("added", &CheckedAccumulate::added, "False: hist unchanged (a value was non-finite or outside)")
      .def_readonly("stats", &CheckedAccumulate::stats);

  m.def("range_stats", [](const py::array& x) {
    const Real type = real_type(x, "x", "range_stats");
    const void* p = x.data();
    const int64_t n = x.size();
    py::gil_scoped_release release;
    return type == Real::F32 ? pyquant::range_stats(f32(p), n) : pyquant::range_stats(f64(p), n);
  }, py::arg("x"), "Finite min/max and NaN/Inf counts of a float32 or float64 tensor of any shape.");

  m.def("histogram_accumulate", [](const py::array& x, py::array& hist, double lo, double hi) {
    const HistogramArgs a = histogram_args(x, hist, lo, hi, "histogram_accumulate");
    py::gil_scoped_release release;
    if (a.type == Real::F32) pyquant::histogram_accumulate(f32(a.x), a.n, lo, hi, a.hist, a.nbins);
    else pyquant::histogram_accumulate(f64(a.x), a.n, lo, hi, a.hist, a.nbins);
  }, py::arg("x"), py::arg("hist"), py::arg("lo"), py::arg("hi"),
     "Add the finite values of x to hist (equal bins over [lo, hi], clamped at the ends).");

  m.def("histogram_accumulate_if_in_range", [](const py::array& x, py::array& hist, double lo, double hi) {
    const HistogramArgs a = histogram_args(x, hist, lo, hi, "histogram_accumulate_if_in_range");
    pyquant::RangeStats stats;
    bool added;
    {
      py::gil_scoped_release release;
      added = a.type == Real::F32
                  ? pyquant::histogram_accumulate_if_in_range(f32(a.x), a.n, lo, hi, a.hist, a.nbins, &stats)
                  : pyquant::histogram_accumulate_if_in_range(f64(a.x), a.n, lo, hi, a.hist, a.nbins, &stats);
    }
    return CheckedAccumulate{added, stats};
  }, py::arg("x"), py::arg("hist"), py::arg("lo"), py::arg("hi"),
     "One pass: RangeStats of x, and x added to hist only if all finite and inside [lo, hi]. "
     "Returns CheckedAccumulate(added, stats).");

  m.def("channel_sums", [](const py::array& x, py::array& sums) {
    const Real type = real_type(x, "x", "channel_sums");
    if (x.ndim() != 3) throw py::value_error("x must be 3-D [outer, channels, inner], got shape " + shape_of(x));
    require<double>(sums, "sums", "float64", 1, true);
    if (sums.shape(0) != x.shape(1))
      throw py::value_error("sums must have x.shape[1] = " + std::to_string(x.shape(1)) +
                            " entries, got " + shape_of(sums));
    const void* px = x.data();
    double* ps = static_cast<double*>(sums.mutable_data());
    const int64_t outer = x.shape(0), channels = x.shape(1), inner = x.shape(2);
    py::gil_scoped_release release;
    if (type == Real::F32) pyquant::channel_sums(f32(px), outer, channels, inner, ps);
    else pyquant::channel_sums(f64(px), outer, channels, inner, ps);
  }, py::arg("x"), py::arg("sums"), "sums[c] += x[:, c, :].sum() for x viewed as [outer, channels, inner].");

  m.def("channel_abs_max", [](const py::array& w, py::array& out) {
    require<float>(w, "w", "float32", 4);
    require<float>(out, "out", "float32", 1, true);
    if (out.shape(0) != w.shape(0) * w.shape(2))
      throw py::value_error("out must have w.shape[0] * w.shape[2] entries, got " + shape_of(out) +
                            " for w " + shape_of(w));
    const float* pw = static_cast<const float*>(w.data());
    float* po = static_cast<float*>(out.mutable_data());
    const int64_t A = w.shape(0), B = w.shape(1), C = w.shape(2), D = w.shape(3);
    py::gil_scoped_release release;
    pyquant::channel_abs_max(pw, A, B, C, D, po);
  }, py::arg("w"), py::arg("out"), "out[a*C + c] = max |w[a, :, c, :]| for w of shape [A, B, C, D].");

  m.def("equalization_scales", [](const py::array& r1, const py::array& r2, const std::optional<py::array>& act,
                                  double act_weight, double max_scale, py::array& out) {
    require<double>(r1, "r1", "float64", 1);
    require<double>(r2, "r2", "float64", 1);
    require<float>(out, "out", "float32", 1, true);
    if (r2.shape(0) != r1.shape(0) || out.shape(0) != r1.shape(0))
      throw py::value_error("r1, r2 and out must have the same length, got " + shape_of(r1) + ", " +
                            shape_of(r2) + ", " + shape_of(out));
    const double* pa = nullptr;
    if (act) {
      require<double>(*act, "act", "float64", 1);
      if (act->shape(0) != r1.shape(0))
        throw py::value_error("act must have the length of r1, got " + shape_of(*act) + " and " + shape_of(r1));
      pa = static_cast<const double*>(act->data());
    }
    if (!(act_weight >= 0.0 && act_weight <= 1.0)) throw py::value_error("act_weight must be in [0, 1]");
    if (!(max_scale >= 1.0)) throw py::value_error("max_scale must be at least 1");
    const double* p1 = static_cast<const double*>(r1.data());
    const double* p2 = static_cast<const double*>(r2.data());
    float* po = static_cast<float*>(out.mutable_data());
    const int64_t n = r1.shape(0);
    py::gil_scoped_release release;
    pyquant::equalization_scales(p1, p2, pa, act_weight, n, max_scale, po);
  }, py::arg("r1"), py::arg("r2"), py::arg("act"), py::arg("act_weight"), py::arg("max_scale"), py::arg("out"),
     "Equalizing scales sqrt(e / r2), e = r1^(1-b) (rho act)^b (e = r1 without act), 1 where a range is 0, "
     "clamped to [1/max_scale, max_scale].");

  m.def("scale_channels", [](py::array& w, const py::array& s, bool divide) {
    require<float>(w, "w", "float32", 4, true);
    require<float>(s, "s", "float32", 1);
    if (s.shape(0) != w.shape(0) * w.shape(2))
      throw py::value_error("s must have w.shape[0] * w.shape[2] entries, got " + shape_of(s) + " for w " +
                            shape_of(w));
    float* pw = static_cast<float*>(w.mutable_data());
    const float* ps = static_cast<const float*>(s.data());
    const int64_t A = w.shape(0), B = w.shape(1), C = w.shape(2), D = w.shape(3);
    py::gil_scoped_release release;
    pyquant::scale_channels(pw, A, B, C, D, ps, divide);
  }, py::arg("w"), py::arg("s"), py::arg("divide"), "w[a, :, c, :] *= s[a*C + c] (/= if divide), in place.");

  m.def("histogram_rebin", [](const py::array& src, double src_lo, double src_hi,
                              py::array& dst, double dst_lo, double dst_hi) {
    require<double>(src, "src", "float64", 1);
    require<double>(dst, "dst", "float64", 1, true);
    require_nonempty(src, "src");
    require_nonempty(dst, "dst");
    require_range(src_lo, src_hi, "source");
    require_range(dst_lo, dst_hi, "destination");
    const double* ps = static_cast<const double*>(src.data());
    double* pd = static_cast<double*>(dst.mutable_data());
    const int64_t ns = src.size(), nd = dst.size();
    py::gil_scoped_release release;
    pyquant::histogram_rebin(ps, ns, src_lo, src_hi, pd, nd, dst_lo, dst_hi);
  }, py::arg("src"), py::arg("src_lo"), py::arg("src_hi"), py::arg("dst"), py::arg("dst_lo"),
     py::arg("dst_hi"), "Re-bin src onto dst's grid (uniform density within a bin); dst is overwritten.");

  m.def("histogram_quant_errors", [](const py::array& hist, double lo, double hi,
                                     const py::array& scales, const py::array& zero_points,
                                     double qmin, double qmax, py::array& out) {
    require<double>(hist, "hist", "float64", 1);
    require<double>(scales, "scales", "float64", 1);
    require<double>(zero_points, "zero_points", "float64", 1);
    require<double>(out, "out", "float64", 1, true);
    require_nonempty(hist, "hist");
    require_range(lo, hi, "histogram");
    if (zero_points.size() != scales.size() || out.size() != scales.size())
      throw py::value_error("scales, zero_points and out must have the same length, got " +
                            shape_of(scales) + ", " + shape_of(zero_points) + ", " + shape_of(out));
    if (!(qmax > qmin)) throw py::value_error("qmax must be greater than qmin");
    const double* ps = static_cast<const double*>(scales.data());
    for (py::ssize_t k = 0; k < scales.size(); ++k)
      if (!(ps[k] > 0) || !std::isfinite(ps[k]))
        throw py::value_error("scales must be finite and positive, got " + std::to_string(ps[k]));
    const double* ph = static_cast<const double*>(hist.data());
    const double* pz = static_cast<const double*>(zero_points.data());
    double* po = static_cast<double*>(out.mutable_data());
    const int64_t nbins = hist.size(), ncand = scales.size();
    py::gil_scoped_release release;
    pyquant::histogram_quant_errors(ph, nbins, lo, hi, ps, pz, ncand, qmin, qmax, po);
  }, py::arg("hist"), py::arg("lo"), py::arg("hi"), py::arg("scales"), py::arg("zero_points"),
     py::arg("qmin"), py::arg("qmax"), py::arg("out"),
     "Total squared quantization error of the histogram for each (scale, zero point) candidate.");

  m.def("tensor_quant_errors", [](const py::array& x, const py::array& scales,
                                  const py::array& zero_points, double qmin, double qmax,
                                  py::array& out) {
    const Real type = real_type(x, "x", "tensor_quant_errors");
    if (x.ndim() != 2) throw py::value_error("x must be 2-D [rows, cols], got shape " + shape_of(x));
    require<double>(scales, "scales", "float64", 2);
    require<double>(zero_points, "zero_points", "float64", 2);
    require<double>(out, "out", "float64", 2, true);
    if (scales.shape(0) != x.shape(0) || zero_points.shape(0) != x.shape(0) ||
        zero_points.shape(1) != scales.shape(1) || out.shape(0) != x.shape(0) ||
        out.shape(1) != scales.shape(1))
      throw py::value_error("scales, zero_points and out must be [rows, ncand] with rows = x.shape[0]; got x " +
                            shape_of(x) + ", scales " + shape_of(scales) + ", zero_points " +
                            shape_of(zero_points) + ", out " + shape_of(out));
    if (!(qmax > qmin)) throw py::value_error("qmax must be greater than qmin");
    const double* ps = static_cast<const double*>(scales.data());
    for (py::ssize_t k = 0; k < scales.size(); ++k)
      if (!(ps[k] > 0) || !std::isfinite(ps[k]))
        throw py::value_error("scales must be finite and positive, got " + std::to_string(ps[k]));
    const void* px = x.data();
    const double* pz = static_cast<const double*>(zero_points.data());
    double* po = static_cast<double*>(out.mutable_data());
    const int64_t rows = x.shape(0), cols = x.shape(1), ncand = scales.shape(1);
    py::gil_scoped_release release;
    if (type == Real::F32) pyquant::tensor_quant_errors(f32(px), rows, cols, ps, pz, ncand, qmin, qmax, po);
    else pyquant::tensor_quant_errors(f64(px), rows, cols, ps, pz, ncand, qmin, qmax, po);
  }, py::arg("x"), py::arg("scales"), py::arg("zero_points"), py::arg("qmin"), py::arg("qmax"),
     py::arg("out"), "Exact squared error of quantizing each row of x with each of its candidates.");

  m.def("histogram_quantiles", [](const py::array& hist, double lo, double hi, const py::array& qs,
                                  py::array& out) {
    require<double>(hist, "hist", "float64", 1);
    require<double>(qs, "qs", "float64", 1);
    require<double>(out, "out", "float64", 1, true);
    require_nonempty(hist, "hist");
    require_range(lo, hi, "histogram");
    if (out.size() != qs.size())
      throw py::value_error("out must have the length of qs, got " + shape_of(out) + " and " + shape_of(qs));
    const double* pq = static_cast<const double*>(qs.data());
    for (py::ssize_t k = 0; k < qs.size(); ++k)
      if (!(pq[k] >= 0.0 && pq[k] <= 1.0))
        throw py::value_error("quantiles must lie in [0, 1], got " + std::to_string(pq[k]));
    const double* ph = static_cast<const double*>(hist.data());
    double* po = static_cast<double*>(out.mutable_data());
    const int64_t nbins = hist.size(), nq = qs.size();
    py::gil_scoped_release release;
    pyquant::histogram_quantiles(ph, nbins, lo, hi, pq, nq, po);
  }, py::arg("hist"), py::arg("lo"), py::arg("hi"), py::arg("qs"), py::arg("out"),
     "Values below which the fractions qs of the histogram's mass lie.");

  m.def("histogram_entropy_threshold", [](const py::array& abs_hist, double hi, int64_t num_quant_bins) {
    require<double>(abs_hist, "abs_hist", "float64", 1);
    require_nonempty(abs_hist, "abs_hist");
    if (num_quant_bins < 1 || num_quant_bins > abs_hist.size())
      throw py::value_error("num_quant_bins must be in [1, len(abs_hist)] = [1, " +
                            std::to_string(abs_hist.size()) + "], got " + std::to_string(num_quant_bins));
    if (!(hi > 0) || !std::isfinite(hi)) throw py::value_error("hi must be finite and positive");
    const double* ph = static_cast<const double*>(abs_hist.data());
    const int64_t nbins = abs_hist.size();
    py::gil_scoped_release release;
    return pyquant::histogram_entropy_threshold(ph, nbins, hi, num_quant_bins);
  }, py::arg("abs_hist"), py::arg("hi"), py::arg("num_quant_bins"),
     "KL-divergence (entropy) clipping threshold of a histogram of |x| over [0, hi].");

  py::enum_<pyquant::RoundingAlgorithm>(m, "RoundingAlgorithm",
                                        "How fit_rounding learns the integer weights (csrc/kernels/rounding.h).")
      .value("AdaRound", pyquant::RoundingAlgorithm::AdaRound, "Nagel et al. 2020: learned rounding up or down.")
      .value("AdaQuant", pyquant::RoundingAlgorithm::AdaQuant, "Hubara et al. 2021: learned float weights.");

  const pyquant::RoundingOptions defaults;
  py::class_<pyquant::RoundingOptions>(m, "RoundingOptions",
                                       "The settings of fit_rounding's loop (csrc/kernels/rounding.h); immutable.")
      .def(py::init([](pyquant::RoundingAlgorithm algorithm, int64_t iterations, double learning_rate,
                       double reg_param, double beta_start, double beta_end, double warm_start, bool keep_best) {
             if (algorithm != pyquant::RoundingAlgorithm::AdaRound && algorithm != pyquant::RoundingAlgorithm::AdaQuant)
               throw py::value_error("algorithm must be RoundingAlgorithm.AdaRound or RoundingAlgorithm.AdaQuant");
             if (iterations < 0) throw py::value_error("iterations must be >= 0, got " + std::to_string(iterations));
             if (!(learning_rate > 0.0) || !std::isfinite(learning_rate))
               throw py::value_error("learning_rate must be finite and > 0, got " + str(learning_rate));
             if (!(reg_param >= 0.0) || !std::isfinite(reg_param))
               throw py::value_error("reg_param must be finite and >= 0, got " + str(reg_param));
             if (!std::isfinite(beta_start) || !std::isfinite(beta_end))
               throw py::value_error("beta_start and beta_end must be finite, got " + str(beta_start) + ", " +
                                     str(beta_end));
             if (!(warm_start >= 0.0 && warm_start < 1.0))
               throw py::value_error("warm_start must be in [0, 1), got " + str(warm_start));
             pyquant::RoundingOptions o;
             o.algorithm = algorithm;
             o.iterations = iterations;
             o.learning_rate = float(learning_rate);
             o.reg_param = float(reg_param);
             o.beta_start = float(beta_start);
             o.beta_end = float(beta_end);
             o.warm_start = warm_start;
             o.keep_best = keep_best;
             return o;
           }),
           py::kw_only(), py::arg("algorithm") = defaults.algorithm, py::arg("iterations") = defaults.iterations,
           py::arg("learning_rate") = defaults.learning_rate, py::arg("reg_param") = defaults.reg_param,
           py::arg("beta_start") = defaults.beta_start, py::arg("beta_end") = defaults.beta_end,
           py::arg("warm_start") = defaults.warm_start, py::arg("keep_best") = defaults.keep_best)
      .def_readonly("algorithm", &pyquant::RoundingOptions::algorithm)
      .def_readonly("iterations", &pyquant::RoundingOptions::iterations)
      .def_readonly("learning_rate", &pyquant::RoundingOptions::learning_rate)
      .def_readonly("reg_param", &pyquant::RoundingOptions::reg_param)
      .def_readonly("beta_start", &pyquant::RoundingOptions::beta_start)
      .def_readonly("beta_end", &pyquant::RoundingOptions::beta_end)
      .def_readonly("warm_start", &pyquant::RoundingOptions::warm_start)
      .def_readonly("keep_best", &pyquant::RoundingOptions::keep_best)
      .def("__repr__", [](const pyquant::RoundingOptions& o) {
        return std::string("RoundingOptions(algorithm=") +
               (o.algorithm == pyquant::RoundingAlgorithm::AdaRound ? "AdaRound" : "AdaQuant") +
               ", iterations=" + std::to_string(o.iterations) + ", learning_rate=" + str(o.learning_rate) +
               ", reg_param=" + str(o.reg_param) + ", beta_start=" + str(o.beta_start) + ", beta_end=" +
               str(o.beta_end) + ", warm_start=" + str(o.warm_start) + ", keep_best=" +
               (o.keep_best ? "True" : "False") + ")";
      });

  m.def("fit_rounding", [](const py::array& weight, const py::array& scale, const py::array& gram,
                           const py::array& target, int qmin, int qmax, const pyquant::RoundingOptions& options,
                           py::array& out, std::optional<py::array> param_out) {
    require<float>(weight, "weight", "float32", 3);
    require<float>(scale, "scale", "float32", 2);
    require<float>(gram, "gram", "float32", 3);
    require<float>(target, "target", "float32", 3);
    require<int8_t>(out, "out", "int8", 3, true);
    const int64_t groups = weight.shape(0), rows = weight.shape(1), k = weight.shape(2);
    const std::string want = "(" + std::to_string(groups) + ", " + std::to_string(rows) + ", " + std::to_string(k) + ")";
    if (scale.shape(0) != groups || scale.shape(1) != rows)
      throw py::value_error("scale must have shape (groups, rows) of weight " + want + ", got " + shape_of(scale));
    if (gram.shape(0) != groups || gram.shape(1) != k || gram.shape(2) != k)
      throw py::value_error("gram must have shape (groups, k, k) for weight " + want + ", got " + shape_of(gram));
    if (target.shape(0) != groups || target.shape(1) != rows || target.shape(2) != k)
      throw py::value_error("target must have the shape of weight " + want + ", got " + shape_of(target));
    if (out.shape(0) != groups || out.shape(1) != rows || out.shape(2) != k)
      throw py::value_error("out must have the shape of weight " + want + ", got " + shape_of(out));
    float* pp = nullptr;
    if (param_out) {
      require<float>(*param_out, "param_out", "float32", 3, true);
      if (param_out->shape(0) != groups || param_out->shape(1) != rows || param_out->shape(2) != k)
        throw py::value_error("param_out must have the shape of weight " + want + ", got " + shape_of(*param_out));
      pp = static_cast<float*>(param_out->mutable_data());
    }
    if (qmin < -128 || qmax > 127 || qmin >= qmax)
      throw py::value_error("need -128 <= qmin < qmax <= 127, got [" + std::to_string(qmin) + ", " + std::to_string(qmax) + "]");
    const float* ps = static_cast<const float*>(scale.data());
    for (int64_t i = 0; i < scale.size(); ++i)
      if (!(ps[i] > 0.0f) || !std::isfinite(ps[i])) throw py::value_error("scale must be finite and > 0");
    const float* pw = static_cast<const float*>(weight.data());
    const float* pg = static_cast<const float*>(gram.data());
    const float* pt = static_cast<const float*>(target.data());
    int8_t* po = static_cast<int8_t*>(out.mutable_data());
    const pyquant::RoundingOptions o = options;  // a copy the kernel owns while the GIL is released
    py::gil_scoped_release release;
    pyquant::fit_rounding(pw, ps, pg, pt, groups, rows, k, qmin, qmax, o, po, pp);
  }, py::arg("weight"), py::arg("scale"), py::arg("gram"), py::arg("target"), py::arg("qmin"), py::arg("qmax"),
     py::arg("options"), py::arg("out"), py::arg("param_out") = py::none(),
     "Learned integer weights of a layer in Gram form (AdaRound / AdaQuant); see csrc/kernels/rounding.h.");

  m.def("gram_product", [](const py::array& x, const py::array& gram, py::array& out) {
    require<float>(x, "x", "float32", 2);
    require<float>(gram, "gram", "float32", 2);
    require<float>(out, "out", "float32", 2, true);
    const int64_t rows = x.shape(0), k = x.shape(1);
    if (gram.shape(0) != k || gram.shape(1) != k)
      throw py::value_error("gram must be (k, k) with k = x.shape[1] = " + std::to_string(k) + ", got " + shape_of(gram));
    if (out.shape(0) != rows || out.shape(1) != k)
      throw py::value_error("out must have the shape of x " + shape_of(x) + ", got " + shape_of(out));
    const float* px = static_cast<const float*>(x.data());
    const float* pg = static_cast<const float*>(gram.data());
    float* po = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    pyquant::gram_product(px, pg, rows, k, po);
  }, py::arg("x"), py::arg("gram"), py::arg("out"), "out = x @ gram (the product inside fit_rounding).");

  m.def("gram_product_update", [](const py::array& x_prev, const py::array& x, const py::array& gram, py::array& g) {
    require<float>(x_prev, "x_prev", "float32", 2);
    require<float>(x, "x", "float32", 2);
    require<float>(gram, "gram", "float32", 2);
    require<float>(g, "g", "float32", 2, true);
    const int64_t rows = x.shape(0), k = x.shape(1);
    if (x_prev.shape(0) != rows || x_prev.shape(1) != k)
      throw py::value_error("x_prev must have the shape of x " + shape_of(x) + ", got " + shape_of(x_prev));
    if (gram.shape(0) != k || gram.shape(1) != k)
      throw py::value_error("gram must be (k, k) with k = x.shape[1] = " + std::to_string(k) + ", got " + shape_of(gram));
    if (g.shape(0) != rows || g.shape(1) != k)
      throw py::value_error("g must have the shape of x " + shape_of(x) + ", got " + shape_of(g));
    const float* pp = static_cast<const float*>(x_prev.data());
    const float* px = static_cast<const float*>(x.data());
    const float* pg = static_cast<const float*>(gram.data());
    float* po = static_cast<float*>(g.mutable_data());
    py::gil_scoped_release release;
    pyquant::gram_product_update(pp, px, pg, rows, k, po);
  }, py::arg("x_prev"), py::arg("x"), py::arg("gram"), py::arg("g"),
     "g += (x - x_prev) @ gram over the changed entries (fit_rounding's incremental product).");

  m.def("window_gram", [](const py::array& q, py::object f_or_none, int64_t groups, std::vector<int64_t> kernel,
                          std::vector<int64_t> strides, std::vector<int64_t> dilations, std::vector<int64_t> pads,
                          py::array& qq, py::array& qf, py::array& ff, py::array& sum_q, py::array& sum_f) {
    require<float>(q, "q", "float32", 4);
    const float* pf = nullptr;
    if (!f_or_none.is_none()) {
      py::array f = f_or_none.cast<py::array>();
      require<float>(f, "f", "float32", 4);
      if (!std::equal(q.shape(), q.shape() + 4, f.shape()))
        throw py::value_error("q and f must have the same shape, got " + shape_of(q) + " and " + shape_of(f));
      pf = static_cast<const float*>(f.data());
    }
    if (kernel.size() != 2 || strides.size() != 2 || dilations.size() != 2 || pads.size() != 4)
      throw py::value_error("kernel, strides, dilations must have 2 values and pads 4 (top, left, bottom, right)");
    const int64_t n = q.shape(0), c = q.shape(1), h = q.shape(2), w = q.shape(3);
    if (groups < 1 || c % groups) throw py::value_error("groups must divide the channels");
    for (int i = 0; i < 2; ++i)
      if (kernel[i] < 1 || strides[i] < 1 || dilations[i] < 1) throw py::value_error("kernel/strides/dilations must be >= 1");
    for (auto p : pads) if (p < 0) throw py::value_error("pads must be >= 0");
    pyquant::ConvGeometry g{kernel[0], kernel[1], strides[0], strides[1], dilations[0], dilations[1], pads[0], pads[1], 0, 0};
    g.out_h = (h + pads[0] + pads[2] - (kernel[0] - 1) * dilations[0] - 1) / strides[0] + 1;
    g.out_w = (w + pads[1] + pads[3] - (kernel[1] - 1) * dilations[1] - 1) / strides[1] + 1;
    if (g.out_h < 1 || g.out_w < 1) throw py::value_error("the kernel does not fit the input " + shape_of(q));
    const int64_t K = c / groups * kernel[0] * kernel[1];
    const std::vector<py::ssize_t> gram_shape{groups, K, K}, sum_shape{groups, K};
    double* a1 = accumulator(qq, "qq", gram_shape);
    double* s1 = accumulator(sum_q, "sum_q", sum_shape);
    double *a2 = nullptr, *a3 = nullptr, *s2 = nullptr;
    if (pf) {
      a2 = accumulator(qf, "qf", gram_shape);
      a3 = accumulator(ff, "ff", gram_shape);
      s2 = accumulator(sum_f, "sum_f", sum_shape);
    } else {
      // Without f the kernel accumulates only qq and sum_q: the others must say so by being empty.
      for (auto [a, name] : {std::pair<py::array*, const char*>{&qf, "qf"}, {&ff, "ff"}, {&sum_f, "sum_f"}})
        if (a->size() != 0)
          throw py::value_error(std::string(name) + " must be empty when f is None (it is not accumulated), got shape " +
                                shape_of(*a));
    }
    const float* pq = static_cast<const float*>(q.data());
    py::gil_scoped_release release;
    pyquant::window_gram(pq, pf, n, c, h, w, groups, g, a1, a2, a3, s1, s2);
    return g.out_h * g.out_w * n;
  }, py::arg("q"), py::arg("f"), py::arg("groups"), py::arg("kernel"), py::arg("strides"), py::arg("dilations"),
     py::arg("pads"), py::arg("qq"), py::arg("qf"), py::arg("ff"), py::arg("sum_q"), py::arg("sum_f"),
     "Accumulate the Gram matrices of convolution patches of q and f (see csrc/kernels/window_gram.h); "
     "returns the number of patches added per group.");
}
