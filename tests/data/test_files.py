"""File-backed sources: round trips, damaged and hostile files named, Grain pipelines."""

import json
import pickle

import numpy as np
import pytest

from jaxmint.data import (
    ArrayRecordSource,
    ByteWindows,
    DataError,
    NpyShards,
    ParquetSource,
    pipeline,
    write_array_record,
    write_npy_shards,
    write_parquet,
)


def arrays(n=100):
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(n, 3, 4)).astype(np.float32),
        "y": (np.arange(n) % 10).astype(np.int32),
        "id": np.arange(n, dtype=np.int64),
    }


WRITERS = {
    "npy": lambda a, p: write_npy_shards(a, p, rows_per_shard=30),
    "arrayrecord": lambda a, p: write_array_record(a, p, rows_per_shard=30),
    "parquet": lambda a, p: write_parquet(a, p, rows_per_group=30),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_round_trip_every_record(tmp_path, kind):
    data = arrays()
    source = WRITERS[kind](data, tmp_path / "ds")
    assert len(source) == 100
    for i in (0, 29, 30, 99):
        record = source[i]
        for k, v in data.items():
            assert record[k].shape == v.shape[1:] and record[k].dtype == v.dtype, (kind, k)
            np.testing.assert_array_equal(record[k], v[i])
    copy = pickle.loads(pickle.dumps(source))  # what worker processes receive
    np.testing.assert_array_equal(copy[57]["x"], data["x"][57])
    with pytest.raises(IndexError):
        source[100]


@pytest.mark.parametrize("kind", WRITERS)
def test_existing_destination_is_kept(tmp_path, kind):
    WRITERS[kind](arrays(), tmp_path / "ds")
    with pytest.raises(DataError, match="exists; pass overwrite=True"):
        WRITERS[kind](arrays(10), tmp_path / "ds")
    assert len(type(WRITERS[kind](arrays(), tmp_path / "again"))(tmp_path / "ds")) == 100


def test_writers_refuse_what_they_cannot_store(tmp_path):
    with pytest.raises(DataError, match="dtype object"):
        write_npy_shards({"x": np.array([{}, {}], dtype=object)}, tmp_path / "a")
    with pytest.raises(DataError, match="cannot name a file"):
        write_npy_shards({"../x": np.zeros(3)}, tmp_path / "b")
    with pytest.raises(DataError, match="differ in their leading"):
        write_npy_shards({"x": np.zeros(3), "y": np.zeros(4)}, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def flip_byte(path, offset_from_end=5):
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_npy_shard_names_the_file_and_record(tmp_path):
    source = write_npy_shards(arrays(), tmp_path / "ds", rows_per_shard=30)
    flip_byte(tmp_path / "ds" / "x-00001.npy")  # a byte of the last record of shard 1
    for i in range(59):
        source[i]  # the other records still read
    with pytest.raises(DataError, match=r"x-00001\.npy: record 29 \(example 59\) does not match"):
        source[59]


def test_truncated_or_reshaped_shard_is_refused_when_opened(tmp_path):
    write_npy_shards(arrays(), tmp_path / "ds", rows_per_shard=30)
    shard = tmp_path / "ds" / "y-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"y-00002\.npy has \d+ bytes, \d+ expected"):
        NpyShards(tmp_path / "ds")
    np.save(shard, np.zeros((30, 2), np.int32))
    with pytest.raises(DataError, match=r"y-00002\.npy holds shape \(30, 2\)"):
        NpyShards(tmp_path / "ds")
    shard.unlink()
    with pytest.raises(DataError, match=r"y-00002\.npy is missing"):
        NpyShards(tmp_path / "ds")


def test_hostile_manifest_is_refused(tmp_path):
    write_npy_shards(arrays(), tmp_path / "ds", rows_per_shard=30)
    manifest_file = tmp_path / "ds" / "jaxmint_shards.json"
    good = json.loads(manifest_file.read_text())
    (tmp_path / "secret.npy").write_bytes(b"")
    cases = {
        "outside its folder": lambda m: m["shards"][0]["files"].update(x="../secret.npy"),
        "dtype object": lambda m: m["keys"]["x"].update(dtype="|O"),
        "format": lambda m: m.update(format="other/9"),
        "hold 100 records, the manifest says 7": lambda m: m.update(num_records=7),
    }
    for message, change in cases.items():
        manifest = json.loads(json.dumps(good))
        change(manifest)
        manifest_file.write_text(json.dumps(manifest))
        with pytest.raises(DataError, match=message):
            NpyShards(tmp_path / "ds")
    manifest_file.write_text("{not json")
    with pytest.raises(DataError, match="not a valid shard manifest"):
        NpyShards(tmp_path / "ds")
    manifest_file.unlink()
    with pytest.raises(DataError, match="has no jaxmint_shards.json"):
        NpyShards(tmp_path / "ds")


def test_damaged_array_record_names_the_file_and_record(tmp_path):
    write_array_record(arrays(), tmp_path / "ds", rows_per_shard=30)
    file = tmp_path / "ds" / "data-00001.array_record"
    raw = bytearray(file.read_bytes())
    x29 = arrays()["x"][59].tobytes()
    at = bytes(raw).find(x29)
    assert at > 0, "records are stored uncompressed"
    raw[at + 3] ^= 0xFF
    file.write_bytes(bytes(raw))
    source = ArrayRecordSource(tmp_path / "ds")
    source[58]
    with pytest.raises(DataError, match=r"data-00001\.array_record: record 29 \(example 59\)"):
        source[59]
    (tmp_path / "junk.array_record").write_bytes(b"not an array record file at all")
    with pytest.raises(DataError, match="junk.array_record"):
        ArrayRecordSource(tmp_path / "junk.array_record")


def test_damaged_parquet_names_the_file_and_row_group(tmp_path):
    data = {"x": np.arange(400, dtype=np.float32).reshape(100, 4), "y": np.arange(100)}
    write_parquet(data, tmp_path / "ds.parquet", rows_per_group=30)
    file = tmp_path / "ds.parquet"
    raw = bytearray(file.read_bytes())
    at = bytes(raw).find(data["x"][65].tobytes())
    assert at > 0
    raw[at + 1] ^= 0xFF
    file.write_bytes(bytes(raw))
    source = ParquetSource(file)
    np.testing.assert_array_equal(source[5]["x"], data["x"][5])
    with pytest.raises(DataError, match=r"ds\.parquet: row group 2 \(examples 60 to 89\)"):
        source[65]
    with pytest.raises(DataError, match=r"has no column\(s\) \['z'\]"):
        ParquetSource(file, columns=["x", "z"])


def take_ids(ds, n):
    it = iter(ds)
    return [next(it)["id"] for _ in range(n)]


def test_pipeline_shards_cover_each_epoch_exactly_once(tmp_path):
    source = write_npy_shards(arrays(96), tmp_path / "ds", rows_per_shard=40)
    # 2 processes, global batch 16: 6 steps are one epoch
    a = take_ids(pipeline(source, 16, seed=1, shard=(0, 2)), 12)
    b = take_ids(pipeline(source, 16, seed=1, shard=(1, 2)), 12)
    assert all(len(x) == 8 for x in a + b)
    for epoch in (0, 1):
        seen = np.concatenate(a[6 * epoch : 6 * epoch + 6] + b[6 * epoch : 6 * epoch + 6])
        assert sorted(seen) == list(range(96)), epoch
    assert not np.array_equal(np.concatenate(a[:6]), np.concatenate(a[6:]))  # reshuffled
    one = take_ids(pipeline(source, 16, seed=1), 6)  # one process: the same global batches
    for k in range(6):
        assert sorted(one[k]) == sorted(np.concatenate([a[k], b[k]]))
    with pytest.raises(DataError, match="not divisible by 3 processes"):
        pipeline(source, 16, shard=(0, 3))
    with pytest.raises(DataError, match="larger than the dataset"):
        pipeline(source, 128)


def test_byte_windows_read_text_files_in_place(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(100)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes(bytes(range(200, 250)))
    (tmp_path / "tiny.txt").write_bytes(b"ab")  # shorter than a window: skipped
    windows = ByteWindows(tmp_path, 8)
    assert len(windows) == 99 // 8 + 49 // 8 == 18
    first, last = windows[0], windows[17]
    np.testing.assert_array_equal(first["x"], np.arange(8))
    np.testing.assert_array_equal(first["y"], np.arange(1, 9))
    np.testing.assert_array_equal(last["x"], np.arange(240, 248))  # never across files
    assert first["x"].dtype == np.int32
    train, test = ByteWindows(tmp_path, 8, split=(0, 0.5)), ByteWindows(tmp_path, 8, split=(0.5, 1))
    assert len(train) + len(test) == 18
    np.testing.assert_array_equal(test[0]["x"], windows[9]["x"])
    assert test.arrays()["x"].shape == (9, 8)
    with pytest.raises(DataError, match="no file longer than seq_len"):
        ByteWindows(tmp_path / "tiny.txt", 8)
    with pytest.raises(DataError, match="no such file"):
        ByteWindows([tmp_path / "gone.txt"], 8)


def test_data_convert_between_every_format(tmp_path, capsys):
    from jaxmint.cli import main

    data = arrays(70)
    np.savez(tmp_path / "a.npz", **data)
    steps = [
        ("a.npz", "npy", "shards"),
        ("shards", "arrayrecord", "records"),
        ("records", "parquet", "table.parquet"),
        ("table.parquet", "npy", "back"),
    ]
    for source, fmt, out in steps:
        args = ["data", "convert", str(tmp_path / source), str(tmp_path / out)]
        assert main([*args, "--format", fmt, "--rows-per-shard", "16"]) == 0
    back = NpyShards(tmp_path / "back")
    for i in (0, 33, 69):
        for k, v in data.items():
            np.testing.assert_array_equal(back[i][k], v[i])
    assert main(["data", "info", str(tmp_path / "records")]) == 0
    assert "x float32[3, 4]" in capsys.readouterr().out
    assert main(["data", "convert", str(tmp_path / "a.npz"), str(tmp_path / "back")]) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
