"""TFDS builders: every format prepares to array_record and reads back, TensorFlow absent."""

import importlib.util
import json
from pathlib import Path

import pytest

from train.data import builders
from train.data import records as rec
from train.data.records import BadRecordError

SHAKESPEARE = Path(__file__).resolve().parent.parent / ".." / "shared/data/tinyshakespeare.txt"


def write_jsonl(path, rows):
    """Rows are objects (dumped) or raw bytes lines (written as-is)."""
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            f.write(b"\n")
    return str(path)


def as_text(value):
    return value.decode() if isinstance(value, bytes) else value


def read_all(prepared, split="train"):
    source = prepared.source(split)
    return [source[i] for i in range(len(source))]


def test_tensorflow_is_absent():
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("the [tf] extra is installed here")
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401


@pytest.mark.parametrize(
    ("mode", "want"),
    [
        ("file", {"alpha\n\nbeta\ngamma\n", "delta 😀\n"}),
        ("blank_line", {"alpha", "beta\ngamma", "delta 😀"}),
    ],
)
def test_text_files(tmp_path, mode, want):
    (tmp_path / "a.txt").write_text("alpha\n\nbeta\ngamma\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("delta 😀\n", encoding="utf-8")
    prepared = builders.prepare("text", str(tmp_path / "*.txt"), str(tmp_path / "tfds"), mode)
    assert {as_text(r["text"]) for r in read_all(prepared)} == want


def test_split_document_bounds_pieces_and_loses_nothing():
    text = "word " * 50 + "x" * 70 + "\nend"
    pieces = rec.split_document(text, 32)
    assert "".join(pieces) == text and all(len(p) <= 32 for p in pieces)
    assert pieces[0] == "word " * 6  # cut after a space, not inside a word
    assert rec.split_document("short", 32) == ["short"]
    assert rec.split_document("", 32) == [""]


def test_a_huge_line_is_stored_as_bounded_pieces(tmp_path):
    """A line over MAX_DOC_CHARS becomes consecutive records (unique keys), in order."""
    huge = "1+2=3 " * (rec.MAX_DOC_CHARS // 2)
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "small"}, {"text": huge}])
    prepared = builders.prepare("text", path, str(tmp_path / "tfds"), doc_mode="jsonl")
    texts = [as_text(r["text"]) for r in read_all(prepared)]
    assert len(texts) >= 4 and all(len(t) <= rec.MAX_DOC_CHARS for t in texts)
    assert sorted(texts) == sorted(["small", *rec.split_document(huge)])


def test_text_jsonl_with_bad_lines_skipped(tmp_path):
    path = write_jsonl(
        tmp_path / "docs.jsonl",
        [{"body": "one"}, {"body": "two"}, b"\xff\xfe not utf-8", {"title": "x"}, b"{oops"],
    )
    prepared = builders.prepare(
        "text", path, str(tmp_path / "tfds"), doc_mode="jsonl", text_key="body"
    )
    assert sorted(as_text(r["text"]) for r in read_all(prepared)) == ["one", "two"]
    report = prepared.bad_records
    assert report["total"] == 3
    assert set(report["counts"]) == {"invalid UTF-8", "missing key", "invalid JSON"}
    assert any("docs.jsonl:3" in e for e in report["examples"])
    again = builders.prepare(
        "text", path, str(tmp_path / "tfds"), doc_mode="jsonl", text_key="body"
    )
    assert again.bad_records == report  # reused preparation keeps its summary


def test_sft_formats_and_fail_policy(tmp_path):
    good = [
        {"prompt": "Hi", "response": "Hello 😀", "system": "Be kind."},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", [*good, {"prompt": "no response"}])
    prepared = builders.prepare("sft", path, str(tmp_path / "tfds"))
    rows = sorted(read_all(prepared), key=lambda r: len(r["roles"]))
    assert [as_text(x) for x in rows[0]["roles"]] == ["system", "user", "assistant"]
    assert as_text(rows[0]["contents"][2]) == "Hello 😀"
    assert [as_text(x) for x in rows[1]["contents"]] == ["a", "b", "c", "d"]
    assert prepared.bad_records["counts"] == {"missing key": 1}
    with pytest.raises(BadRecordError, match=r"sft\.jsonl:3: missing key: 'response'"):
        builders.prepare("sft", path, str(tmp_path / "tfds2"), bad_records="fail")


def test_ranked_and_pairwise(tmp_path):
    rows = [
        {"prompt": "Q1", "responses": ["r0", "r1", "r2"], "ranking": [1, 0, 1]},  # tie
        {"prompt": "Q2", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q3", "responses": ["only one"], "ranking": [0]},  # K < 2
        {"prompt": "Q4", "responses": ["a", "b", "c"], "ranking": [0, 2, 2]},  # gap
        {"prompt": "Q5", "responses": ["a", "b"], "ranking": [0, 0]},  # all tied
        {"prompt": "Q6", "responses": ["a", "b"]},  # no ranking
        {"prompt": "Q7", "responses": ["a", "b"], "ranking": [0, 1], "x": "\ud800"},
        {"prompt": "\ud800 lone surrogate", "chosen": "a", "rejected": "b"},
    ]
    prepared = builders.prepare("ranked", write_jsonl(tmp_path / "r.jsonl", rows), tmp_path)
    got = {as_text(r["contents"][0]): r for r in read_all(prepared)}
    assert sorted(got) == ["Q1", "Q2", "Q7"]
    assert [int(x) for x in got["Q1"]["ranks"]] == [1, 0, 1]
    assert [as_text(x) for x in got["Q2"]["responses"]] == ["good", "bad"]
    assert [int(x) for x in got["Q2"]["ranks"]] == [0, 1]
    counts = prepared.bad_records["counts"]
    assert counts == {"K < 2": 1, "bad ranking": 2, "missing key": 1, "invalid UTF-8": 1}


def test_prompts(tmp_path):
    rows = [
        {"prompt": "Tell a story"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
        {"prompt": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ]
    prepared = builders.prepare("prompts", write_jsonl(tmp_path / "p.jsonl", rows), tmp_path)
    roles = sorted(tuple(as_text(x) for x in r["roles"]) for r in read_all(prepared))
    assert roles == [("system", "user"), ("user",)]
    assert prepared.bad_records["counts"] == {"bad role": 1}


def test_config_name_tracks_file_changes_and_splits(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\n\ntwo\n")
    first = builders.prepare("text", str(path), str(tmp_path / "tfds"))
    path.write_text("one\n\ntwo\n\nthree\n")
    second = builders.prepare("text", str(path), str(tmp_path / "tfds"))
    assert first.builder.builder_config.name != second.builder.builder_config.name
    assert len(second.source()) == 3
    (tmp_path / "v.txt").write_text("val\n")
    splits = {"train": str(path), "validation": str(tmp_path / "v.txt")}
    both = builders.prepare("text", splits, str(tmp_path / "tfds"))
    assert len(both.source("validation")) == 1
    with pytest.raises(FileNotFoundError, match="no file matches"):
        builders.prepare("text", str(tmp_path / "nothing*.txt"), str(tmp_path / "tfds"))


def test_open_source_path_wins_over_name(tmp_path):
    (tmp_path / "t.txt").write_text("mine\n")
    source = builders.open_source(
        "text", path=str(tmp_path / "t.txt"), name="no_such_dataset", data_dir=str(tmp_path)
    )
    assert [as_text(source[0]["text"])] == ["mine"]
    with pytest.raises(ValueError, match=r"data\.path"):
        builders.open_source("text")


def test_tiny_shakespeare_preset_from_local_copy(tmp_path):
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is missing")
    assert builders.sha256_file(str(SHAKESPEARE)) == builders.TINY_SHAKESPEARE_SHA256
    sizes = {}
    for split in ("train", "validation", "test"):
        source = builders.open_source(
            "text", name="tiny_shakespeare", split=split, data_dir=str(tmp_path),
            local_copy=str(SHAKESPEARE),
        )  # fmt: skip
        sizes[split] = len(source)
        assert all(as_text(source[i]["text"]).strip() for i in range(0, len(source), 97))
    assert sizes == {"train": 6283, "validation": 441, "test": 500}
    text = SHAKESPEARE.read_text(encoding="utf-8")
    parts = builders.shakespeare_splits(text)
    assert "".join(parts.values()) == text and len(parts["train"]) == int(len(text) * 0.9)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not shakespeare")
    with pytest.raises(ValueError, match="registered tiny_shakespeare"):
        builders.open_source(
            "text", name="tiny_shakespeare", data_dir=str(tmp_path / "w"), local_copy=str(wrong)
        )
