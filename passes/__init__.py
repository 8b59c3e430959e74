"""qdqc passes, one module each; importing this package registers them all."""
from . import canonicalize, insert_qdq, match_bert, place_quantizers, split_gemm_bias  # noqa: F401
