"""Kelix-style discrete visual tokenizer: merged ViT features -> N parallel codes per token -> LM ids.

Kelix (Kelix technical report, arXiv 2602.09843) closes the understanding gap of discrete visual tokens
by giving each visual position several codes from independent sub-codebooks instead of one, which
multiplies the information a position can carry (K^N combinations for N codebooks of K codes). Here:

    merged ViT features (P, 4*D_vit)  the frozen ViT, 2x2-merged exactly as ``mlp_AR`` sees them
      -> encoder MLP                  (P, N*d) latent
      -> N parallel SimVQ codebooks   codebook i quantizes latent slice i (d features) -> index (P, N)
      -> decoder MLP                  (P, 4*D_vit) reconstruction of the frozen features (training only)

Parallel codebooks over *slices* (product quantization, Jegou et al. 2011), not N codebooks over the
same latent: N nearest-neighbour searches over one vector would pick codes that encode the same
information, so capacity would not grow; disjoint slices make the codes independent by construction,
which is what "independent sub-codebooks" needs.

Each codebook is SimVQ (Zhu et al. 2024, "Addressing representation collapse in vector quantized models
with one linear layer"): a frozen table C (K, d) seen through a trainable linear map W, code k = W C[k].
Gradients reach every code through W, so codes do not die the way independently updated rows do. The
frozen table is k-means initialised on real latents (``kmeans_init``) with W = I, so training starts
from a codebook that already covers the data. Latent slices and codes are l2-normalised before the
search (ViT-VQGAN, Yu et al. 2021, sec. 3.2; LlamaGen does the same): without it the encoder's output
scale drifts away from the codes during training and the codebook / commitment terms grow without bound.

In the LM (``keye.models.modeling``, ``vision_mode="discrete"``) index ``idx`` of codebook ``i`` is token
id ``vocab + i*K + idx`` (``code_ids``): a reserved block right after the text vocabulary, embedded by
its own table of N*K rows; a visual position's input is the SUM of its N code embeddings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.activations import ACT2FN
from vector_quantize_pytorch import SimVQ
from vector_quantize_pytorch.vector_quantize_pytorch import kmeans, straight_through

from keye.errors import ConfigError, KeyeInputError
from keye.fileio import atomic_path, atomic_write_text
from keye.models.configuration import KeyeVisualTokenizerConfig
from keye.models.projector import merge_patches

WEIGHTS_NAME = "visual_tokenizer.safetensors"
CONFIG_NAME = "visual_tokenizer.json"
# rows of the (P, K) distance matrix computed at once per codebook: bounds memory at K=8192
_SEARCH_CHUNK = 4096


# ----------------------------------------------------------------------------- id arithmetic


def code_ids(indices_PN: torch.Tensor, text_vocab: int, codebook_size: int) -> torch.Tensor:
    """Codebook indices (P, N) -> LM token ids ``text_vocab + i * K + idx`` (P, N).

    Codebook i owns ids [text_vocab + i*K, text_vocab + (i+1)*K): the blocks tile the reserved range
    without overlap, and no visual id collides with a text id.
    """
    if indices_PN.numel() and (int(indices_PN.min()) < 0 or int(indices_PN.max()) >= codebook_size):
        raise KeyeInputError(f"code indices must lie in [0, {codebook_size}), got [{int(indices_PN.min())}, "
                             f"{int(indices_PN.max())}]")
    offsets_N = torch.arange(indices_PN.shape[-1], device=indices_PN.device) * codebook_size
    return text_vocab + offsets_N + indices_PN


def split_code_ids(ids_PN: torch.Tensor, text_vocab: int, codebook_size: int) -> torch.Tensor:
    """Inverse of ``code_ids``: LM ids (P, N) -> codebook indices (P, N); column i must be codebook i."""
    local_PN = ids_PN - text_vocab
    book_PN = torch.div(local_PN, codebook_size, rounding_mode="floor")
    expected_N = torch.arange(ids_PN.shape[-1], device=ids_PN.device)
    if bool((local_PN < 0).any()) or not bool((book_PN == expected_N).all()):
        raise KeyeInputError(
            f"visual code ids: column i must hold ids of codebook i, in [{text_vocab} + i*{codebook_size}, "
            f"{text_vocab} + (i+1)*{codebook_size})"
        )
    return local_PN - book_PN * codebook_size


def code_shares(indices_PN: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Share of the P tokens that picked each code, per codebook: (P, N) indices -> (N, K)."""
    counts_NK = torch.stack([torch.bincount(col, minlength=codebook_size) for col in indices_PN.T.long()]).float()
    return counts_NK / counts_NK.sum(-1, keepdim=True).clamp(min=1)


def codebook_stats(indices_PN: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-codebook usage (share of codes used at least once) and perplexity (exp of the code entropy).

    indices_PN: (P, N). Returns two (N,) float tensors. Perplexity K means all codes equally used.
    """
    probs_NK = code_shares(indices_PN, codebook_size)
    usage_N = (probs_NK > 0).float().mean(-1)
    entropy_N = -(probs_NK * probs_NK.clamp(min=1e-12).log()).sum(-1)
    return usage_N, entropy_N.exp()


# ----------------------------------------------------------------------------- quantizer


@dataclass
class Quantized:
    """quantized: (P, N*d) unit-norm codes (straight-through in training); per-token losses are (P,)."""

    quantized: torch.Tensor
    indices: torch.Tensor  # (P, N)
    codebook_loss: torch.Tensor  # ||sg(z) - q||^2: trains the SimVQ maps
    commitment_loss: torch.Tensor  # ||z - sg(q)||^2: pulls the encoder to its codes


class ParallelSimVQ(nn.Module):
    """N independent SimVQ codebooks, codebook i over slice i of the latent.

    The parameters are ``vector_quantize_pytorch.SimVQ`` modules (``frozen_codebook`` buffer +
    ``code_transform``), so weights follow that library's layout. The search, losses and straight-through
    are done here, batched over the N codebooks, because ``SimVQ.forward`` (1.32) does not fit: it fuses
    the codebook and commitment terms into one number (we log them apart), applies the straight-through
    sum even in eval mode (``x + (q - x)`` is not bit-equal to ``q``, so decoding indices would not
    reproduce the forward's output exactly), and takes one latent per module rather than N slices.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, code_dim: int):
        super().__init__()
        self.num_codebooks, self.codebook_size, self.code_dim = num_codebooks, codebook_size, code_dim
        self.quantizers = nn.ModuleList(
            SimVQ(dim=code_dim, codebook_size=codebook_size, rotation_trick=False) for _ in range(num_codebooks)
        )
        self.reset_transforms()

    @torch.no_grad()
    def reset_transforms(self) -> None:
        # W = I: the implicit codebook starts equal to the frozen table (k-means centroids once initialised)
        for q in self.quantizers:
            q.code_transform.weight.copy_(torch.eye(self.code_dim))

    def codebooks(self) -> torch.Tensor:
        """The implicit codebooks W_i C_i, l2-normalised per code, (N, K, d)."""
        return F.normalize(torch.stack([q.codebook for q in self.quantizers]), dim=-1)

    def slices(self, z_PL: torch.Tensor) -> torch.Tensor:
        """Latent (P, N*d) -> its N slices, l2-normalised, (N, P, d)."""
        return F.normalize(rearrange(z_PL, "p (n d) -> n p d", n=self.num_codebooks), dim=-1)

    @torch.no_grad()
    def nearest(self, z_NPd: torch.Tensor, codebooks_NKd: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (Euclidean) per slice: (N, P, d), (N, K, d) -> (N, P)."""
        return torch.cat(
            [torch.cdist(z.float(), codebooks_NKd.float()).argmin(-1) for z in z_NPd.split(_SEARCH_CHUNK, dim=1)],
            dim=1,
        )

    def lookup(self, indices_PN: torch.Tensor, codebooks_NKd: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of ``indices_PN`` (P, N) -> (P, N*d), concatenated in codebook order."""
        books = self.codebooks() if codebooks_NKd is None else codebooks_NKd
        codes_NPd = torch.stack([books[i][indices_PN[:, i]] for i in range(self.num_codebooks)])
        return rearrange(codes_NPd, "n p d -> p (n d)")

    def forward(self, z_PL: torch.Tensor) -> Quantized:
        """z_PL: (P, N*d) latent -> ``Quantized`` (of the normalised slices)."""
        z_NPd = self.slices(z_PL)
        z_PL = rearrange(z_NPd, "n p d -> p (n d)")
        books = self.codebooks()
        indices_PN = self.nearest(z_NPd, books).T
        q_PL = self.lookup(indices_PN, books).to(z_PL.dtype)
        codebook_P = (q_PL - z_PL.detach()).pow(2).mean(-1)
        commitment_P = (z_PL - q_PL.detach()).pow(2).mean(-1)
        # eval returns the codes themselves, so decode(indices) reproduces this output bit for bit
        quantized = straight_through(z_PL, q_PL) if self.training else q_PL
        return Quantized(quantized, indices_PN, codebook_P, commitment_P)

    @torch.no_grad()
    def restart_codes(self, codebook: int, codes_k: torch.Tensor, z_kd: torch.Tensor) -> None:
        """Move codes ``codes_k`` of one codebook onto the latent slices ``z_kd`` (dead-code restart,
        Jukebox / ``threshold_ema_dead_code`` style): their frozen rows become W^-1 z, so W C = z."""
        q = self.quantizers[codebook]
        W = q.code_transform.weight.float()  # code = C @ W.T
        rows = torch.linalg.solve(W, F.normalize(z_kd.float(), dim=-1).T).T
        q.frozen_codebook[codes_k] = rows.to(q.frozen_codebook.dtype)

    @torch.no_grad()
    def kmeans_init(self, z_PL: torch.Tensor, iters: int = 10) -> None:
        """Set each frozen table to k-means centroids of its (normalised) latent slice, W to the identity.

        Uses the library's batched Lloyd iterations (``vector_quantize_pytorch...kmeans``, spherical),
        one batch entry per codebook. Needs at least K latents: with fewer, centroids repeat and start dead.
        """
        if z_PL.shape[0] < self.codebook_size:
            raise KeyeInputError(
                f"k-means init of {self.codebook_size} codes needs at least that many feature vectors, got "
                f"{z_PL.shape[0]}: add frames or lower codebook_size"
            )
        means_NKd, _ = kmeans(self.slices(z_PL.float()), self.codebook_size, num_iters=iters, use_cosine_sim=True)
        for q, means in zip(self.quantizers, means_NKd):
            q.frozen_codebook.copy_(means)
        self.reset_transforms()


# ----------------------------------------------------------------------------- tokenizer


def _mlp(dim_in: int, hidden: int, dim_out: int, act: str = "gelu") -> list[nn.Module]:
    return [nn.Linear(dim_in, hidden), ACT2FN[act], nn.Linear(hidden, dim_out)]


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # (P, F) decoded merged features
    quantized: torch.Tensor  # (P, N*d)
    indices: torch.Tensor  # (P, N)
    codebook_loss: torch.Tensor  # (P,)
    commitment_loss: torch.Tensor  # (P,)


class KeyeVisualTokenizer(nn.Module):
    """Merged ViT features (P, F = merge^2 * D_vit) <-> N codes per token.

    ``feature_dim`` is the merged width (4 * vision hidden for Keye's 2x2 merge). The input LayerNorm
    mirrors ``mlp_AR.pre_norm``: merged SigLIP features have a few very large channels.
    """

    def __init__(self, config: KeyeVisualTokenizerConfig, feature_dim: int):
        super().__init__()
        self.config, self.feature_dim = config, feature_dim
        latent = config.num_codebooks * config.code_dim
        self.encoder = nn.Sequential(nn.LayerNorm(feature_dim, eps=config.layer_norm_eps),
                                     *_mlp(feature_dim, config.hidden_size, latent))
        self.quantizer = ParallelSimVQ(config.num_codebooks, config.codebook_size, config.code_dim)
        self.decoder = nn.Sequential(*_mlp(latent, config.hidden_size, feature_dim))

    def forward(self, features_PF: torch.Tensor) -> TokenizerOutput:
        q = self.quantizer(self.encoder(features_PF))
        return TokenizerOutput(self.decoder(q.quantized), q.quantized, q.indices, q.codebook_loss, q.commitment_loss)

    @torch.no_grad()
    def encode(self, features_PF: torch.Tensor) -> torch.Tensor:
        """(P, F) -> code indices (P, N)."""
        return self.quantizer.nearest(self.quantizer.slices(self.encoder(features_PF)), self.quantizer.codebooks()).T

    def decode_codes(self, indices_PN: torch.Tensor) -> torch.Tensor:
        """(P, N) -> quantized latent (P, N*d)."""
        return self.quantizer.lookup(indices_PN)

    def decode(self, indices_PN: torch.Tensor) -> torch.Tensor:
        """(P, N) -> reconstructed merged features (P, F)."""
        return self.decoder(self.decode_codes(indices_PN))

    @torch.no_grad()
    def kmeans_init(self, features_PF: torch.Tensor, iters: int = 10) -> None:
        """k-means initialise every codebook on the current encoder's latents of ``features_PF``."""
        self.quantizer.kmeans_init(self.encoder(features_PF), iters)

    def losses(self, out: TokenizerOutput, target_PF: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token (P,) loss terms and their weighted ``total``; ``cosine`` is the reconstruction cosine."""
        c = self.config
        target = target_PF.to(out.reconstruction.dtype)
        cosine_P = F.cosine_similarity(out.reconstruction, target, dim=-1)
        mse_P = (out.reconstruction - target).pow(2).mean(-1)
        total_P = (c.reconstruction_mse_weight * mse_P + c.reconstruction_cosine_weight * (1 - cosine_P)
                   + c.codebook_weight * out.codebook_loss + c.commitment_weight * out.commitment_loss)
        return {"total": total_P, "mse": mse_P, "cosine": cosine_P,
                "codebook": out.codebook_loss, "commitment": out.commitment_loss}


@torch.no_grad()
def fit_code_embeddings(tokenizer: KeyeVisualTokenizer, features_PF: torch.Tensor, targets_PH: torch.Tensor,
                        ridge: float = 1e-3) -> tuple[torch.Tensor, float]:
    """Code embeddings whose sum reads like ``targets_PH`` (P, H), the vectors a continuous model's projector
    gives the same merged features: a ridge fit of one linear map A (and bias) from the quantized latent q (P,
    N*d) to the targets. q concatenates the N codes, so A q is a sum over codebooks of A_i c_i, and code k of
    codebook i gets the row A_i c_ik (+ bias / N). Returns (table (N*K, H) in ``code_ids`` row order, the fit's
    share of the targets' variance explained on ``features_PF``)."""
    q_PL = tokenizer.decode_codes(tokenizer.encode(features_PF)).double()
    y_PH = targets_PH.double()
    x_PL = torch.cat([q_PL, torch.ones_like(q_PL[:, :1])], dim=1)
    gram = x_PL.T @ x_PL
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    a_LH = torch.linalg.solve(gram, x_PL.T @ y_PH)
    weight_LH, bias_H = a_LH[:-1], a_LH[-1]
    explained = 1 - float((x_PL @ a_LH - y_PH).pow(2).sum() / (y_PH - y_PH.mean(0)).pow(2).sum())
    c = tokenizer.config
    books_NKd = tokenizer.quantizer.codebooks().double()
    rows = [books_NKd[i] @ weight_LH[i * c.code_dim:(i + 1) * c.code_dim] + bias_H / c.num_codebooks
            for i in range(c.num_codebooks)]
    return torch.cat(rows).to(targets_PH.dtype), explained


def merged_vit_features(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                        merge: int, previous_pixels: torch.Tensor | None = None) -> torch.Tensor:
    """Packed patches (sum t*h*w, 3*p*p) -> the 2x2-merged ViT features the tokenizer reads (P, F)."""
    return merge_patches(visual(pixel_values, grid_thw, previous_pixels), grid_thw, merge)


# ----------------------------------------------------------------------------- files


def save_visual_tokenizer(tokenizer: KeyeVisualTokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``visual_tokenizer.safetensors`` (weights and frozen tables) and ``visual_tokenizer.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in tokenizer.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    meta = {"feature_dim": tokenizer.feature_dim, "config": tokenizer.config.to_diff_dict()}
    atomic_write_text(out / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True))
    return out / WEIGHTS_NAME


def load_visual_tokenizer(path: str | os.PathLike) -> KeyeVisualTokenizer:
    """Read a folder written by ``save_visual_tokenizer`` (safetensors only; strict key match)."""
    folder = Path(path)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        raise ConfigError(f"visual tokenizer {folder}: expected {WEIGHTS_NAME} and {CONFIG_NAME} there")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    config = KeyeVisualTokenizerConfig(**{k: v for k, v in meta["config"].items() if k != "model_type"})
    tokenizer = KeyeVisualTokenizer(config, int(meta["feature_dim"]))
    tokenizer.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
    return tokenizer
