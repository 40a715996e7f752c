"""Semantic IDs: residual k-means (RQ-KMeans) over item embeddings, as OpenOneRec's itemic tokenizer does.

Level 0 clusters the embeddings, level ``l`` clusters what the levels before it left unexplained
(``residual_l = x - sum_{j<l} centroid_j[code_j]``); an item's semantic ID is its code at every level and its
reconstruction is the sum of its centroids (Rajput et al. 2023, TIGER; OpenOneRec ``res_kmeans.py``).

The centroids are saved as a ``centroids.{l}`` state dict (each ``(K, D)`` float32) in safetensors: the same
keys as OpenOneRec's ``ResKmeans`` module, so its ``load_state_dict`` takes the file as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from keye.errors import ConfigError, KeyeInputError
from keye.fileio import atomic_path
from keye.items.kmeans import distance_blocks, kmeans, nearest


@dataclass
class KMeansConfig:
    """Per-level k-means. The defaults are the measured ones (README, "Semantic IDs"): balanced levels (no code
    holds more than 1.25x the mean load while training) keep every level's perplexity far above faiss's loops and
    collide less, at a lower MSE (capacity 1.0 is the most even and collides about as the loops do); random
    seeding costs nothing where k-means++ costs minutes per level at 8192 codes; ``tol`` stops a level once an
    iteration gains under 0.1% of the inertia."""

    iters: int = 20  # at most this many Lloyd iterations per level (OpenOneRec's train_res_kmeans.py: 20)
    init: Literal["kmeans++", "random"] = "random"
    tol: float = 1e-3  # stop a level early when the inertia improves by less than this share
    balanced: bool = True  # capacity-bounded clusters (see keye.items.kmeans)
    capacity: float = 1.25  # balanced only: at most ceil(capacity * N / K) items per code

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ConfigError(f"kmeans.iters must be >= 1, got {self.iters}")
        if self.capacity < 1.0:
            raise ConfigError(f"kmeans.capacity must be >= 1.0 (K codes must hold N items), got {self.capacity}")


@dataclass
class SemanticIdConfig:
    levels: int = 3
    codes: int = 8192  # codes per level (OpenOneRec: 3 x 8192)
    seed: int = 0
    collision: Literal["none", "suffix", "reassign"] = "none"
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)

    def __post_init__(self) -> None:
        if self.levels < 1 or self.levels > 26:
            raise ConfigError(f"levels must be in 1..26 (one letter per level in the tokens), got {self.levels}")
        if self.codes < 2:
            raise ConfigError(f"codes must be >= 2, got {self.codes}")


class ResidualKMeans:
    """L codebooks of K centroids each; ``encode`` is greedy nearest-centroid per level on the residual."""

    def __init__(self, centroids: list[torch.Tensor]):
        if not centroids:
            raise KeyeInputError("ResidualKMeans needs at least one level of centroids")
        self.centroids = [c.float().contiguous() for c in centroids]  # each (K, D)

    @property
    def levels(self) -> int:
        return len(self.centroids)

    @property
    def dim(self) -> int:
        return self.centroids[0].shape[1]

    @property
    def codebook_sizes(self) -> list[int]:
        return [c.shape[0] for c in self.centroids]

    @classmethod
    def fit(cls, x_ND: torch.Tensor, config: SemanticIdConfig) -> tuple["ResidualKMeans", torch.Tensor]:
        """Train level by level. Returns the quantizer and the training items' codes ``(N, L)`` int64.

        The codes are the nearest centroids, level by level, exactly what ``encode`` (and OpenOneRec's
        ``ResKmeans.encode`` on the saved state dict) gives the same items: with ``kmeans.balanced`` the
        capacity shapes where the centroids sit, not which code an item gets, so a consumer that re-encodes the
        catalogue gets the IDs written here. Level ``l + 1`` trains on the residuals of those codes.
        Level ``l`` uses seed ``seed + l`` so levels do not share their random draws.
        """
        residual_ND = x_ND.float().clone()
        centroids, codes = [], []
        km = config.kmeans
        for level in range(config.levels):
            result = kmeans(
                residual_ND, config.codes, iters=km.iters, init=km.init, seed=config.seed + level, tol=km.tol,
                balanced=km.balanced, capacity=km.capacity,
            )
            code_N = nearest(residual_ND, result.centroids_KD)[0] if km.balanced else result.assign_N
            centroids.append(result.centroids_KD)
            codes.append(code_N)
            residual_ND -= result.centroids_KD[code_N]
        return cls(centroids), torch.stack(codes, 1)

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` embeddings -> ``(N, L)`` int64 codes (greedy per level, chunked distances)."""
        residual_ND = x_ND.float().clone()
        codes = []
        for c_KD in self.centroids:
            code_N, _ = nearest(residual_ND, c_KD)
            residual_ND -= c_KD[code_N]
            codes.append(code_N)
        return torch.stack(codes, 1)

    def decode(self, codes_NL: torch.Tensor) -> torch.Tensor:
        """``(N, l <= L)`` codes -> ``(N, D)``: the sum of the chosen centroids of the first ``l`` levels."""
        if codes_NL.shape[1] > self.levels:
            raise KeyeInputError(f"decode: codes have {codes_NL.shape[1]} levels, the quantizer {self.levels}")
        out_ND = torch.zeros(codes_NL.shape[0], self.dim)
        for level in range(codes_NL.shape[1]):
            out_ND += self.centroids[level][codes_NL[:, level]]
        return out_ND

    def residual(self, x_ND: torch.Tensor, codes_NL: torch.Tensor, upto: int) -> torch.Tensor:
        """What the first ``upto`` levels of ``codes_NL`` leave of ``x_ND``."""
        return x_ND.float() - self.decode(codes_NL[:, :upto])

    def level_distances(self, residual_ND: torch.Tensor, level: int) -> torch.Tensor:
        """Squared distances ``(N, K)`` of residuals to every centroid of ``level`` (for small N)."""
        return torch.cat([d2 for _, d2 in distance_blocks(residual_ND, self.centroids[level])])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"centroids.{level}": c for level, c in enumerate(self.centroids)}

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Write the ``centroids.{l}`` state dict (OpenOneRec ``ResKmeans`` keys) as safetensors."""
        meta = {"n_layers": str(self.levels), "codebook_size": json.dumps(self.codebook_sizes), "dim": str(self.dim)}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        with atomic_path(path) as tmp:
            save_file(self.state_dict(), str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "ResidualKMeans":
        tensors = load_file(str(path))
        levels = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("centroids."))
        if levels != list(range(len(levels))) or not levels:
            raise KeyeInputError(f"{path}: expected keys centroids.0..centroids.L-1, found {sorted(tensors)}")
        return cls([tensors[f"centroids.{level}"] for level in levels])
