"""qdqc: a graph-rewriting compiler from FP32 ONNX transformers to INT8 Q/DQ graphs.

The Python API (qdq_compiler/api.py):

    import qdq_compiler
    data = qdq_compiler.calibration_data(sentences, "path/to/hf-model-folder")
    result = qdq_compiler.compile("model.onnx", data)
    result.save("model.int8.onnx")
"""

__version__ = "0.1.0"

# api imports the submodules insert, calibrate, lower and analyze first; binding these names after
# that makes `qdq_compiler.insert` etc. the API functions (import machinery sets a package attribute
# only when it first loads a submodule; `from qdq_compiler.insert import ...` still finds the module).
from .api import Result, analyze, calibrate, calibration_data, compile, insert, lower, recommend  # noqa: E402
from .errors import ModelError, PassError, QdqcError, UsageError  # noqa: E402

__all__ = ["Result", "analyze", "calibrate", "calibration_data", "compile", "insert", "lower", "recommend",
           "QdqcError", "UsageError", "ModelError", "PassError"]
