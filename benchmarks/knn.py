"""Exact kNN search: embedspace's blocked `top_k` against faiss and scikit-learn.

  python -m benchmarks.knn [--quick]            # prints a Markdown table
  python -m benchmarks.run_all [--quick]        # all benchmarks

A database of 60,000 and 10,000 queries of 128-d float32 Gaussian vectors (as the evaluation's
kNN classifier sees: a training set of embeddings, queried by the test set), k = 20 neighbours,
cosine similarity and Euclidean distance:

- embedspace: `embedspace.space.search.top_k` (the compiled `geometry.top_k` over blocks of 1,024
  queries and 4,096 keys, the blocks the evaluation's kNN uses), on JAX's default backend;
- faiss-cpu `IndexFlatIP` on L2-normalised vectors (cosine) and `IndexFlatL2` (Euclidean);
- scikit-learn `NearestNeighbors(algorithm="brute", metric="cosine" | "euclidean", n_jobs=-1)`.

Each result is compared with faiss's: `equal sets` is the fraction of queries whose k neighbours
are the same set; `equal up to ties` also accepts a query whose differing neighbours score, in
float64, within 1e-5 (relative) of the k-th neighbour's score, i.e. a different pick among
near-equal candidates at the boundary.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
      __import__("os").path.abspath(__file__))))

from benchmarks import common
from embedspace.space import search

TIE_RTOL = 1e-5


def exact_scores(q: np.ndarray, x: np.ndarray, idx: np.ndarray, metric: str) -> np.ndarray:
  """float64 closeness (larger is closer) of each query to the keys `idx` `[n, k]`."""
  q64, x64 = q.astype(np.float64), x.astype(np.float64)
  if metric == "cosine":
    q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
    x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
    return np.einsum("nd,nkd->nk", q64, x64[idx])
  return -np.sum((q64[:, None, :] - x64[idx]) ** 2, axis=-1)


def agreement(q: np.ndarray, x: np.ndarray, got: np.ndarray, want: np.ndarray,
              metric: str) -> tuple[float, float]:
  """(fraction of equal neighbour sets, fraction equal up to ties at the k-th neighbour)."""
  got, want = np.sort(got, axis=1), np.sort(want, axis=1)
  same = np.all(got == want, axis=1)
  ok = same.copy()
  for i in np.flatnonzero(~same):
    both = np.concatenate([got[i], want[i]])
    s = exact_scores(q[i:i + 1], x, both[None], metric)[0]
    kth = np.sort(exact_scores(q[i:i + 1], x, want[i][None], metric)[0])[0]
    differ = np.setxor1d(got[i], want[i])
    sd = s[np.isin(both, differ)]
    ok[i] = bool(np.all(np.abs(sd - kth) <= TIE_RTOL * max(abs(kth), 1.0)))
  return float(same.mean()), float(ok.mean())


def run(quick: bool) -> list[dict[str, Any]]:
  """Times the three searches per metric and checks them against faiss; returns result rows."""
  import faiss
  from sklearn.neighbors import NearestNeighbors
  n_db, n_q, dim, k = (6000, 1000, 64, 10) if quick else (60000, 10000, 128, 20)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n_db, dim), dtype=np.float32)
  q = rng.standard_normal((n_q, dim), dtype=np.float32)
  rows = []
  for metric in ("cosine", "euclidean"):
    def run_jax():
      return search.top_k(q, x, measure=metric, k=k, query_block=1024, key_block=4096)[1]

    def run_faiss():
      if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(dim)
        index.add(xn)
        return index.search(qn, k)[1]
      index = faiss.IndexFlatL2(dim)
      index.add(x)
      return index.search(q, k)[1]

    def run_sklearn():
      nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric, n_jobs=-1).fit(x)
      return nn.kneighbors(q, return_distance=False)

    want = run_faiss()
    checks = {}
    for name, fn in (("jax", run_jax), ("sklearn", run_sklearn)):
      same, ties = agreement(q, x, fn(), want, metric)
      checks[name] = f"vs faiss: equal sets {100 * same:.2f}%, equal up to ties {100 * ties:.2f}%"
    stats = common.compare({"faiss": run_faiss, "sklearn": run_sklearn, "jax": run_jax},
                           repeats=3 if quick else 5, warmup=1,
                           budget_s=5.0 if quick else 60.0)
    case = f"{metric}, {n_db} x {dim} database, {n_q} queries, k={k}"
    rows += [
        common.row("knn", case, "faiss-cpu IndexFlat" + ("IP" if metric == "cosine" else "L2"),
                   stats["faiss"], check="reference"),
        common.row("knn", case, "scikit-learn brute", stats["sklearn"],
                   reference=stats["faiss"], check=checks["sklearn"]),
        common.row("knn", case, "embedspace (jax) search.top_k", stats["jax"],
                   reference=stats["faiss"], check=checks["jax"],
                   speedup_vs_sklearn=stats["sklearn"]["median_s"] / stats["jax"]["median_s"]),
    ]
    print(f"knn {case}: jax {rows[-1]['speedup']:.2f}x faiss, "
          f"{rows[-1]['speedup_vs_sklearn']:.2f}x sklearn; {checks['jax']}",
          file=sys.stderr, flush=True)
  slower = [r for r in rows if r.get("speedup", 1.0) < 1.0 and r["impl"].startswith("embed")]
  if slower:
    rows.append({"benchmark": "knn", "case": "summary", "impl": "", "summary": True,
                 "note": "embedspace is slower than faiss at: " + ", ".join(
                     f"{r['case']} ({r['speedup']:.2f}x; {r['speedup_vs_sklearn']:.2f}x "
                     "scikit-learn)" for r in slower)})
  return rows


def main(argv: list[str] | None = None) -> None:
  """Runs the kNN benchmark alone and prints its table."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, < 1 minute")
  args = parser.parse_args(argv)
  print(common.markdown_table([r for r in run(args.quick) if not r.get("summary")]))


if __name__ == "__main__":
  main()
