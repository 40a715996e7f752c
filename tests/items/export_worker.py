"""Subprocess for the kill/resume test: export a catalogue with a slow, deterministic fake encoder."""

import sys
import time

import torch

from keye.errors import KeyeInputError
from keye.items.encoders import FusedItemEncoder


def fake_text(items):
    """Deterministic 6-d embedding from the title's characters; 'BROKEN' titles cannot be read."""
    rows = []
    for item in items:
        title = item.texts.get("title", "")
        if "BROKEN" in title:
            raise KeyeInputError(f"pid {item.pid!r}: unreadable title")
        g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(title)))
        rows.append(torch.randn(6, generator=g))
    return torch.stack(rows)


def fake_encoder(delay: float = 0.0, tag: str = "fake-v1") -> FusedItemEncoder:
    def slow(items):
        time.sleep(delay)
        return fake_text(items)

    return FusedItemEncoder({"text": slow}, description={"encoder": tag})


if __name__ == "__main__":
    from keye.items.export import export_embeddings

    catalogue, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    export_embeddings(catalogue, fake_encoder(delay), out, batch_size=4, shard_size=8, progress=False)
