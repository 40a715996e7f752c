"""Item side of the toolkit: item embeddings, semantic IDs, itemic tokens (OpenOneRec / TIGER / LC-Rec formats).

- ``keye.items.export``: catalogue (jsonl / parquet) -> parquet shards ``pid, embedding``, resumable.
- ``keye.items.encoders``: the ``ItemEncoder`` protocol, modality fusion, the MiniLM text encoder, the Keye plug-in.
- ``keye.items.semantic_ids`` / ``kmeans`` / ``collisions`` / ``metrics``: residual k-means semantic IDs.
- ``keye.items.tokenize``: embeddings -> codes parquet, ``centroids.{l}`` safetensors, index json, sid -> pids map.
- ``keye.items.itemic_tokens``: ``<|sid_begin|><s_a_X>...<|sid_end|>`` vocabulary expansion and freeze plan.

Import the submodules directly; this package file stays light (no transformers import).
"""
