"""`"xla"`: the naive reference (`flashjax.reference`), which builds the whole (T, S) matrix.

Differentiated by plain autodiff. Never picked by `implementation=None`: O(T S) memory.
"""

from __future__ import annotations

from flashjax import reference
from flashjax.backends import Backend

BACKEND = Backend(
    name="xla",
    forward=reference.attention,
    backward=None,  # plain autodiff
    unsupported=lambda ops: None,
    platforms=(),
    description="the naive reference: the whole (T, S) score matrix, plain autodiff",
)
