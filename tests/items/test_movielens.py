"""MovieLens-100K reader: the item file inside the recbole wheel becomes catalogue records."""

import zipfile

import pytest

from keye.errors import KeyeInputError
from keye.items.catalogue import iter_catalogue
from keye.items.movielens import ITEM_FILE, movielens_items, recbole_wheel, write_catalogue

HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"


def fake_wheel(path, body: str, header: str = HEADER):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(ITEM_FILE, header + body)
    return path


def test_items_parse_into_a_catalogue(tmp_path):
    body = "1\tToy Story\t1995\tAnimation Children's Comedy\n2\tUsual Suspects, The \"Quoted\"\t\tCrime Thriller\n"
    wheel = fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl", body)
    records = movielens_items(wheel)
    assert records == [
        {"pid": 1, "title": "Toy Story", "caption": "Released 1995. Genres: Animation, Children's, Comedy"},
        {"pid": 2, "title": 'Usual Suspects, The "Quoted"', "caption": "Genres: Crime, Thriller"},
    ]
    items = list(iter_catalogue(write_catalogue(records, tmp_path / "cat.jsonl")))
    assert [i.pid for i in items] == [1, 2] and items[1].texts["title"] == 'Usual Suspects, The "Quoted"'
    assert recbole_wheel(tmp_path) == wheel  # a cached wheel is reused, nothing downloaded


def test_unexpected_header_is_an_input_error(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", "1\tx\t1995\tDrama\n", header="id\tname\tyear\tgenre\n")
    with pytest.raises(KeyeInputError, match="unexpected header"):
        movielens_items(wheel)
