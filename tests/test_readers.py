"""Readers: the cleaned MEL layout, MELBench raw JSON (both shapes) and the JSONL format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import melbench_records, write_cleaned, write_jsonl

from otmel.data.images import ImageFolder
from otmel.data.readers import BadRecordsError, join_attrs, read_dataset


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cleaned")
    write_cleaned(root)
    return root


def test_cleaned_entities_follow_qid2id_and_resolve_images(cleaned: Path) -> None:
    ds = read_dataset(cleaned, "cleaned")
    assert [e.qid for e in ds.entities] == ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6"]  # file order is Q3, Q1, ...
    by = {e.qid: e for e in ds.entities}
    assert by["Q1"].name == "Barack Obama"  # URL-quoted name unquoted
    assert by["Q1"].attrs == "President. born 1961"
    assert by["Q2"].attrs == "occupation: singer"
    assert by["Q3"].attrs == "a city" and by["Q4"].attrs == ""
    kb = cleaned / "kb_image"
    assert by["Q1"].image == (kb / "Q1.jpg").read_bytes()
    assert by["Q2"].image == (kb / "Q2.jpg").read_bytes()  # listed as Q2.png
    assert by["Q4"].image == (kb / "Q4.jpg").read_bytes()  # first candidate is garbage: next readable one
    assert by["Q3"].image is None and by["Q5"].image is None and by["Q6"].image is None
    assert ds.stats["kg_missing_image"] == 1
    assert ds.stats["kg_unreadable_image"] == 1
    assert ds.stats["kg_no_image"] == 1


def test_cleaned_mentions_skip_nil_and_normalise_image_names(cleaned: Path) -> None:
    ds = read_dataset(cleaned, "cleaned")
    assert {s: len(m) for s, m in ds.splits.items()} == {"train": 6, "dev": 2, "test": 3}
    assert [m.id for m in ds.splits["train"]] == ["m1", "m2", "m3", "m5", "m6", "m7"]
    assert ds.stats["nil_skipped"] == 2
    assert all(m.answer != "nil" for ms in ds.splits.values() for m in ms)
    mimg = cleaned / "mention_image"
    train = {m.id: m for m in ds.splits["train"]}
    assert train["m2"].image == (mimg / "m2.jpg").read_bytes()  # imgPath m2.png
    assert train["m5"].image == (mimg / "m5.jpg").read_bytes()  # imgPath without extension
    assert train["m3"].image is None and train["m6"].image is None and train["m7"].image is None
    assert ds.stats["mention_missing_image"] == 1
    assert ds.stats["mention_unreadable_image"] == 1
    assert train["m1"].sentence == "the Obama was in paris" and train["m1"].mention == "Obama"
    assert not ds.bad


def test_cleaned_without_qid2id_uses_file_order(tmp_path: Path) -> None:
    write_cleaned(tmp_path)
    (tmp_path / "qid2id.json").unlink()
    ds = read_dataset(tmp_path, "cleaned", load_images=False)
    assert [e.qid for e in ds.entities] == ["Q3", "Q1", "Q2", "Q4", "Q5", "Q6"]


def test_lazy_images_keep_references_only(cleaned: Path) -> None:
    ds = read_dataset(cleaned, "cleaned", load_images=False)
    assert all(e.image is None for e in ds.entities)
    assert all(m.image is None for ms in ds.splits.values() for m in ms)
    refs = dict(zip([e.qid for e in ds.entities], ds.entity_images, strict=True))
    assert refs["Q2"] == (str(cleaned / "kb_image" / "Q2.jpg"),)
    assert refs["Q3"] == ()  # declared, not found
    assert refs["Q6"] is None  # none declared
    assert len(refs["Q4"]) == 2


def test_bad_records_are_listed_not_raised(tmp_path: Path) -> None:
    write_cleaned(tmp_path, bad=True)
    ds = read_dataset(tmp_path, "cleaned", load_images=False)
    bad = {(b.file, b.id) for b in ds.bad}
    assert bad == {("toy_train.json", "m8"), ("toy_dev.json", "d4")}
    assert len(ds.splits["train"]) == 6 and len(ds.splits["dev"]) == 2  # the good ones are kept
    with pytest.raises(BadRecordsError) as err:
        ds.raise_if_bad()
    msg = str(err.value)
    assert "m8" in msg and "toy_train.json" in msg and "d4" in msg and "Q999" in msg


def test_melbench_string_shape_split(tmp_path: Path) -> None:
    path = tmp_path / "mb.json"
    path.write_text(json.dumps(melbench_records(100)))
    ds = read_dataset(path, "melbench")
    sizes = {s: len(m) for s, m in ds.splits.items()}
    assert sizes == {"train": 70, "dev": 10, "test": 20}
    ids = [m.id for ms in ds.splits.values() for m in ms]
    assert sorted(ids) == sorted(f"Q{i + 1}" for i in range(100))  # each once, ids as in the file
    assert len(ds.entities) == 100 and all(e.attrs == "" and e.image is None for e in ds.entities)
    assert [e.qid for e in ds.entities][:3] == ["Q1", "Q2", "Q3"]  # natural QID order
    by = {e.qid: e.name for e in ds.entities}
    assert by["Q5"] == "E4"
    again = read_dataset(path, "melbench")
    assert {s: [m.id for m in ms] for s, ms in again.splits.items()} == {
        s: [m.id for m in ms] for s, ms in ds.splits.items()
    }
    other = read_dataset(path, "melbench", split_seed=1)
    assert [m.id for m in other.splits["test"]] != [m.id for m in ds.splits["test"]]
    half = read_dataset(path, "melbench", split_ratios=(0.5, 0.25, 0.25))
    assert {s: len(m) for s, m in half.splits.items()} == {"train": 50, "dev": 25, "test": 25}


def test_melbench_list_shape(tmp_path: Path) -> None:
    path = tmp_path / "mb.json"
    path.write_text(json.dumps(melbench_records(50, shape="list")))
    ds = read_dataset(path, "melbench")
    mentions = [m for ms in ds.splits.values() for m in ms]
    assert len(mentions) == 100 - 10  # the second mention of every fifth record is nil
    assert ds.stats["nil_skipped"] == 10
    assert {m.id for m in mentions} >= {"Q1#0", "Q2#0", "Q2#1"}
    assert len(ds.entities) == 50 + 7
    # both mentions of a record are in the same split
    split_of = {m.id: s for s, ms in ds.splits.items() for m in ms}
    assert all(split_of[f"Q{i}#0"] == split_of[f"Q{i}#1"] for i in range(2, 51) if f"Q{i}#1" in split_of)
    q2 = {m.id: m for m in mentions}["Q2#1"]
    assert q2.mention == "n1" and q2.answer == "Q1001"


def test_melbench_bad_parallel_lists(tmp_path: Path) -> None:
    data = melbench_records(10, shape="list")
    data["Q3"]["answer"] = ["Q3"]  # one answer for two mentions
    del data["Q4"]["sentence"]
    path = tmp_path / "mb.json"
    path.write_text(json.dumps(data))
    ds = read_dataset(path, "melbench")
    assert {b.id for b in ds.bad} == {"Q3", "Q4"}
    assert all(not m.id.startswith(("Q3#", "Q4#")) for ms in ds.splits.values() for m in ms)


def test_jsonl_format(tmp_path: Path) -> None:
    write_jsonl(tmp_path)
    ds = read_dataset(tmp_path, "jsonl")
    assert [e.qid for e in ds.entities] == ["A", "B", "C"]
    assert ds.entities[0].attrs == "first. letter" and ds.entities[2].attrs == ""
    assert ds.entities[0].image == (tmp_path / "images" / "e1.jpg").read_bytes()
    assert {s: [m.id for m in ms] for s, ms in ds.splits.items()} == {
        "train": ["1", "2"],
        "dev": ["3"],
        "test": ["5"],
    }
    assert ds.splits["train"][0].image == (tmp_path / "images" / "q1.jpg").read_bytes()  # named q1.png
    assert ds.splits["test"][0].image is None
    assert ds.stats["mention_missing_image"] == 1 and ds.stats["nil_skipped"] == 1


def test_image_folder_resolution(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("abc.jpg", "noext", "two.jpeg", "two.png", "sub/x.jpg", "UP.JPG"):
        (tmp_path / name).write_bytes(b"x")
    folder = ImageFolder(tmp_path)
    assert folder.resolve("abc.png") == str(tmp_path / "abc.jpg")
    assert folder.resolve("abc") == str(tmp_path / "abc.jpg")
    assert folder.resolve("noext.jpg") == str(tmp_path / "noext")
    assert folder.resolve("two") == str(tmp_path / "two.jpeg")  # .jpeg preferred over .png
    assert folder.resolve("two.png") == str(tmp_path / "two.png")  # exact name wins
    assert folder.resolve("sub/x.png") == str(tmp_path / "sub" / "x.jpg")
    assert folder.resolve("UP.jpg") == str(tmp_path / "UP.JPG")
    assert folder.resolve("nothere.jpg") is None and folder.resolve("") is None


def test_join_attrs() -> None:
    assert join_attrs(["a", "", " b "]) == "a. b"
    assert join_attrs({"born": 1961, "job": ["x", "y"]}) == "born: 1961. job: x. y"
    assert join_attrs(None) == "" and join_attrs("  s ") == "s"
