"""Distance and similarity measures of an embedding space, and exact nearest neighbours.

Every measure is pairwise (`x: [n, d]`, `y: [m, d]` -> `[n, m]`) and written as one matrix product
plus cheap per-row terms (`|x - y|^2 = |x|^2 + |y|^2 - 2 x.y`, Hamming as a product of 0/1 codes),
accumulated in float32 at `Precision.HIGHEST`, so a block of neighbours costs one matmul. The
places where the textbook formula has an infinite derivative get a finite one: the square root of
the Euclidean distance at `x == y`, and `arccos` at identical and antipodal vectors for the geodesic
distance and negative arc length of Koishekenov et al. (2023), "Geometric Contrastive Learning".

The Mahalanobis distance (point to distribution) follows Lee et al. (2018), "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks": class means with one
shared (tied) covariance. Its sufficient statistics (per-class count and mean, and the pooled
within-class scatter about those means, as in Chan et al.'s parallel variance algorithm) merge
exactly across batches (`merge_stats`) and devices (`psum_stats`), and never subtract two large
raw moments, so a Gaussian is fitted over a whole dataset in one streaming pass. Scores use
triangular solves with the Cholesky factor, never an explicit inverse.

`top_k` finds exact nearest neighbours by scanning key blocks and merging a running top-k, so
memory is `O(n * (block_size + k))`, never the full `[n, N]` matrix.

Non-finite values. A row is finite when every coordinate is (`finite_rows`); NaN and +-inf count
alike, since an infinite embedding is an overflow, not a far point. No measure turns a non-finite
row into an answer that looks confident:
- every pairwise measure (`pairwise` and each named function, Mahalanobis included) is NaN for a
  pair with a non-finite row; `binarize` maps NaN to code 0, so `pairwise(metric="hamming")`
  checks the real values before binarizing;
- `top_k` never ranks a key that is not finite, scores NaN or is infinitely far: it is skipped
  like the padding of the last block, slots left without a key get index -1 at the worst value
  (inf for a distance, -inf for a similarity), and a non-finite query gets index -1 and value NaN
  in every slot;
- fitting refuses non-finite rows: called eagerly, `gaussian_stats` raises a `NonFiniteError`
  (a ValueError) counting them and `fit_gaussian` raises on non-finite statistics. Under `jit`, which cannot raise, they
  make the statistics NaN and every distance under the fitted Gaussian NaN; no row is dropped
  silently. Rows with an ignored label (padding) are ignored whatever they hold.
Within `jit` all of this is elementwise masking: no host round trip, same compiled cost.
Above this package the same policy holds (docs/measures.md): a search or kNN vote masks
non-finite rows and reports their count; what fits or ranks a whole set (Mahalanobis, probes,
retrieval, OOD, the geometry report, the evaluations) refuses them with `require_finite`.
"""

from embedspace.geometry._measures import NonFiniteError
from embedspace.geometry._measures import binarize
from embedspace.geometry._measures import finite_rows
from embedspace.geometry._measures import require_finite
from embedspace.geometry._measures import hamming_distance
from embedspace.geometry._measures import manhattan_distance
from embedspace.geometry._measures import squared_euclidean_distance
from embedspace.geometry._measures import euclidean_distance
from embedspace.geometry._measures import l2_normalize
from embedspace.geometry._measures import cosine_similarity
from embedspace.geometry._measures import geodesic_distance
from embedspace.geometry._measures import negative_arc_length
from embedspace.geometry._mahalanobis import GaussianStats
from embedspace.geometry._mahalanobis import Gaussian
from embedspace.geometry._mahalanobis import gaussian_stats
from embedspace.geometry._mahalanobis import merge_stats
from embedspace.geometry._mahalanobis import psum_stats
from embedspace.geometry._mahalanobis import make_gaussian
from embedspace.geometry._mahalanobis import fit_gaussian
from embedspace.geometry._mahalanobis import mahalanobis_to_classes
from embedspace.geometry._mahalanobis import mahalanobis_distance
from embedspace.geometry._mahalanobis import mahalanobis_pairwise
from embedspace.geometry._search import is_similarity
from embedspace.geometry._search import pairwise
from embedspace.geometry._search import top_k
from embedspace.geometry._search import METRICS

__all__ = [
    "Gaussian",
    "GaussianStats",
    "METRICS",
    "NonFiniteError",
    "binarize",
    "cosine_similarity",
    "euclidean_distance",
    "finite_rows",
    "fit_gaussian",
    "gaussian_stats",
    "geodesic_distance",
    "hamming_distance",
    "is_similarity",
    "l2_normalize",
    "mahalanobis_distance",
    "mahalanobis_pairwise",
    "mahalanobis_to_classes",
    "make_gaussian",
    "manhattan_distance",
    "merge_stats",
    "negative_arc_length",
    "pairwise",
    "psum_stats",
    "require_finite",
    "squared_euclidean_distance",
    "top_k",
]
