"""The BERT matcher's old home, kept so imports keep working: graph queries live in graph.py, the
building blocks and records in patterns/, the post-LN BERT layer in patterns/bert_post_ln.py."""
from __future__ import annotations

from .graph import (GEMM_OPS, LAYOUT_OPS, MOVE_OPS, POINTWISE_OPS, RESHAPE_OPS, float_source,  # noqa: F401
                    is_bmm, is_channel_scale, is_dequantized, is_nan_guard, origin, reaches_bmm, up, uses,
                    weight_of)
from .patterns import match_encoder  # noqa: F401
from .patterns.blocks import Walk, linear_at, linear_producing, match_activation, match_layer_norm  # noqa: F401
from .patterns.records import (SITE_NAMES, Activation, Attention, EncoderLayer, EncoderMatch, Linear,  # noqa: F401
                               NoMatch, Norm, Rejection, Residual)
