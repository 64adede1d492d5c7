"""Sharded data (parquet, webdataset tars): round trips from LLaVA JSON give the same
conversations and pixels, hand-made layouts load, every error names its shard, images stay
lazy, `bunny data shard` writes atomically, and the trainer runs from shards."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bunny.cli import main
from bunny.data import shards
from bunny.data.llava import ConversationDataset, load_conversations
from bunny.data.shards import MissingImage, ParquetImage, TarImage, write_shards
from bunny.errors import BunnyError
from bunny.model.images import ImageRef, load_image
from bunny.testing import make_tiny_bunny, random_image

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from trainhelp import tiny_recipe, write_dataset  # noqa: E402


@pytest.fixture(scope="module")
def processor():
    return make_tiny_bunny()[1]


def turns(*values, image=0):
    convs = [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]
    convs[0]["value"] = "<image>\n" * image + convs[0]["value"]
    return convs


def png(seed=0, size=(28, 28), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def source(tmp_path) -> Path:
    """LLaVA JSON: one image (not square), two images (multi-turn), text-only, one image
    without a placeholder (LLaVA's prepend rule), a JPEG."""
    folder = tmp_path / "src"
    (folder / "img").mkdir(parents=True)
    random_image(0, (30, 20)).save(folder / "img" / "a.png")
    random_image(1).save(folder / "img" / "b.png")
    random_image(2, (20, 26)).save(folder / "img" / "c.png")
    random_image(3).save(folder / "img" / "d.jpg", quality=90)
    records = [
        {"id": "one", "image": "img/a.png", "conversations": turns("What color?", "red", image=1)},
        {"id": "two", "image": ["img/b.png", "img/c.png"],
         "conversations": turns("Same?", "No", "Which is larger?", "The first", image=2)},
        {"id": "text", "conversations": turns("Hi there, how are you?", "Fine")},
        {"id": "bare", "image": ["img/c.png"], "conversations": turns("Describe.", "noise")},
        {"id": "jpeg", "image": "img/d.jpg", "conversations": turns("Colour?", "blue", image=1)},
    ]
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def same_items(a: ConversationDataset, b: ConversationDataset) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["id"] == y["id"]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        if x["pixel_values"] is None:
            assert y["pixel_values"] is None
        else:
            assert torch.equal(x["pixel_values"], y["pixel_values"])


# -- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, ref", [("parquet", ParquetImage), ("webdataset", TarImage)])
def test_round_trip_gives_the_same_conversations_and_pixels(tmp_path, source, processor, fmt, ref):
    out = tmp_path / "shards"
    meta = write_shards(source, out, fmt, samples_per_shard=2, rows_per_group=1)
    assert meta["shards"] == 3 and meta["samples"] == 5 and meta["images"] == 5
    suffix = ".parquet" if fmt == "parquet" else ".tar"
    assert sorted(p.name for p in out.iterdir()) == [f"shard-0000{i}{suffix}" for i in range(3)]
    expected, _ = load_conversations(source)
    for data_path in (out, out / f"shard-*{suffix}"):
        convs, report = load_conversations(data_path)
        assert report.loaded == 5 and not report.skipped_missing
        assert [(c.id, c.turns) for c in convs] == [(c.id, c.turns) for c in expected]
        assert [len(c.images) for c in convs] == [1, 2, 0, 1, 1]
        assert all(isinstance(i, ref) for c in convs for i in c.images)  # lazy, not bytes
    one, _ = load_conversations(out / f"shard-00001{suffix}")
    assert [c.id for c in one] == ["text", "bare"]
    for mode in ("pad", "square"):
        same_items(ConversationDataset(expected, processor, "bunny", mode),
                   ConversationDataset(convs, processor, "bunny", mode))
    two = next(c for c in convs if c.id == "two")
    assert load_image(two.images[1]).tobytes() == random_image(2, (20, 26)).tobytes()  # index order kept


def test_shard_to_shard_and_image_root(tmp_path, source):
    moved = tmp_path / "elsewhere.json"
    moved.write_text(source.read_text())
    with pytest.raises(BunnyError, match="image not found"):
        write_shards(moved, tmp_path / "x", "parquet", 10)
    write_shards(moved, tmp_path / "pq", "parquet", 10, image_root=source.parent)
    write_shards(tmp_path / "pq", tmp_path / "wds", "webdataset", 4)  # any loadable data converts
    a, _ = load_conversations(source)
    b, _ = load_conversations(tmp_path / "wds")
    assert [(c.id, c.turns) for c in a] == [(c.id, c.turns) for c in b]
    assert [[i.read() for i in c.images] for c in b] == [[Path(p).read_bytes() for p in c.images] for c in a]


# -- hand-made layouts ---------------------------------------------------------------------------

def write_tar(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def record(i=None, *values, n=0, **extra) -> str:
    """A webdataset KEY.json: `n` placeholders; `extra` fields (e.g. image=...)."""
    return json.dumps({**({"id": i} if i is not None else {}), "conversations": turns(*values, image=n),
                       **extra})


def test_parquet_column_variants(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    # JSON-string conversations, one binary image (null = text-only), no id column
    pq.write_table(pa.table({
        "conversations": [json.dumps(turns("What?", "red", image=1)), json.dumps(turns("Hi", "Hello"))],
        "image": pa.array([png(0), None], pa.binary()),
    }), folder / "a.parquet")
    # string paths (relative to the shard's folder), list<string>, struct list conversations
    random_image(1).save(folder / "p1.png")
    random_image(2).save(folder / "p2.png")
    pq.write_table(pa.table({
        "id": ["paths"],
        "conversations": [turns("Same?", "No", image=2)],
        "image": [["p1.png", "p2.png"]],
    }), folder / "b.parquet")
    # Hugging Face's Image feature: struct<bytes, path>
    hf = pa.array([{"bytes": png(3), "path": None}, {"bytes": None, "path": "p1.png"}],
                  pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"id": ["hf-bytes", "hf-path"],
                             "conversations": [json.dumps(turns("A?", "b", image=1))] * 2, "image": hf}),
                   folder / "c.parquet")
    convs, _ = load_conversations(folder)
    assert [c.id for c in convs] == ["a.parquet:0", "a.parquet:1", "paths", "hf-bytes", "hf-path"]
    assert convs[1].images == []
    assert convs[2].images == [str(folder / "p1.png"), str(folder / "p2.png")]
    assert convs[4].images == [str(folder / "p1.png")]
    assert load_image(convs[0].images[0]).tobytes() == random_image(0, (28, 28)).tobytes()
    assert load_image(convs[3].images[0]).tobytes() == random_image(3, (28, 28)).tobytes()
    other = tmp_path / "root"
    other.mkdir()
    random_image(1).save(other / "p1.png")
    random_image(2).save(other / "p2.png")
    convs, _ = load_conversations(folder / "b.parquet", image_root=other)
    assert convs[0].images == [str(other / "p1.png"), str(other / "p2.png")]


def test_webdataset_layout(tmp_path):
    tar = write_tar(tmp_path / "w.tar", [
        ("k1.1.png", png(11)), ("k1.json", record(None, "Same?", "No", n=2)), ("k1.0.png", png(10)),
        ("sub/k2.json", record("second", "What?", "red", n=1)), ("sub/k2.jpg", png(2, fmt="JPEG")),
        ("t.json", record(None, "Hi", "Hello")),
        ("README", "not a sample"), ("k3.txt", "extra members are ignored"), ("t.txt", "so is this one"),
    ])
    convs, _ = load_conversations(tar)
    assert [c.id for c in convs] == ["k1", "second", "t"]
    assert [i.member for i in convs[0].images] == ["k1.0.png", "k1.1.png"]
    assert [i.read() for i in convs[0].images] == [png(10), png(11)]
    assert convs[1].images[0].read() == png(2, fmt="JPEG") and convs[2].images == []
    # an "image" field that agrees with the members is fine; the prepend rule applies
    consistent = write_tar(tmp_path / "c.tar", [("k.json", record(None, "Describe.", "x", image="x.png")),
                                                 ("k.png", png(0))])
    (conv,), _ = load_conversations(consistent)
    assert conv.turns[0][1] == "<image>\nDescribe." and str(conv.images[0]) == f"{consistent}:k.png"


def test_images_are_read_lazily_with_a_bounded_cache(tmp_path, source, monkeypatch):
    write_shards(source, tmp_path / "pq", "parquet", samples_per_shard=5, rows_per_group=1)
    shards._cache.clear()
    reads = []
    real = pq.ParquetFile.read_row_group

    def counted(self, i, columns=None, **kw):
        reads.append(columns)
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    convs, _ = load_conversations(tmp_path / "pq")
    assert not shards._cache  # loading keeps no image bytes
    reads.clear()
    for c in convs:
        for image in c.images:
            image.read()
            assert len(shards._cache) <= shards._ROW_GROUP_CACHE
    assert reads and all(r == ["image"] for r in reads)  # image reads fetch the image column only
    n = len(reads)
    convs[-1].images[0].read()  # the last row group is cached
    assert len(reads) == n


# -- errors ------------------------------------------------------------------------------------

def write_pq(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_malformed_json_names_shard_and_row_or_member(tmp_path):
    bad = write_pq(tmp_path / "bad.parquet", conversations=[json.dumps(turns("a", "b")), '[{"from": "human",'])
    with pytest.raises(BunnyError, match=r"bad\.parquet: row 1: malformed JSON"):
        load_conversations(bad)
    tar = write_tar(tmp_path / "bad.tar", [("good.json", record(None, "a", "b")), ("oops.json", "{oops")])
    with pytest.raises(BunnyError, match=r"bad\.tar:oops\.json: malformed JSON"):
        load_conversations(tar)


def test_roles_and_placeholders_are_checked(tmp_path):
    twice = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]
    with pytest.raises(BunnyError, match=r"r\.parquet: row 0: sample 'x' turn 1 .*alternate"):
        load_conversations(write_pq(tmp_path / "r.parquet", id=["x"], conversations=[json.dumps(twice)]))
    with pytest.raises(BunnyError, match=r"r\.tar:k\.json: sample 'k' turn 1 .*alternate"):
        load_conversations(write_tar(tmp_path / "r.tar", [("k.json", json.dumps({"conversations": twice}))]))
    with pytest.raises(BunnyError, match=r"p\.parquet: row 0: sample 'p' has 2 <image> placeholders but 1 images"):
        load_conversations(write_pq(tmp_path / "p.parquet", id=["p"],
                                    conversations=[json.dumps(turns("?", "a", image=2))],
                                    image=pa.array([png()], pa.binary())))
    with pytest.raises(BunnyError, match=r"p\.tar:k\.json: sample 'k' has 2 <image> placeholders but 3 images"):
        load_conversations(write_tar(tmp_path / "p.tar", [("k.json", record(None, "?", "a", n=2))]
                                     + [(f"k.{i}.png", png(i)) for i in range(3)]))
    with pytest.raises(BunnyError, match=r"i\.tar:k\.json: its 'image' field lists 1 image"):
        load_conversations(write_tar(tmp_path / "i.tar", [("k.json", record(None, "?", "a", n=1, image="x.png")),
                                                          ("k.0.png", png(0)), ("k.1.png", png(1))]))


def test_duplicate_ids_across_shards_name_both_places(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    write_pq(folder / "p0.parquet", id=["a", "b"], conversations=[json.dumps(turns("q", "a"))] * 2)
    write_pq(folder / "p1.parquet", id=["c", "a"], conversations=[json.dumps(turns("q", "a"))] * 2)
    with pytest.raises(BunnyError, match=r"'a' appears twice: .*p0\.parquet: row 0 and .*p1\.parquet: row 1"):
        load_conversations(folder)
    write_tar(tmp_path / "t0.tar", [("k.json", record("same", "q", "a"))])
    write_tar(tmp_path / "t1.tar", [("other.json", record("same", "q", "a"))])
    with pytest.raises(BunnyError, match=r"'same' appears twice: .*t0\.tar:k\.json and .*t1\.tar:other\.json"):
        load_conversations(tmp_path / "t*.tar")


def test_missing_images_are_errors_or_skipped_and_reported(tmp_path):
    tar = write_tar(tmp_path / "m.tar", [
        ("ok.json", record(None, "?", "a", n=1)), ("ok.png", png(0)),
        ("half.json", record(None, "?", "a", n=2)), ("half.0.png", png(1)),
        ("none.json", record(None, "?", "a", n=1)),
    ])
    with pytest.raises(BunnyError, match=r"m\.tar:half\.json: sample 'half': image not found: .*m\.tar:half\.1\.\*"):
        load_conversations(tar)
    convs, report = load_conversations(tar, skip_missing=True)
    assert [c.id for c in convs] == ["ok"]
    assert report.skipped_missing == [("half", f"{tar}:half.1.*"), ("none", f"{tar}:none.*")]
    assert "skipped 2" in report.summary()
    random_image(0).save(tmp_path / "here.png")
    pqf = write_pq(tmp_path / "m.parquet", id=["path", "null", "fine"],
                   conversations=[json.dumps(turns("?", "a", image=1))] * 3,
                   image=[["gone.png"], None, ["here.png"]])
    with pytest.raises(BunnyError, match=r"m\.parquet: row 0: sample 'path': image not found: .*gone\.png"):
        load_conversations(pqf)
    nulls = write_pq(tmp_path / "n.parquet", id=["n"], conversations=[json.dumps(turns("?", "a", image=1))],
                     image=pa.array([[None]], pa.list_(pa.binary())))
    convs, report = load_conversations(nulls, skip_missing=True)
    assert not convs and report.skipped_missing == [("n", f"{nulls}: row 0 image 0 (null)")]


def test_no_shards_and_unknown_extensions(tmp_path):
    with pytest.raises(BunnyError, match=r"no files match .*nothing-\*\.parquet"):
        load_conversations(tmp_path / "nothing-*.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BunnyError, match=r"empty: the folder holds no shards"):
        load_conversations(tmp_path / "empty")
    (tmp_path / "data.txt").write_text("[]")
    with pytest.raises(BunnyError, match=r"data\.txt: unknown data format '\.txt'"):
        load_conversations(tmp_path / "data.txt")
    with pytest.raises(BunnyError, match=r"data file not found: .*gone\.parquet"):
        load_conversations(tmp_path / "gone.parquet")
    with pytest.raises(BunnyError, match=r"data\.txt has an unknown shard extension '\.txt'"):
        load_conversations(tmp_path / "data.*")
    write_pq(tmp_path / "empty" / "a.parquet", conversations=[json.dumps(turns("q", "a"))])
    write_tar(tmp_path / "empty" / "b.tar", [("k.json", record(None, "q", "a"))])
    with pytest.raises(BunnyError, match="mixes parquet and tar shards"):
        load_conversations(tmp_path / "empty")
    (tmp_path / "x.tar").write_bytes(b"\x1f\x8b not a tar")
    with pytest.raises(BunnyError, match=r"x\.tar: not a readable uncompressed tar"):
        load_conversations(tmp_path / "x.tar")


def test_a_corrupt_image_names_sample_and_member(tmp_path, processor):
    tar = write_tar(tmp_path / "c.tar", [("k.json", record("s1", "?", "a", n=1)), ("k.png", b"not a png")])
    convs, _ = load_conversations(tar)
    ds = ConversationDataset(convs, processor, "bunny", "pad")
    with pytest.raises(BunnyError, match=r"sample 's1': cannot read image .*c\.tar:k\.png"):
        ds[0]
    assert isinstance(MissingImage("x"), ImageRef)


# -- the command -------------------------------------------------------------------------------

def test_shard_command_writes_atomically(tmp_path, source, capsys):
    out = tmp_path / "wds"
    argv = ["data", "shard", "--input", str(source), "--out", str(out), "--format", "webdataset",
            "--samples-per-shard", "2", "--prefix", "train"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert main(argv) == 2 and "already holds 3 .tar" in capsys.readouterr().err
    # an unreadable image in the last shard: nothing is left behind, not even the first shards
    records = json.loads(source.read_text())
    (source.parent / "img" / "broken.png").write_bytes(b"garbage")
    records.append({"id": "broken", "image": "img/broken.png", "conversations": turns("?", "a", image=1)})
    bad = source.parent / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(BunnyError, match="sample 'broken': cannot read an image"):
        write_shards(bad, tmp_path / "none", "webdataset", 2)
    assert list((tmp_path / "none").iterdir()) == []


# -- training ----------------------------------------------------------------------------------

def test_trainer_runs_from_parquet_shards_as_from_json(tmp_path):
    data = write_dataset(tmp_path / "data", n=4, text_only=2)
    write_shards(data, tmp_path / "pq", "parquet", samples_per_shard=4, rows_per_group=2)
    kw = dict(max_steps=2, cache_images=False)
    from_json = train(tiny_recipe(tmp_path / "a", data, **kw), *make_tiny_bunny())
    from_shards = train(tiny_recipe(tmp_path / "b", tmp_path / "pq" / "shard-*.parquet", **kw), *make_tiny_bunny())
    losses = [h["loss"] for h in from_shards.history]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses == [h["loss"] for h in from_json.history]


def train(recipe, model, processor):
    from bunny.train.trainer import train as run

    return run(recipe, model, processor)
