"""Search a gallery at scale: a faiss index over gallery features, re-scoring of its shortlists with AMFOR's part
distance and k-reciprocal re-ranking, and the Market-1501 protocol on its ranked lists (see docs/search.md).

faiss is an optional extra (`pip install "amfor[search]"`), imported when an index is built or loaded.
`python -m amfor.search build|query` is the command line.
"""

from .evaluate import evaluate_index, evaluate_ranked, match_counts, ranked_list_metrics
from .index import KINDS, GalleryIndex, SearchError
from .rescore import rerank_shortlist, rescore_parts

__all__ = ["KINDS", "GalleryIndex", "SearchError", "evaluate_index", "evaluate_ranked", "match_counts",
           "ranked_list_metrics", "rerank_shortlist", "rescore_parts"]
