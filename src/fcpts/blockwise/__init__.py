"""Block-wise, memory-bounded allocation for decoders larger than memory.

Design (the README and the method notes may quote this). The whole-model FCPTS learns
one log-threshold per layer under L = L_rec + lam * |S(t) - S*| and lands one shared
offset of all log-thresholds exactly. Block-wise, the same objective is split along the
decoder's blocks, processed in order with one block resident:

* Inputs of block b are the calibration hidden states after the already-pruned blocks
  (SparseGPT's sequential stream); its reconstruction term is the relative MSE of the
  masked block against the dense block on those inputs.
* The constraint stays global: S_est(t) = (Z_done + sum_{l in b} n_l F_l(t_l) +
  N_rest * S*) / N, with Z_done the zeros placed in earlier blocks and the blocks to come
  counted at the target. A block may leave S* where its reconstruction gains more than
  lam * n_b / N per unit, and the next blocks inherit the debt (their goal is what keeps
  S_est at S*): one global Lagrange constraint, updated between blocks.
* Each block's zeros are its learned count (scores at or below the learned thresholds),
  kept feasible for the blocks to come; the last block takes exactly what remains, so the
  total is exactly round(S* x N). Within a block the count is landed as in the whole-model
  path (one shared offset of its log-thresholds, ties by score).
* The block is then pruned at those per-layer counts, by SparseGPT's OBS update on the
  block's input Hessians (``reconstruct="obs"``) or by masks alone (``"none"``).

Memory: one block's weights, its Hessians and the calibration stream, which is held
within ``memory_mb`` and spilled to safetensors files beyond it; the embeddings and head
are resident only while the stream is first computed and when the output is written.
Checkpoints: after every block, the placed zeros, per-layer counts and the stream are
saved, so a killed run resumes at the next block and ends with the same result.
"""

from .learn import BlockwiseConfig
from .run import allocate_blockwise

__all__ = ["BlockwiseConfig", "allocate_blockwise"]
