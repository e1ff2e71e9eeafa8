"""Tests for models/data.py: parsing rules, error messages, vocabulary, encoding and batching.

All rows here are invented; the real DBPedia files are only read by path (and skipped if absent).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import data as D
from models.data import (
    DEFAULT_DATASET,
    Batch,
    DataError,
    Dataset,
    Split,
    Vocab,
    build_vocab,
    load_dataset,
    minibatches,
    one_hot,
    read_split,
    resolve_dataset,
)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TRAIN = ("Zorb_Fen\tPlace\nKl%C3%BCpfel_Moor\tPerson\nAlbo_Tusk\tWork\n"
         "quill_%26_sons\tOrganisation\n")
VALID = "Nix_Varp\tPerson\nOrt_Ley\tPlace\n"
TEST = "Grob_Quen\tWork\nYelp_Dax\tPerson\n"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def make_dataset(tmp_path: Path, train: str = TRAIN, valid: str = VALID, test: str = TEST,
                 name: str = "toy") -> Path:
    prefix = tmp_path / name
    write(Path(f"{prefix}.train"), train)
    write(Path(f"{prefix}.valid"), valid)
    write(Path(f"{prefix}.test"), test)
    return prefix


def assert_one_line_error(exc: pytest.ExceptionInfo[DataError], path: Path,
                          lineno: int | None = None) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "\r" not in msg
    assert " — " in msg, msg
    if lineno is None:
        assert msg.startswith(f"{path}: "), msg
    else:
        assert msg.startswith(f"{path}:{lineno}: "), msg
    return msg


# --------------------------------------------------------------------------------------------------
# read_split: accepted formats


def test_read_split_lf(tmp_path: Path) -> None:
    p = write(tmp_path / "a.train", "Foo_Bar\tPlace\nBaz\tPerson\n")
    assert read_split(p) == [(1, "Foo_Bar", "Place"), (2, "Baz", "Person")]


def test_read_split_crlf_and_percent_decoding(tmp_path: Path) -> None:
    p = write(tmp_path / "a.train", "Kl%C3%BCpfel_Moor\tPerson\r\nA%26B\tWork\r\n")
    assert read_split(p) == [(1, "Klüpfel_Moor", "Person"), (2, "A&B", "Work")]


def test_read_split_mixed_endings_no_final_newline(tmp_path: Path) -> None:
    p = write(tmp_path / "a.train", "One\tPlace\r\nTwo\tWork\nThree\tPerson")
    assert read_split(p) == [(1, "One", "Place"), (2, "Two", "Work"), (3, "Three", "Person")]


def test_read_split_bom_is_ignored(tmp_path: Path) -> None:
    p = write(tmp_path / "a.train", b"\xef\xbb\xbfFirst\tPlace\r\nSecond\tWork\r\n")
    rows = read_split(p)
    assert rows == [(1, "First", "Place"), (2, "Second", "Work")]
    assert "\ufeff" not in rows[0][1]


def test_read_split_blank_lines_skipped_but_line_numbers_kept(tmp_path: Path) -> None:
    p = write(tmp_path / "a.train", "\n   \r\nOne\tPlace\n\n \t \nTwo\tWork\n\n\n")
    assert read_split(p) == [(3, "One", "Place"), (6, "Two", "Work")]


def test_read_split_strips_title_and_label(tmp_path: Path) -> None:
    # %20 decodes to a space, which is stripped after decoding; underscores are kept.
    p = write(tmp_path / "a.train", "%20_Foo_%20 \t  Place  \r\n")
    assert read_split(p) == [(1, "_Foo_", "Place")]


def test_read_split_keeps_inner_spaces_and_literal_percent(tmp_path: Path) -> None:
    p = write(tmp_path / "a.train", "100%_Pure Gold\tWork\n")
    assert read_split(p) == [(1, "100%_Pure Gold", "Work")]


def test_read_split_accepts_str_path(tmp_path: Path) -> None:
    p = write(tmp_path / "a.train", "X\tY\n")
    assert read_split(str(p)) == [(1, "X", "Y")]


def test_read_split_does_not_split_on_unicode_line_separators(tmp_path: Path) -> None:
    # str.splitlines() would break this row in two at U+2028 / U+0085.
    p = write(tmp_path / "a.train", "A\u2028B\x85C\tWork\n")
    assert read_split(p) == [(1, "A\u2028B\x85C", "Work")]


# --------------------------------------------------------------------------------------------------
# read_split: errors


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.train"
    with pytest.raises(DataError) as exc:
        read_split(p)
    assert "no such file" in assert_one_line_error(exc, p)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    p = tmp_path / "dir.train"
    p.mkdir()
    with pytest.raises(DataError) as exc:
        read_split(p)
    assert "directory" in assert_one_line_error(exc, p)


@pytest.mark.parametrize("content",
                         [b"", b"\n\n", b"  \r\n\t\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    p = write(tmp_path / "e.train", content)
    with pytest.raises(DataError) as exc:
        read_split(p)
    assert "no data rows" in assert_one_line_error(exc, p)


@pytest.mark.parametrize("line, what", [
    ("NoTabHere Place", "no tab"),
    ("Two\tTabs\tPlace", "2 tabs"),
    ("Trailing\tPlace\t", "2 tabs"),
])
def test_wrong_number_of_tabs(tmp_path: Path, line: str, what: str) -> None:
    p = write(tmp_path / "t.train", f"Good\tPlace\r\n\r\n{line}\r\nAlso_Good\tWork\r\n")
    with pytest.raises(DataError) as exc:
        read_split(p)
    assert what in assert_one_line_error(exc, p, 3)


@pytest.mark.parametrize("title", ["", "   ", "%20", "%20%09"])
def test_empty_title(tmp_path: Path, title: str) -> None:
    p = write(tmp_path / "t.train", f"Good\tPlace\n{title}\tPerson\n")
    with pytest.raises(DataError) as exc:
        read_split(p)
    assert "empty title" in assert_one_line_error(exc, p, 2)


@pytest.mark.parametrize("label", ["", "  ", "\r"])
def test_empty_label(tmp_path: Path, label: str) -> None:
    p = write(tmp_path / "t.train", f"Good\tPlace\nTitle\t{label}\n")
    with pytest.raises(DataError) as exc:
        read_split(p)
    assert "empty label" in assert_one_line_error(exc, p, 2)


def test_invalid_utf8_bytes_name_the_line(tmp_path: Path) -> None:
    p = write(tmp_path / "t.train", b"Good\tPlace\r\nAlso\tWork\r\nBad\xff\xfeTitle\tPerson\r\n")
    with pytest.raises(DataError) as exc:
        read_split(p)
    assert "UTF-8" in assert_one_line_error(exc, p, 3)


def test_latin1_file_is_rejected(tmp_path: Path) -> None:
    p = write(tmp_path / "t.train", "Caf\u00e9\tPlace\n".encode("latin-1"))
    with pytest.raises(DataError) as exc:
        read_split(p)
    assert_one_line_error(exc, p, 1)


@pytest.mark.parametrize("title", ["Euro_%E2%82", "%C3", "%FF_x", "A%C3%28B", "%ED%A0%80"])
def test_broken_percent_escape(tmp_path: Path, title: str) -> None:
    p = write(tmp_path / "t.train", f"Good\tPlace\r\n{title}\tWork\r\n")
    with pytest.raises(DataError) as exc:
        read_split(p)
    msg = assert_one_line_error(exc, p, 2)
    assert "percent" in msg and title in msg


def test_error_message_stays_one_line_for_nasty_content(tmp_path: Path) -> None:
    # A title whose excerpt contains a carriage return must not break the message in two.
    p = write(tmp_path / "t.train", "A\rB\tC\tD\n")
    with pytest.raises(DataError) as exc:
        read_split(p)
    assert_one_line_error(exc, p, 1)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------------------------------
# load_dataset and the vocabulary


def test_load_dataset_labels_sorted_and_ids(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path))
    assert isinstance(ds, Dataset)
    assert ds.vocab.labels == ("Organisation", "Person", "Place", "Work")
    assert ds.vocab.num_labels == 4
    assert ds.train.label_ids.dtype == np.int64
    assert ds.train.label_ids.tolist() == [2, 1, 3, 0]
    assert ds.valid.label_ids.tolist() == [1, 2]
    assert ds.test.label_ids.tolist() == [3, 1]
    assert ds.train.titles[1] == "Klüpfel_Moor" and ds.train.titles[3] == "quill_&_sons"
    assert [len(ds.train), len(ds.valid), len(ds.test)] == [4, 2, 2]
    assert ds.train.unknown_labels == ds.valid.unknown_labels == ds.test.unknown_labels == []
    assert ds.train.path == Path(f"{tmp_path / 'toy'}.train")
    assert ds.prefix == tmp_path / "toy"


def test_load_dataset_accepts_str_prefix_with_dots(tmp_path: Path) -> None:
    prefix = make_dataset(tmp_path, name="v1.2.toy")
    ds = load_dataset(str(prefix))
    assert ds.valid.path == Path(f"{prefix}.valid")


def test_char_dictionary_space_first_then_code_point_order(tmp_path: Path) -> None:
    prefix = make_dataset(tmp_path, train="b a\tX\nÉ\tY\n", valid="c\tX\n", test="z!\tY\n")
    ds = load_dataset(prefix)
    chars = ds.vocab.chars
    assert chars[" "] == 0
    assert list(chars) == [" ", "!", "a", "b", "c", "z", "É"]
    assert sorted(chars.values()) == list(range(len(chars)))
    assert ds.vocab.num_chars == 7


def test_space_is_zero_even_if_absent(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path, train="ab\tX\n", valid="b\tX\n", test="c\tX\n"))
    assert ds.vocab.chars == {" ": 0, "a": 1, "b": 2, "c": 3}


def test_vocab_includes_valid_and_test_characters(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path, train="a\tX\n", valid="%C3%9F\tX\n", test="€\tX\n"))
    assert {"a", "ß", "€"} <= set(ds.vocab.chars)


def test_vocab_is_deterministic_regardless_of_row_order(tmp_path: Path) -> None:
    a = load_dataset(make_dataset(tmp_path, name="a"))
    rev = "".join(reversed(TRAIN.splitlines(keepends=True)))
    b = load_dataset(make_dataset(tmp_path, train=rev, name="b"))
    assert list(a.vocab.chars.items()) == list(b.vocab.chars.items())
    assert a.vocab.labels == b.vocab.labels


def test_unknown_valid_label_is_error(tmp_path: Path) -> None:
    prefix = make_dataset(tmp_path, valid="Nix\tPerson\n\nOops\tMineral\nMore\tMineral\n")
    with pytest.raises(DataError) as exc:
        load_dataset(prefix)
    msg = assert_one_line_error(exc, Path(f"{prefix}.valid"), 3)
    assert "'Mineral'" in msg and "2 rows" in msg


def test_unknown_test_label_is_kept_and_recorded(tmp_path: Path) -> None:
    test = "Grob\tWork\r\n\r\nStone\tMineral\r\nYelp\tPerson\r\n"
    ds = load_dataset(make_dataset(tmp_path, test=test))
    assert ds.test.titles == ["Grob", "Stone", "Yelp"]
    assert ds.test.label_ids.tolist() == [3, -1, 1]
    assert ds.test.unknown_labels == [(3, "Mineral")]
    assert "Mineral" not in ds.vocab.labels


@pytest.mark.parametrize("missing", ["train", "valid", "test"])
def test_missing_split_file(tmp_path: Path, missing: str) -> None:
    prefix = make_dataset(tmp_path)
    Path(f"{prefix}.{missing}").unlink()
    with pytest.raises(DataError) as exc:
        load_dataset(prefix)
    msg = assert_one_line_error(exc, prefix)
    assert f"{prefix}.{missing}" in msg


def test_errors_in_any_split_name_that_file(tmp_path: Path) -> None:
    prefix = make_dataset(tmp_path, test="ok\tWork\nbroken line\n")
    with pytest.raises(DataError) as exc:
        load_dataset(prefix)
    assert_one_line_error(exc, Path(f"{prefix}.test"), 2)


def test_vocab_validation() -> None:
    with pytest.raises(ValueError):
        Vocab(chars={"a": 0, " ": 1}, labels=("A",))
    with pytest.raises(ValueError):
        Vocab(chars={" ": 0, "a": 2}, labels=("A",))
    with pytest.raises(ValueError):
        Vocab(chars={" ": 0, "ab": 1}, labels=("A",))
    with pytest.raises(ValueError):
        Vocab(chars={" ": 0}, labels=("B", "A"))


# --------------------------------------------------------------------------------------------------
# encode_titles


@pytest.fixture
def vocab() -> Vocab:
    return build_vocab(["abc de", "xyz", "é😀"], ["Place", "Person"])


def naive_encode(vocab: Vocab, titles: list[str], max_len: int) -> np.ndarray:
    out = np.full((len(titles), max_len), -1, dtype=np.int32)
    for i, t in enumerate(titles):
        for j, c in enumerate(t[:max_len]):
            out[i, j] = vocab.chars.get(c, -1)
    return out


def test_encode_truncates_and_pads(vocab: Vocab) -> None:
    codes = vocab.encode_titles(["abc de", "x", ""], 4)
    assert codes.dtype == np.int32 and codes.shape == (3, 4)
    a, b, c, d, x = (vocab.chars[ch] for ch in "abcdx")
    assert codes.tolist() == [[a, b, c, 0], [x, -1, -1, -1], [-1, -1, -1, -1]]


def test_encode_unknown_characters_are_minus_one(vocab: Vocab) -> None:
    # 'q' is below the largest known code point, '\U0010ffff' beyond the lookup table.
    codes = vocab.encode_titles(["aqé\U0010ffff😀"], 6)
    assert codes.tolist() == [[vocab.chars["a"], -1, vocab.chars["é"], -1, vocab.chars["😀"], -1]]


def test_encode_empty_inputs(vocab: Vocab) -> None:
    assert vocab.encode_titles([], 5).shape == (0, 5)
    assert vocab.encode_titles(["", ""], 3).tolist() == [[-1] * 3] * 2


def test_encode_rejects_bad_arguments(vocab: Vocab) -> None:
    with pytest.raises(ValueError):
        vocab.encode_titles(["abc"], 0)
    with pytest.raises(TypeError):
        vocab.encode_titles("abc", 3)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="abcdexyz é😀q\U0010ffff", max_size=12), max_size=8),
       st.integers(1, 10))
def test_encode_matches_naive(titles: list[str], max_len: int) -> None:
    vocab = build_vocab(["abc de", "xyz", "é😀"], ["A"])
    np.testing.assert_array_equal(vocab.encode_titles(titles, max_len),
                                  naive_encode(vocab, titles, max_len))


# --------------------------------------------------------------------------------------------------
# one_hot and minibatches


def test_one_hot_matches_naive_loop() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(-1, 7, size=(5, 9))
    got = one_hot(x, 7)
    want = np.zeros((5, 9, 7))
    for i in range(5):
        for j in range(9):
            if x[i, j] >= 0:
                want[i, j, x[i, j]] = 1.0
    assert got.shape == (5, 9, 7) and got.dtype == np.float64
    np.testing.assert_array_equal(got, want)


def test_one_hot_dtype_and_errors() -> None:
    assert one_hot(np.array([[0, -1]]), 3, dtype=np.float32).dtype == np.float32
    with pytest.raises(ValueError):
        one_hot(np.array([[3]]), 3)
    with pytest.raises(ValueError):
        one_hot(np.array([[-2]]), 3)
    with pytest.raises(TypeError):
        one_hot(np.array([[0.5]]), 3)


def make_codes(n: int, max_len: int = 4) -> tuple[np.ndarray, np.ndarray]:
    codes = np.arange(n * max_len, dtype=np.int32).reshape(n, max_len)
    label_ids = np.arange(n, dtype=np.int64) % 3
    return codes, label_ids


@pytest.mark.parametrize("n, batch_size", [(10, 3), (9, 3), (1, 5), (7, 1), (5, 100)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_minibatches_cover_every_row_once(n: int, batch_size: int, shuffle: bool) -> None:
    codes, ids = make_codes(n)
    rng = np.random.default_rng(0) if shuffle else None
    batches = list(minibatches(codes, ids, 3, batch_size, rng))
    assert all(isinstance(b, Batch) for b in batches)
    sizes = [len(b.rows) for b in batches]
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    rows = np.concatenate([b.rows for b in batches])
    assert sorted(rows.tolist()) == list(range(n))
    if not shuffle:
        assert rows.tolist() == list(range(n))
    for b in batches:
        assert b.rows.dtype == np.int64
        np.testing.assert_array_equal(b.x, codes[b.rows])
        assert b.x.dtype == np.int32


@pytest.mark.parametrize("gather", [1, 3 * 4 * 4, 5 * 4 * 4])  # blocks of one batch, of three, of five (ends mid-data)
def test_minibatches_gathered_in_blocks_are_the_batches_gathered_one_by_one(monkeypatch, gather: int) -> None:
    """Rows are gathered a block of batches at a time (data.GATHER_ELEMENTS): every batch's codes and
    labels are still its own rows', whichever block it falls in."""
    import models.data as data

    codes, _ = make_codes(23)
    ids = np.arange(23) % 3
    monkeypatch.setattr(data, "GATHER_ELEMENTS", gather)
    batches = list(minibatches(codes, ids, 3, 4, np.random.default_rng(1)))
    assert [len(b.rows) for b in batches] == [4] * 5 + [3]
    assert sorted(np.concatenate([b.rows for b in batches]).tolist()) == list(range(23))
    for b in batches:
        np.testing.assert_array_equal(b.x, codes[b.rows])
        np.testing.assert_array_equal(b.y, np.eye(3)[ids[b.rows]])


def test_minibatches_empty() -> None:
    codes, ids = make_codes(0)
    assert list(minibatches(codes, ids, 3, 4)) == []


def test_minibatches_seeded_reproducible_and_epochs_differ() -> None:
    codes, ids = make_codes(50)

    def epochs(seed: int) -> list[list[int]]:
        rng = np.random.default_rng(seed)
        return [np.concatenate([b.rows for b in minibatches(codes, ids, 3, 8, rng)]).tolist()
                for _ in range(3)]

    first, again = epochs(42), epochs(42)
    assert first == again
    assert first[0] != first[1] != first[2]
    assert first[0] != list(range(50))
    assert epochs(43) != first


def test_minibatches_y_is_one_hot_of_labels() -> None:
    codes, _ = make_codes(7)
    ids = np.array([0, 2, -1, 1, 2, -1, 0])
    for b in minibatches(codes, ids, 3, 3, np.random.default_rng(5), dtype=np.float32):
        assert b.y.dtype == np.float32 and b.y.shape == (len(b.rows), 3)
        for r, row in zip(b.rows, b.y):
            if ids[r] == -1:
                assert not row.any()
            else:
                assert row.tolist() == [float(j == ids[r]) for j in range(3)]


def test_minibatches_argument_checks() -> None:
    codes, ids = make_codes(4)
    with pytest.raises(ValueError):
        list(minibatches(codes, ids, 3, 0))
    with pytest.raises(ValueError):
        list(minibatches(codes, ids[:3], 3, 2))
    with pytest.raises(ValueError):
        list(minibatches(codes, ids, 2, 2))  # label id 2 out of range for 2 labels
    with pytest.raises(ValueError):
        list(minibatches(codes[:, 0], ids, 3, 2))


# --------------------------------------------------------------------------------------------------
# resolve_dataset


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake shipped-data folder holding 'demo' and 'other', used instead of the real ones."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    make_dataset(folder, name="demo")
    make_dataset(folder, name="other")
    monkeypatch.setattr(D, "shipped_data_dirs", lambda: [tmp_path / "absent", folder])
    return folder


def test_resolve_existing_prefix_returned_as_is(tmp_path: Path, shipped: Path) -> None:
    prefix = make_dataset(tmp_path, name="local")
    assert resolve_dataset(prefix) == prefix
    assert resolve_dataset(str(prefix)) == prefix


def test_resolve_bare_name_in_shipped_data(shipped: Path) -> None:
    assert resolve_dataset("other") == shipped / "other"
    assert resolve_dataset(DEFAULT_DATASET) == shipped / "demo"


def test_resolve_local_prefix_shadows_shipped(tmp_path: Path, shipped: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset(tmp_path, name="demo")
    monkeypatch.chdir(tmp_path)
    assert resolve_dataset("demo") == Path("demo")


def test_resolve_unknown_bare_name(tmp_path: Path, shipped: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as exc:
        resolve_dataset("nonexistent")
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(shipped / "nonexistent.train") in msg and str(tmp_path / "absent") in msg
    assert "shipped datasets: demo, other" in msg


def test_resolve_path_not_searched_in_shipped(tmp_path: Path, shipped: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Only a bare name is looked up in the shipped folder; "sub/demo" is a path, even though
    # shipped/sub/demo.train happens to exist.
    (shipped / "sub").mkdir()
    make_dataset(shipped / "sub", name="demo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as exc:
        resolve_dataset(os.path.join("sub", "demo"))
    assert str(shipped) not in str(exc.value).split("shipped datasets")[0]


def test_resolve_hints_at_split_suffix(tmp_path: Path, shipped: Path) -> None:
    prefix = make_dataset(tmp_path, name="local")
    with pytest.raises(DataError) as exc:
        resolve_dataset(f"{prefix}.train")
    assert "drop the .train suffix" in str(exc.value)


def test_resolve_empty_name(shipped: Path) -> None:
    with pytest.raises(DataError):
        resolve_dataset("")


def test_shipped_data_dirs_defaults() -> None:
    dirs = D.shipped_data_dirs()
    assert dirs[0] == Path(D.__file__).resolve().parent.parent / "data"
    assert Path(sys.prefix) / "share" / "symdiff" / "data" in dirs


def test_default_dataset_resolves_if_shipped() -> None:
    demo = Path(D.__file__).resolve().parent.parent / "data" / "demo.train"
    if not demo.exists():
        pytest.skip(f"demo data not written yet at {demo}")
    assert Path(f"{resolve_dataset(DEFAULT_DATASET)}.train").resolve() == demo


# --------------------------------------------------------------------------------------------------
# Real data (read by path only, never copied)


def count_rows(path: Path) -> int:
    return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())


@pytest.mark.parametrize("name", ["tiny", "smaller"])
def test_real_dbpedia_data(name: str) -> None:
    prefix = REAL_DATA / name
    if not Path(f"{prefix}.train").exists():
        pytest.skip(f"real DBPedia data not found at {prefix}.*")
    ds = load_dataset(prefix)
    assert ds.vocab.labels == ("Organisation", "Person", "Place", "Species", "Work")
    for split in (ds.train, ds.valid, ds.test):
        assert isinstance(split, Split)
        assert len(split) == count_rows(split.path) == len(split.label_ids)
        assert all(t and t == t.strip() for t in split.titles)
        assert all("%C3" not in t for t in split.titles)  # decoded
        assert split.label_ids.min() >= 0
        assert split.unknown_labels == []
    assert ds.vocab.chars[" "] == 0


def test_real_data_one_epoch_covers_every_row() -> None:
    # speed is measured by the benchmark, not asserted here (the machine is shared)
    prefix = REAL_DATA / "smaller"
    if not Path(f"{prefix}.train").exists():
        pytest.skip(f"real DBPedia data not found at {prefix}.*")
    ds = load_dataset(prefix)
    codes = ds.vocab.encode_titles(ds.train.titles, 10)
    rows = np.concatenate([b.rows for b in minibatches(codes, ds.train.label_ids, ds.vocab.num_labels,
                                                       64, np.random.default_rng(0))])
    assert np.array_equal(np.sort(rows), np.arange(len(ds.train)))


# --------------------------------------------------------------------------------------------------
# Fuzzing read_split

line_parts = st.sampled_from(["a", "Zz", "_", " ", "\t", "\r\n", "\n", "\r", "%", "%2", "%41",
                              "%C3%A9", "%E2%82", "%FF", "%ZZ", "é", "\ufeff", "\x00", "Place"])
fuzz_text = st.lists(line_parts, max_size=30).map(lambda parts: "".join(parts).encode("utf-8"))
fuzz_bytes = st.one_of(st.binary(max_size=200), fuzz_text,
                       st.tuples(st.sampled_from([b"", b"\xef\xbb\xbf"]), fuzz_text,
                                 st.binary(max_size=5))
                       .map(lambda t: b"".join(t)))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=fuzz_bytes)
def test_fuzz_read_split_only_raises_data_error(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "fuzz.train"
    p.write_bytes(content)
    try:
        rows = read_split(p)
    except DataError as exc:
        msg = str(exc)
        assert msg.startswith(str(p)) and "\n" not in msg
        return
    assert rows
    for lineno, title, label in rows:
        assert lineno >= 1 and title and label
        assert title == title.strip() and label == label.strip() and "\t" not in label
