"""qdqc passes, one module each; importing this package registers them all."""
from . import (canonicalize, clamp_attention_mask, decompose_fused, drop_nan_guard, floor_softmax_input,  # noqa: F401
               fold_constant_gemms, fold_output_scale,  # noqa: F401
               fold_weight_quantizers, insert_qdq,  # noqa: F401
               lower_onnxruntime, mask_key_columns, match_bert, pair_weight_rows, place_quantizers, record_plan,  # noqa: F401
               release_quantizers, report_mha, residual_sum, shift_into_layernorm,  # noqa: F401
               round_weights_gptq, smooth_attention_output, smooth_gemm_inputs, split_gemm_bias,
               split_outlier_channels, to_fp16,  # noqa: F401
               unsigned_linear_inputs)  # noqa: F401
from . import check_types, qat_constants, report_float_gemms, signed_zero_points  # noqa: F401
