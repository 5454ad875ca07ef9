// Learned rounding of a linear layer's weights (fast finetune), in Gram form.
//
// A layer maps each input patch x (K values: one im2col column of a Conv group, or one
// row of a Gemm/MatMul input) to outputs w_r . x. With the weight scale s_r fixed, the
// quantized layer uses w~_r = s_r * q_r (q_r integer). Over the calibration data the
// squared error of output r against the float layer fed with float inputs is
//   e_r(w~) = w~ A w~^T - 2 w~ . t_r + c_r,
//   A   = E[x_q x_q^T]          (inputs the quantized network really produces, centered)
//   t_r = E[x_q x_f^T] w_r^T    (cross term with the float inputs and float weights)
// so the data enter only through A and t, and every iteration costs O(rows * K^2)
// whatever the size of the calibration set. Rows are independent given A: each block
// of rows runs all its iterations alone (no synchronisation, so results do not depend on
// the number of threads). The loss of a layer is sum_r e_r (the reference's
// "squared Frobenius norm over channels, mean over positions") plus, for AdaRound,
// reg_param * sum(1 - |2h - 1|^beta).
#pragma once
#include <cstdint>

namespace pyquant {

enum class RoundingAlgorithm : int {
  // Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization":
  // q = floor(w/s) + h(V), h the rectified sigmoid, V learned with Adam, beta annealed
  // (cosine) from beta_start to beta_end after a warm start without regularisation,
  // then q = floor(w/s) + [h(V) >= 0.5].
  AdaRound = 0,
  // Hubara et al. 2021, "Accurate Post Training Quantization With Small Calibration
  // Sets" (AdaQuant): the float weights u themselves are learned with Adam through
  // q = clip(round(u/s)) and a straight-through gradient; learning_rate in weight units.
  AdaQuant = 1,
};

struct RoundingOptions {
  RoundingAlgorithm algorithm = RoundingAlgorithm::AdaRound;
  int64_t iterations = 1000;
  float learning_rate = 0.1f;
  float reg_param = 0.01f;
  float beta_start = 20.0f;
  float beta_end = 2.0f;
  double warm_start = 0.2;  // fraction of the iterations without the rounding regulariser
  // Per row, return nearest rounding when it has the lower error e_r (the learned
  // rounding is never worse than the start on the objective).
  bool keep_best = true;
};

// Rounding-to-nearest ties-to-even, as QuantizeLinear does.
// weight [groups, rows, k], scale [groups * rows] (> 0), gram [groups, k, k] (symmetric),
// target [groups, rows, k]; out [groups, rows, k] integers in [qmin, qmax]; param_out
// (optional, [groups, rows, k]) receives the learned parameter V or u, for tests. Without it,
// AdaRound stops updating the entries that can no longer change (h saturated, Adam's momentum
// pointing outwards): the same out, less work.
void fit_rounding(const float* weight, const float* scale, const float* gram, const float* target,
                  int64_t groups, int64_t rows, int64_t k, int qmin, int qmax,
                  const RoundingOptions& options, int8_t* out, float* param_out = nullptr);

// out[rows, k] = x[rows, k] @ gram[k, k]: the product inside every iteration, exposed to be
// tested and benchmarked against numpy.
void gram_product(const float* x, const float* gram, int64_t rows, int64_t k, float* out);

// g[rows, k] += (x - x_prev)[rows, k] @ gram[k, k], adding gram's rows only for the entries
// where x differs from x_prev: the incremental product inside fit_rounding (whose saturated
// entries do not change), exposed to be tested against numpy. Each row's changes are
// summed in order of j, and the sum is added to g.
void gram_product_update(const float* x_prev, const float* x, const float* gram, int64_t rows, int64_t k,
                         float* g);

}  // namespace pyquant
