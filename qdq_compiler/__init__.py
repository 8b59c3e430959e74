"""qdqc: a graph-rewriting compiler from FP32 ONNX transformers to INT8 Q/DQ graphs."""

__version__ = "0.1.0"
