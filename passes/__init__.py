"""qdqc passes, one module each; importing this package registers them all."""
from . import (canonicalize, drop_nan_guard, fold_output_scale, fold_weight_quantizers, insert_qdq, lower_onnxruntime,  # noqa: F401
               match_bert, place_quantizers, report_mha, residual_sum, smooth_gemm_inputs, split_gemm_bias,  # noqa: F401
               to_fp16)  # noqa: F401
