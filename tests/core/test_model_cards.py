"""Model cards carry their held-out figures twice, in the YAML front matter (Hugging Face ``model-index``)
and in the tables readers see: both must be there, well formed, and the same numbers."""

import re
from pathlib import Path

import pytest
import yaml

CARDS = sorted((Path(__file__).resolve().parents[2] / "model_cards").glob("*.md"))
MEASURED = ["keye-nano.md", "keye-nano-base.md"]  # the cards of models the repo trains, with figures
HUB_METRIC_KEYS = {"type", "value", "name", "config", "args", "verified"}


def front_matter(card: Path) -> tuple[dict, str]:
    text = card.read_text()
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, f"{card.name}: no YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.name)
def test_front_matter_parses_with_the_hub_keys(card):
    meta, _ = front_matter(card)
    assert meta["library_name"] == "keye" and meta["license"] == "apache-2.0"


@pytest.mark.parametrize("name", MEASURED)
def test_model_index_figures_are_the_tables_figures(name):
    card = next(c for c in CARDS if c.name == name)
    meta, body = front_matter(card)
    (entry,) = meta["model-index"]
    assert entry["name"] == card.stem
    results = entry["results"]
    assert results
    configs = set()
    for result in results:
        dataset = result["dataset"]
        assert result["task"]["type"] and dataset["name"] and dataset["type"]
        configs.add(dataset["config"])
        for metric in result["metrics"]:
            assert metric["type"] == "accuracy" and 0 <= metric["value"] <= 100
            # a comma in an unquoted flow-mapping value starts a new key (with no value): quote such names
            assert set(metric) <= HUB_METRIC_KEYS and None not in metric.values(), f"{name}: {metric}"
            written = {f"{metric['value']:.1f}%", f"{metric['value']:g}%"}  # 44.5 as 44.5%, 34.25 as 34.25%
            assert any(w in body for w in written), f"{name}: {metric['value']} ({dataset['config']}) in no table"
    assert len(configs) == len(results)  # one result per split and mode
