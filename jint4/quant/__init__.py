"""The quantizers of the paper, as pure functions: no Flax, no engines.

One quantizer per module, each with its math in the docstring:

  `lsq`       learned step size quantization (the forward's quantizer) and the
              5-bit residual its backward keeps
  `hadamard`  the block-diagonal Hadamard transform and the per-layer block search
  `bitsplit`  bit splitting of the output gradient into two INT4 halves
  `lss`       leverage score sampling with a fixed kept-row budget
  `luq`       the LUQ gradient quantizer (the paper's baseline)
  `minmax`    min/max uniform gradient quantization (the PTQ baseline)

For research: e.g. ``jint4.quant.lsq.fake_quantize(t, s)`` is LSQ with its
gradients for a tensor and its step; ``jint4.quant.lss.sample_rows`` draws
rows with the estimator `jint4.int4_matmul` uses.
"""

from jint4.quant import bitsplit
from jint4.quant import hadamard
from jint4.quant import lsq
from jint4.quant import lss
from jint4.quant import luq
from jint4.quant import minmax

__all__ = ["bitsplit", "hadamard", "lsq", "lss", "luq", "minmax"]
