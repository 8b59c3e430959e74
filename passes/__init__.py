"""qdqc passes, one module each; importing this package registers them all."""
from . import (canonicalize, fold_weight_quantizers, insert_qdq, lower_onnxruntime, match_bert,  # noqa: F401
               place_quantizers, report_mha, smooth_gemm_inputs, split_gemm_bias, to_fp16)  # noqa: F401
