"""jint4: train Transformers with 4-bit integer matmuls in JAX / Flax.

Implements Xi, Li, Chen, Zhu, "Training Transformers with 4-bit Integers"
(NeurIPS 2023): a Hadamard quantizer with learned step sizes in the forward
pass, bit splitting and leverage score sampling in the backward pass.

The public surface is this module's ``__all__``; the quantizers themselves
(LSQ, the block Hadamard transform, bit splitting, leverage score sampling
and the baselines) are `jint4.quant`, for research use.
"""

from jint4 import optim
from jint4 import quant
from jint4.config import Int4Config
from jint4.diagnosis import EstimatorStats
from jint4.diagnosis import LayerDiagnosis
from jint4.diagnosis import diagnose
from jint4.diagnosis import format_diagnosis
from jint4.diagnosis import plot_diagnosis
from jint4.kernels import engine_info
from jint4.matmul import backward_mode
from jint4.matmul import int4_dot_general
from jint4.matmul import int4_matmul
from jint4.nn.calibrate import calibrate
from jint4.nn.dot_general import Int4DotGeneral
from jint4.nn.dot_general import Int4NnxDotGeneral
from jint4.nn.int4ify import Int4Model
from jint4.nn.int4ify import int4ify
from jint4.nn.int4ify import int4ify_report
from jint4.nn.report import LayerReport
from jint4.optim import relative_step_sizes
from jint4.nn.linen import Int4Dense
from jint4.nn.nnx import Int4Linear
from jint4.nn.nnx import QuantState
from jint4.quant_init import QuantInit
from jint4.quant_init import init_step_sizes

__version__ = "0.1.0"

__all__ = [
    "EstimatorStats",
    "Int4Config",
    "Int4Dense",
    "Int4DotGeneral",
    "Int4Linear",
    "Int4Model",
    "LayerDiagnosis",
    "LayerReport",
    "Int4NnxDotGeneral",
    "QuantInit",
    "QuantState",
    "backward_mode",
    "calibrate",
    "diagnose",
    "engine_info",
    "format_diagnosis",
    "init_step_sizes",
    "int4_dot_general",
    "int4_matmul",
    "int4ify",
    "int4ify_report",
    "plot_diagnosis",
    "quant",
    "relative_step_sizes",
]
