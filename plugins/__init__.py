"""Ops from outside the standard ONNX domain: `onnxruntime_fused` restates onnxruntime's com.microsoft
transformer ops in standard ONNX (the `decompose-fused` pass)."""
