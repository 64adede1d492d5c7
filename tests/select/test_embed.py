"""`bunny data embed` with a tiny CLIP built and saved locally: folder + captions,
parquet and webdataset sources give the same embeddings; resume after the last shard."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    chars = "abcdefghijklmnopqrstuvwxyz0123456789 "
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars.strip():
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                            crop_size={"height": 16, "width": 16}), tokenizer=tok)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8),
                     projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(root / "model")
    proc.save_pretrained(root / "model")
    return str(root / "model")


def _images(n):
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _load(root):
    from bunny.select.layout import open_layout

    lay = open_layout(root)
    x = np.concatenate([np.asarray(lay.img(s.index), np.float32) for s in lay.shards])
    t = np.concatenate([np.asarray(lay.txt(s.index), np.float32) for s in lay.shards])
    keys = np.concatenate([lay.keys(s.index) for s in lay.shards])
    return x, t, keys.tolist()


def test_embed_sources_agree_and_resume(tiny_clip, tmp_path):
    from bunny.cli import main
    from bunny.select.embed import embed

    imgs, caps = _images(5), ["a red cat", "two dogs", "a house 3", "sky", "tree in snow"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    with open(tmp_path / "caps.jsonl", "w") as f:
        for i, (b, c) in enumerate(zip(imgs, caps)):
            (folder / f"im{i}.png").write_bytes(b)
            f.write(json.dumps({"file": f"im{i}.png", "caption": c, "key": f"s{i}"}) + "\n")
    assert main(["data", "embed", "--input", str(folder), "--captions", str(tmp_path / "caps.jsonl"),
                 "--out", str(tmp_path / "a"), "--model", tiny_clip, "--shard-size", "2", "--batch-size", "3",
                 "--dtype", "float32", "--no-progress"]) == 0
    x, t, keys = _load(tmp_path / "a")
    assert x.shape == (5, 8) and keys == [f"s{i}" for i in range(5)]
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)

    pq.write_table(pa.table({"key": [f"s{i}" for i in range(5)], "image": imgs, "caption": caps}), tmp_path / "p.parquet")
    embed(tmp_path / "p.parquet", tmp_path / "b", model=tiny_clip, shard_size=3, dtype="float32", progress=False)
    with tarfile.open(tmp_path / "w.tar", "w") as tar:
        for i, (b, c) in enumerate(zip(imgs, caps)):
            for name, data in ((f"s{i}.png", b), (f"s{i}.txt", c.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    embed(tmp_path / "w.tar", tmp_path / "c", model=tiny_clip, shard_size=5, dtype="float32", progress=False)
    for other in ("b", "c"):
        xo, to, ko = _load(tmp_path / other)
        assert ko == keys
        np.testing.assert_allclose(xo, x, atol=1e-5)
        np.testing.assert_allclose(to, t, atol=1e-5)

    # resume: a run killed before writing shard 2 (metadata last) continues from there
    (tmp_path / "a/metadata/metadata_0002.parquet").unlink()
    (tmp_path / "a/metadata/metadata_0001.parquet").unlink()
    assert embed(folder, tmp_path / "a", model=tiny_clip, captions=tmp_path / "caps.jsonl", shard_size=2,
                 dtype="float32", progress=False) == 3
    x2, _, k2 = _load(tmp_path / "a")
    assert k2 == keys and np.allclose(x2, x, atol=1e-6)
