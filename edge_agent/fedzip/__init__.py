"""FedZip: top-z sparsification, k-means quantisation, real bit encodings and a zstd stage.

Pipeline, per tensor of n entries (numpy only; runs on the edge and in the coordinator):
1. Top-z: keep exactly m = ceil(z n) entries of largest |x| (at least 1). Ties at the threshold go to the
   lowest positions, so exactly m are kept, never more.
2. 1-D k-means over the kept entries only, k = 3 by default: centroids start at linspace(min, max, k) and
   run 4 Lloyd iterations, as in the reference code.
3. Encode positions and cluster ids with E1..E4 (see `encodings`), then zstd unless that does not shrink it.

Decisions:
- Cluster only the kept entries, never the pruned zeros. Pruned entries decode to exactly 0.0. The
  reference code puts the zeros in the middle cluster, whose centroid is near 0 but not 0, so every pruned
  entry would decode to a small constant bias. Pinning a zero cluster would also fix the bias, but it spends
  one of the k centroids on the zeros; clustering the kept entries gives all k centroids to the values that
  are actually sent, and the zeros are implied by the positions anyway (they cost nothing in E2..E4).
- Fewer than k distinct kept values, and empty clusters: empty clusters are dropped during Lloyd's
  iterations, so a tensor ends with k' <= k centroids. After rounding to float32, centroids that coincide
  are merged; a centroid that rounds to 0, and kept entries that are exactly 0, fall back to the implicit
  zeros. So the payload only ever carries distinct, nonzero, used centroids, and decode(encode(x)) ==
  quantize(x) bit for bit (with +0.0 for every zero).
- All-zero tensors send m = 0 and nothing else. Non-finite inputs are refused (CodecError).
- E1 is canonical Huffman over the k'+1 symbols {zero, clusters}, built from the counts, which are sent
  (so there is no table); E2 sends absolute positions per cluster in ceil(log2 n) bits; E3 sends per
  cluster gaps in decodable Elias-gamma (2 floor(log2 g) + 1 bits each); E4 (beyond the paper) sends gaps
  as Huffman-coded buckets with raw low bits, a fitted Rice-like parameter, and the cluster ids block-Huffman
  coded (directly or as deltas from the previous id). On uniformly placed positions E4 lands within a few
  percent of `bound_bits`; on real updates, whose kept entries cluster in rows and columns, it lands well
  below that bound (which assumes an arbitrary subset). No new dependency: pure numpy.
- Decoding is vectorised: variable-length codes are walked by pointer doubling, no Python loop per entry.

Public API: FedZipParams, quantize, encode, decode, encode_and_quantize, bound_bits, ErrorFeedback.
"""

from __future__ import annotations

from .bound import bound_bits
from .container import decode, encode, encode_and_quantize, layout_crc, quantize
from .feedback import ErrorFeedback
from .params import ENCODINGS, FedZipParams

__all__ = [
    "ENCODINGS",
    "ErrorFeedback",
    "FedZipParams",
    "bound_bits",
    "decode",
    "encode",
    "encode_and_quantize",
    "layout_crc",
    "quantize",
]
