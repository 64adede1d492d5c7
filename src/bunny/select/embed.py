"""`bunny data embed`: image-text pairs -> the LAION embedding layout, with a transformers
CLIP model. The only part of select/ that uses torch; imported by the CLI on demand.

Sources (streamed, in a fixed order so a resumed run skips exactly the rows already done):
- webdataset: a .tar file or a folder of .tar files; members grouped by basename, an image
  (.jpg/.jpeg/.png/.webp) with a caption (.txt, or .json with "caption"/"text")
- parquet: a .parquet file or folder; an image column (`image`/`jpg`: bytes or {bytes})
  and a caption column (`caption`/`text`); optional `key`, `url`
- an image folder with --captions: .jsonl lines {"file", "caption"[, "key"]} or .tsv
  lines `file<TAB>caption`
Output shards hold `shard_size` rows; a shard's metadata parquet is written last, so a
shard with metadata is complete and a restarted run starts after it.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from bunny.atomic import atomic_file
from bunny.errors import BunnyError

_IMG_EXT = (".jpg", ".jpeg", ".png", ".webp")


def _webdataset(path: Path) -> Iterator[dict]:
    tars = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    for tpath in tars:
        with tarfile.open(tpath) as tar:
            group, current = {}, None
            for m in tar:
                if not m.isfile():
                    continue
                base, _, ext = m.name.partition(".")
                if current is not None and base != current:
                    yield _wds_sample(group, current, tpath)
                    group = {}
                current = base
                group["." + ext.lower()] = tar.extractfile(m).read()
            if current is not None:
                yield _wds_sample(group, current, tpath)


def _wds_sample(group: dict, key: str, tpath: Path) -> dict:
    img = next((group[e] for e in _IMG_EXT if e in group), None)
    if img is None:
        raise BunnyError(f"{tpath}: sample {key} has no image ({', '.join(_IMG_EXT)})")
    if ".txt" in group:
        cap = group[".txt"].decode("utf-8")
    elif ".json" in group:
        meta = json.loads(group[".json"])
        cap = meta.get("caption", meta.get("text"))
    else:
        cap = None
    if cap is None:
        raise BunnyError(f"{tpath}: sample {key} has no caption (.txt or .json caption)")
    return {"key": Path(key).name, "image": img, "caption": cap, "url": ""}


def _parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        icol = next((c for c in ("image", "jpg", "img") if c in names), None)
        ccol = next((c for c in ("caption", "text", "txt") if c in names), None)
        if icol is None or ccol is None:
            raise BunnyError(f"{f}: need an image column (image/jpg) and a caption column (caption/text); has {names}")
        row = 0
        for batch in pf.iter_batches(batch_size=256):
            d = batch.to_pydict()
            for i in range(batch.num_rows):
                img = d[icol][i]
                if isinstance(img, dict):
                    img = img.get("bytes")
                if img is None:
                    raise BunnyError(f"{f} row {row}: no image bytes")
                key = str(d["key"][i]) if "key" in d else f"{f.stem}_{row:09d}"
                yield {"key": key, "image": img, "caption": d[ccol][i], "url": d.get("url", [""] * (i + 1))[i] or ""}
                row += 1


def _folder(path: Path, captions: Path) -> Iterator[dict]:
    with open(captions, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if captions.suffix == ".jsonl":
                rec = json.loads(line)
                name, cap, key = rec["file"], rec["caption"], rec.get("key")
            else:
                name, _, cap = line.rstrip("\n").partition("\t")
                key = None
            img = path / name
            if not img.is_file():
                raise BunnyError(f"{captions} line {line_no}: image {img} not found")
            yield {"key": key or Path(name).stem, "image": img.read_bytes(), "caption": cap, "url": ""}


def samples(source: str | Path, captions: str | Path | None = None) -> Iterator[dict]:
    """The image-text pairs of a source, in a fixed order."""
    p = Path(source)
    if captions:
        return _folder(p, Path(captions))
    if p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
        return _webdataset(p)
    if p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
        return _parquet(p)
    raise BunnyError(f"{p}: not a .tar/.parquet (file or folder); for an image folder give --captions")


def _save(path: Path, arr: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


class ClipEmbedder:
    """Image and text embeddings (L2-normalised, float32 numpy) from a transformers CLIP."""

    def __init__(self, model: str, device: str = "cpu"):
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.torch = torch
        self.model = CLIPModel.from_pretrained(model).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.device = device

    def __call__(self, images, captions) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        inputs = self.processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"],
                                               attention_mask=inputs.get("attention_mask"))
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        return img.cpu().numpy(), txt.cpu().numpy()


def embed(source, out, model: str = "openai/clip-vit-large-patch14", captions=None, batch_size: int = 64,
          shard_size: int = 10000, device: str = "cpu", dtype: str = "float16", progress: bool = True) -> int:
    """Embed all pairs of `source` into the LAION layout under `out`; resumes after the last
    complete shard. Returns the number of rows embedded by this call."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from tqdm.auto import tqdm

    out = Path(out)
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    done = 0
    while (out / f"metadata/metadata_{done:04d}.parquet").exists():
        done += 1
    skip = done * shard_size
    embedder = ClipEmbedder(model, device)
    rows, shard, total = [], done, 0
    bar = tqdm(desc="embed", unit="pair", disable=not progress)

    def flush(rows, shard):
        imgs, txts = [], []
        for a in range(0, len(rows), batch_size):
            batch = rows[a:a + batch_size]
            try:
                pics = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in batch]
            except Exception as exc:  # PIL raises many types; name the sample
                raise BunnyError(f"cannot decode image of sample {batch[0]['key']}..: {exc}") from exc
            i, t = embedder(pics, [r["caption"] for r in batch])
            imgs.append(i)
            txts.append(t)
            bar.update(len(batch))
        _save(out / f"img_emb/img_emb_{shard:04d}.npy", np.concatenate(imgs).astype(dtype))
        _save(out / f"text_emb/text_emb_{shard:04d}.npy", np.concatenate(txts).astype(dtype))
        table = pa.table({"key": [r["key"] for r in rows], "caption": [r["caption"] for r in rows],
                          "url": [r["url"] for r in rows]})
        with atomic_file(out / f"metadata/metadata_{shard:04d}.parquet") as tmp:  # marks the shard complete
            pq.write_table(table, tmp)

    for i, rec in enumerate(samples(source, captions)):
        if i < skip:
            continue
        rows.append(rec)
        if len(rows) == shard_size:
            flush(rows, shard)
            total += len(rows)
            rows, shard = [], shard + 1
    if rows:
        flush(rows, shard)
        total += len(rows)
    bar.close()
    return total
