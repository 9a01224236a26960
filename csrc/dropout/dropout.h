// Dropout: the mask convention shared by the CPU and CUDA kernels, and the host-side op bodies
// that both backends reuse.
//
// The mask. A call is identified by two 64-bit words, (seed, offset), where offset counts 32-bit
// Philox words the way torch's CUDA generator does (always a multiple of 4). The kernels treat the
// tensor as a dense buffer in memory order; element i of that buffer belongs to group g = i / 4 and
// uses lane i % 4 of Philox4x32-10(counter = (offset / 4, g), key = seed), with each 64-bit value
// split low word first. That is the word curand would give thread g after
// curand_init(seed, g, offset), so a call covers exactly the generator range it reserved.
// The element is kept when its word is below keep_threshold(p), and is then multiplied by
// 1 / (1 - p); a dropped element is multiplied by 0, so NaN and inf propagate as they do in torch.
// The backward pass regenerates the same mask from the saved (seed, offset): 16 bytes in all.
// p == 0 keeps every element without computing a word, and p == 1 none whatever the words: the
// generator is not touched and the recorded state is (0, 0), as torch's shortcuts draw nothing
// there. p == 0 is how the fused ops do their eval-mode sums in one pass.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/philox.h"

namespace modekernels::dropout {

MK_HOST_DEVICE Philox4x32 group_bits(uint64_t seed, uint64_t offset, uint64_t group) {
  const uint64_t block = offset / 4;
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The factor an element is multiplied by: `scale` if kept, 0 if dropped.
template <typename opmath_t>
MK_HOST_DEVICE opmath_t multiplier(uint32_t bits, uint32_t threshold, opmath_t scale) {
  return bits < threshold ? scale : opmath_t(0);
}

// P(word < threshold) = threshold / 2^32 = 1 - p, to within 2^-32.
inline uint32_t keep_threshold(double p) {
  const double t = std::floor((1.0 - p) * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// 1 / (1 - p) as torch forms it: the keep probability rounded to the opmath type T and divided
// there (a float32 quotient, not a rounded float64 one, which differs for about a quarter of all
// p); 0 when p == 1 (nothing is kept, and no inf is ever formed).
template <typename T>
T keep_scale(double p) {
  return p < 1.0 ? T(1) / static_cast<T>(1.0 - p) : T(0);
}

}  // namespace modekernels::dropout

#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace modekernels::dropout {

// What the fused variants add to the kernel, all optional:
//     dst[i] = (src[i] + bias[i % H]) * mask(unit(i)) / (1 - p) + residual[i]
// with H = bias.numel(). unit(i) = i for elementwise dropout; channel-wise (feature) dropout draws
// one mask per (n, c): unit(i) = i / S over (N, C, S) memory, or n * C + c over channels-last
// (N, S, C) memory (channels_last_C = C).
struct Fusion {
  at::Tensor residual;  // dense, with the strides of src
  at::Tensor bias;      // contiguous 1-D; src contiguous
  int64_t channel_S = 0;  // > 0: channel-wise, S elements per (n, c)
  int64_t channels_last_C = 0;  // > 0: channel-wise over channels-last memory with C channels
};

// A backend's kernel: dst = src * mask * scale (plus the Fusion terms) over dense buffers with
// equal strides. `state` is an int64[2] tensor on the same device holding (seed, offset). With
// draw == true the kernel takes a fresh (seed, offset) from the generator and writes it into
// `state`; otherwise it reads them from `state`. It does nothing else: the op bodies check and
// allocate.
using Apply = void (*)(const at::Tensor& src, const at::Tensor& dst, double p,
                       const std::optional<at::Generator>& generator, const at::Tensor& state,
                       bool draw, const Fusion& fusion);

using OptGenerator = std::optional<at::Generator>;

// The op bodies, written once: every check runs before anything is allocated or written.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, double p,
                                           const OptGenerator& generator, Apply apply);
at::Tensor forward_(at::Tensor& input, double p, const OptGenerator& generator, Apply apply);
at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& state, double p, Apply apply);
std::tuple<at::Tensor, at::Tensor> add(const at::Tensor& input, const at::Tensor& residual,
                                       double p, const OptGenerator& generator, Apply apply);
std::tuple<at::Tensor, at::Tensor> bias_add(const at::Tensor& input, const at::Tensor& bias,
                                            const at::Tensor& residual, double p,
                                            const OptGenerator& generator, Apply apply);
std::tuple<at::Tensor, at::Tensor> feature(const at::Tensor& input, double p,
                                           const OptGenerator& generator, Apply apply);
at::Tensor feature_(at::Tensor& input, double p, const OptGenerator& generator, Apply apply);
at::Tensor feature_backward(const at::Tensor& grad_output, const at::Tensor& state, double p,
                            Apply apply);

// The schema-typed entry points a backend registers with TORCH_LIBRARY_IMPL.
template <Apply apply>
struct Ops {
  static std::tuple<at::Tensor, at::Tensor> dropout(const at::Tensor& input, double p,
                                                    const OptGenerator& generator) {
    return forward(input, p, generator, apply);
  }
  static at::Tensor dropout_(at::Tensor& input, double p, const OptGenerator& generator) {
    return forward_(input, p, generator, apply);
  }
  static at::Tensor dropout_backward(const at::Tensor& grad_output, const at::Tensor& state,
                                     double p) {
    return backward(grad_output, state, p, apply);
  }
  static std::tuple<at::Tensor, at::Tensor> dropout_add(const at::Tensor& input,
                                                        const at::Tensor& residual, double p,
                                                        const OptGenerator& generator) {
    return add(input, residual, p, generator, apply);
  }
  static std::tuple<at::Tensor, at::Tensor> bias_dropout_add(const at::Tensor& input,
                                                             const at::Tensor& bias,
                                                             const at::Tensor& residual, double p,
                                                             const OptGenerator& generator) {
    return bias_add(input, bias, residual, p, generator, apply);
  }
  static std::tuple<at::Tensor, at::Tensor> feature_dropout(const at::Tensor& input, double p,
                                                            const OptGenerator& generator) {
    return feature(input, p, generator, apply);
  }
  static at::Tensor feature_dropout_(at::Tensor& input, double p, const OptGenerator& generator) {
    return feature_(input, p, generator, apply);
  }
  static at::Tensor feature_dropout_backward(const at::Tensor& grad_output,
                                             const at::Tensor& state, double p) {
    return feature_backward(grad_output, state, p, apply);
  }

  static void register_all(torch::Library& m) {
    m.impl("dropout", &dropout);
    m.impl("dropout_", &dropout_);
    m.impl("dropout_backward", &dropout_backward);
    m.impl("dropout_add", &dropout_add);
    m.impl("bias_dropout_add", &bias_dropout_add);
    m.impl("feature_dropout", &feature_dropout);
    m.impl("feature_dropout_", &feature_dropout_);
    m.impl("feature_dropout_backward", &feature_dropout_backward);
  }
};

}  // namespace modekernels::dropout
