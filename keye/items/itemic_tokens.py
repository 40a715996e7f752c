"""Itemic tokens: give a language model one token per (level, code), OpenOneRec style.

An item is written ``<|sid_begin|><s_a_12><s_b_5><s_c_40><|sid_end|>``. The tokens are added to the tokenizer in
OpenOneRec's strict order (all ``<s_a_*>``, then all ``<s_b_*>``, ..., then ``<|sid_begin|>``, ``<|sid_end|>``;
``expand_qwen3_vocab.py``), as ordinary added tokens (special tokens would vanish under
``skip_special_tokens``), and the model's embeddings are resized to a multiple of 256.

Training then starts with only the new rows (OpenOneRec stage 1, "itemic-text alignment",
``--start_optimize_embedding_index``): ``train_new_rows_only`` freezes everything else and masks the gradient of
the old rows of the input embeddings and, when untied, of the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

SID_BEGIN = "<|sid_begin|>"
SID_END = "<|sid_end|>"


def level_letter(level: int) -> str:
    return chr(ord("a") + level)


def itemic_token_strings(codebook_sizes: Sequence[int]) -> list[str]:
    """All itemic tokens in OpenOneRec's order: level by level, then begin / end markers."""
    tokens = [f"<s_{level_letter(l)}_{c}>" for l, k in enumerate(codebook_sizes) for c in range(k)]
    return tokens + [SID_BEGIN, SID_END]


def format_sid(codes: Sequence[int]) -> str:
    """``[12, 5, 40]`` -> ``<|sid_begin|><s_a_12><s_b_5><s_c_40><|sid_end|>``."""
    return SID_BEGIN + "".join(f"<s_{level_letter(l)}_{int(c)}>" for l, c in enumerate(codes)) + SID_END


@dataclass(frozen=True)
class ItemicVocab:
    first_new_id: int  # token id of the first added token == the tokenizer's length before adding
    num_added: int
    vocab_size: int  # embedding rows after the resize (a multiple of pad_to)
    token_to_id: dict[str, int] = field(repr=False)


def add_itemic_tokens(tokenizer, model, codebook_sizes: Sequence[int], pad_to: int = 256) -> ItemicVocab:
    """Add the itemic tokens to ``tokenizer`` (a ``PreTrainedTokenizerFast``) and resize ``model``'s embeddings.

    ``model`` is any transformers ``PreTrainedModel``; the embedding (and an untied LM head) get
    ``ceil(len(tokenizer) / pad_to) * pad_to`` rows, the new ones initialised by transformers' mean resizing.
    Tokens already in the vocabulary are not added twice.
    """
    first_new_id = len(tokenizer)
    tokens = itemic_token_strings(codebook_sizes)
    num_added = tokenizer.add_tokens(tokens)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    return ItemicVocab(first_new_id, num_added, vocab_size, dict(zip(tokens, ids)))


def _mask_rows_below(first_row: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:first_row] = 0
        return grad

    return hook


def new_row_parameters(model) -> list[nn.Parameter]:
    """The embedding matrix and, when not tied to it, the LM head weight (the tensors with new rows)."""
    params = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not params[0]:
        params.append(head.weight)
    return params


def train_new_rows_only(model, first_new_id: int) -> list[torch.utils.hooks.RemovableHandle]:
    """Freeze every parameter except the rows ``>= first_new_id`` of the embedding (and untied LM head).

    Returns the gradient-hook handles (``.remove()`` them to unfreeze the old rows again). Footgun: decoupled
    weight decay (AdamW) shrinks every row it sees, gradient or not, so put these tensors in a group with
    ``weight_decay=0`` (``new_rows_param_groups``) or the old rows drift.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    for p in new_row_parameters(model):
        p.requires_grad_(True)
        handles.append(p.register_hook(_mask_rows_below(first_new_id)))
    return handles


def new_rows_param_groups(model, lr: float) -> list[dict]:
    """Optimizer groups for the new-rows-only stage: the trainable tensors, without weight decay."""
    return [{"params": [p for p in new_row_parameters(model) if p.requires_grad], "lr": lr, "weight_decay": 0.0}]
