"""The names of the measures a space is searched by, without importing JAX.

`space.search` ranks by them; the command line (`python -m embedspace.search`) lists them in its
flags' help, which must stay fast, so the names live apart from the code that computes them.
"""

MEASURES = ("hamming", "manhattan", "euclidean", "mahalanobis", "cosine", "negative_arc_length")
"""The measures of the founding note; `space.search.top_k` also takes `EXTRA_MEASURES`."""

EXTRA_MEASURES = ("sqeuclidean", "geodesic")
