"""Sharded LLaVA data: parquet files and webdataset tars, loaded lazily; `bunny data shard`.

Over 400 lines because reading and writing both formats share one row model (conversations,
ids, image cells) and its validation; split them and the two sides could drift apart.

`data_path` may be one shard (`.parquet` or `.tar`), a folder holding `*.parquet` or `*.tar`
(not both), or a glob (`shards/train-*.parquet`). Shards are read in sorted path order.

Parquet columns: `conversations` (a JSON string of the LLaVA list, or list<struct<from,
value>>), `id` (optional; default `SHARD_NAME:ROW`), `image` (optional): binary image bytes,
a string path resolved against `image_root` (default: the shard's folder), a list of
either, or Hugging Face's struct<bytes, path>. A null cell is no image; a null list element
a missing one.

Webdataset tars (uncompressed): members grouped by key (the member name up to the first dot
of its base name, as webdataset does). `KEY.json` holds the LLaVA record (`conversations`,
optional `id`, default KEY; an `image` field, if any, only fixes how many images there must
be); images are `KEY.jpg|jpeg|png|webp|...` for one, `KEY.0.png`, `KEY.1.png`, ... for
several (ordered by index). Other members are ignored.

Text is read at load time; image bytes never are: each image is an `ImageRef` (shard, row
group, row / tar offset and size) read on access, so memory does not grow with the data.
Validation is the JSON loader's (`parse_record`), with errors naming the shard and row or
member.
"""
from __future__ import annotations

import glob
import io
import json
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from bunny.atomic import atomic_files
from bunny.data.llava import Conversation, LoadReport, collect_conversations, parse_record
from bunny.errors import BunnyError
from bunny.model.images import ImageRef
from bunny.model.templates import IMAGE_PLACEHOLDER

SHARD_SUFFIXES = {".parquet": "parquet", ".tar": "webdataset"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_GLOB_CHARS = re.compile(r"[*?\[]")
_ROW_GROUP_CACHE = 2  # image columns of this many parquet row groups kept per process


# -- lazy image references ---------------------------------------------------------------------

@dataclass(frozen=True)
class TarImage(ImageRef):
    """A tar member's bytes: `size` bytes at `offset` of the tar file."""
    tar: str
    member: str
    offset: int
    size: int

    def read(self) -> bytes:
        try:
            with open(self.tar, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as exc:
            raise BunnyError(f"cannot read {self}: {exc}") from None
        if len(data) != self.size:
            raise BunnyError(f"cannot read {self}: the tar is shorter than its index says")
        return data

    def __str__(self) -> str:
        return f"{self.tar}:{self.member}"


@dataclass(frozen=True)
class ParquetImage(ImageRef):
    """The bytes in a parquet `image` cell: row `row` of row group `row_group`; `index` into
    a list cell; `field` of a struct cell."""
    shard: str
    row_group: int
    row: int
    index: int | None = None
    field: str | None = None
    shard_row: int = 0  # row within the shard, for messages

    def read(self) -> bytes:
        cell = _image_column(self.shard, self.row_group)[self.row]
        if self.index is not None:
            cell = cell.values[self.index]
        if self.field is not None:
            cell = cell[self.field]
        data = cell.as_py()
        if data is None:
            raise BunnyError(f"{self} holds no image bytes")
        return data

    def __str__(self) -> str:
        return f"{self.shard}: row {self.shard_row} image {self.index or 0}"


@dataclass(frozen=True)
class MissingImage(ImageRef):
    """Stands in for an image a sample needs but its shard lacks (reported as missing)."""
    where: str

    def read(self) -> bytes:
        raise BunnyError(f"image not found: {self.where}")

    def __str__(self) -> str:
        return self.where


_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def _image_column(shard: str, row_group: int):
    """The `image` column of one row group, from a small per-process LRU cache."""
    key = (shard, row_group)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(shard) as pf:
            column = pf.read_row_group(row_group, columns=["image"]).column(0)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise BunnyError(f"cannot read images of {shard} row group {row_group}: {exc}") from None
    with _cache_lock:
        _cache[key] = column
        while len(_cache) > _ROW_GROUP_CACHE:
            _cache.popitem(last=False)
    return column


# -- finding shards ----------------------------------------------------------------------------

def is_sharded(path) -> bool:
    """Whether `path` is for `load_shards`: anything but a .json/.jsonl file."""
    return Path(path).suffix not in (".json", ".jsonl") or _is_glob(path)


def _is_glob(path) -> bool:
    return bool(_GLOB_CHARS.search(str(path))) and not Path(path).exists()


def find_shards(path) -> tuple[str, list[Path]]:
    """(format, sorted shard paths) of a shard file, a folder of shards or a glob."""
    text = str(path)
    p = Path(path)
    if _is_glob(path):
        files = sorted(Path(f) for f in glob.glob(text) if Path(f).is_file())
        if not files:
            raise BunnyError(f"no files match {text}")
        where = f"the glob {text}"
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SHARD_SUFFIXES)
        if not files:
            raise BunnyError(f"{p}: the folder holds no shards (*.parquet or *.tar)")
        where = f"the folder {p}"
    elif p.suffix in SHARD_SUFFIXES:
        if not p.is_file():
            raise BunnyError(f"data file not found: {p}")
        files, where = [p], str(p)
    elif not p.suffix and not p.exists():
        raise BunnyError(f"data path not found: {p}")
    else:
        raise BunnyError(f"{p}: unknown data format {p.suffix or '(no extension)'!r}; expected .json, .jsonl, "
                         ".parquet, .tar, a folder of shards or a glob")
    odd = [f for f in files if f.suffix not in SHARD_SUFFIXES]
    if odd:
        raise BunnyError(f"{where}: {odd[0]} has an unknown shard extension {odd[0].suffix or '(none)'!r}; "
                         "shards are .parquet or .tar")
    formats = {SHARD_SUFFIXES[f.suffix] for f in files}
    if len(formats) > 1:
        raise BunnyError(f"{where} mixes parquet and tar shards; use one format")
    return formats.pop(), files


def load_shards(path, image_root=None, skip_missing: bool = False) -> tuple[list[Conversation], LoadReport]:
    """Validated conversations of sharded data (see the module doc); as `load_conversations`."""
    fmt, files = find_shards(path)
    reader = _parquet_samples if fmt == "parquet" else _tar_samples
    samples = ((conv, place) for shard in files
               for conv, place in reader(shard, Path(image_root) if image_root is not None else shard.parent))
    return collect_conversations(samples, skip_missing, _is_missing)


def _is_missing(image) -> bool:
    if isinstance(image, MissingImage):
        return True
    return isinstance(image, str) and not Path(image).is_file()


# -- parquet -------------------------------------------------------------------------------------

_BYTES = object()  # an image cell element holding bytes


def _parquet_samples(shard: Path, root: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(shard)
    except (OSError, ValueError) as exc:
        raise BunnyError(f"{shard}: not a readable parquet file: {exc}") from None
    with pf:
        names = pf.schema_arrow.names
        if "conversations" not in names:
            raise BunnyError(f"{shard}: no 'conversations' column (columns: {', '.join(names)})")
        columns = [c for c in ("id", "conversations", "image") if c in names]
        image_type = pf.schema_arrow.field("image").type if "image" in names else None
        if image_type is not None:
            _check_image_type(shard, image_type)
        row = 0
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=columns)
            ids = table.column("id").to_pylist() if "id" in names else [None] * table.num_rows
            convs = table.column("conversations").to_pylist()
            images = (_image_entries(table.column("image"), pa) if image_type is not None
                      else [None] * table.num_rows)
            del table
            for r in range(len(convs)):
                where = f"{shard}: row {row}"
                conversations = convs[r]
                if isinstance(conversations, str):
                    try:
                        conversations = json.loads(conversations)
                    except json.JSONDecodeError as exc:
                        raise BunnyError(f"{where}: malformed JSON in 'conversations': {exc.msg} "
                                         f"(line {exc.lineno} column {exc.colno})") from None
                record = {"id": ids[r] if ids[r] is not None else f"{shard.name}:{row}",
                          "conversations": conversations}
                cell = images[r]
                if cell is not None:
                    refs = []
                    for k, entry in enumerate(cell["items"]):
                        index = k if cell["list"] else None
                        if entry is None:
                            refs.append(MissingImage(f"{shard}: row {row} image {k} (null)"))
                        elif isinstance(entry, tuple):  # (field, value): bytes or a path
                            if entry[0] == "path":
                                refs.append(str(entry[1]))
                            else:
                                refs.append(ParquetImage(str(shard), rg, r, index, entry[0], row))
                        else:
                            refs.append(ParquetImage(str(shard), rg, r, index, None, row))
                    record["image"] = refs
                yield parse_record(record, row, root, where), where
                row += 1


def _check_image_type(shard: Path, t) -> None:
    import pyarrow as pa

    def element_ok(e) -> bool:
        return (pa.types.is_binary(e) or pa.types.is_large_binary(e) or pa.types.is_string(e)
                or pa.types.is_large_string(e) or (pa.types.is_struct(e) and {"bytes", "path"}
                                                   & {e.field(i).name for i in range(e.num_fields)}))

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if element_ok(t.value_type):
            return
    elif element_ok(t):
        return
    raise BunnyError(f"{shard}: the 'image' column has type {t}; expected binary, string, a list of either "
                     "or struct<bytes, path>")


def _image_entries(column, pa) -> list:
    """Per row: None (no image) or {"list": bool, "items": [entry, ...]}, an entry being
    _BYTES, ("bytes"|"path", value) for a struct, a path string as ("path", str), or None
    (a null element: a missing image). Image bytes are looked at, never kept."""
    out = []
    for chunk in column.chunks:
        t = chunk.type
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            valid = chunk.is_valid().to_pylist()
            offsets = chunk.offsets.to_pylist()
            values = _elements(chunk.values, pa)
            for i, ok in enumerate(valid):
                out.append({"list": True, "items": values[offsets[i]:offsets[i + 1]]} if ok else None)
        else:
            valid = chunk.is_valid().to_pylist()
            out.extend({"list": False, "items": [e]} if ok else None
                       for ok, e in zip(valid, _elements(chunk, pa)))
    return out


def _elements(arr, pa) -> list:
    t = arr.type
    valid = arr.is_valid().to_pylist()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return [("path", v) if v is not None else None for v in arr.to_pylist()]
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        has_bytes = (arr.field("bytes").is_valid().to_pylist() if "bytes" in names else [False] * len(arr))
        paths = arr.field("path").to_pylist() if "path" in names else [None] * len(arr)
        return [None if not ok else ("bytes", None) if b else ("path", p) if p is not None else None
                for ok, b, p in zip(valid, has_bytes, paths)]
    return [_BYTES if ok else None for ok in valid]


# -- webdataset ----------------------------------------------------------------------------------

_INDEXED = re.compile(r"^(\d+)\.([a-z]+)$")


def _split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) as webdataset splits a member name; None without an extension."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return None
    return name[:dot], name[dot + 1:].lower()


def _tar_samples(shard: Path, root: Path):
    try:
        tf = tarfile.open(shard, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise BunnyError(f"{shard}: not a readable uncompressed tar: {exc}") from None
    records: dict[str, tuple[str, bytes]] = {}  # key -> (member, json bytes)
    images: dict[str, dict[int | None, TarImage]] = {}
    order: dict[str, None] = {}
    names: set[str] = set()
    with tf:
        try:
            for info in tf:
                if not info.isfile():
                    continue
                if info.name in names:
                    raise BunnyError(f"{shard}: member {info.name} appears twice")
                names.add(info.name)
                split = _split_member(info.name)
                if split is None:
                    continue
                key, ext = split
                if ext == "json":
                    order.setdefault(key)
                    records[key] = (info.name, tf.extractfile(info).read())
                    continue
                match = _INDEXED.match(ext)
                index, ext = (int(match.group(1)), match.group(2)) if match else (None, ext)
                if ext not in IMAGE_EXTENSIONS:
                    continue
                order.setdefault(key)
                slot = images.setdefault(key, {})
                if index in slot:
                    raise BunnyError(f"{shard}: {info.name} and {slot[index].member} are the same image of {key}")
                slot[index] = TarImage(str(shard), info.name, info.offset_data, info.size)
        except tarfile.TarError as exc:
            raise BunnyError(f"{shard}: corrupt tar: {exc}") from None
    for key in order:
        if key not in records:
            raise BunnyError(f"{shard}: sample {key} has images but no {key}.json")
        member, raw = records[key]
        where = f"{shard}:{member}"
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as exc:
            raise BunnyError(f"{where}: not UTF-8 text: {exc}") from None
        except json.JSONDecodeError as exc:
            raise BunnyError(f"{where}: malformed JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
        if not isinstance(record, dict):
            raise BunnyError(f"{where}: expected a JSON object, got {type(record).__name__}")
        record = dict(record)
        record.setdefault("id", key)
        record["image"] = _tar_image_list(shard, key, record, images.get(key, {}), where)
        yield parse_record(record, 0, root, where), where


def _tar_image_list(shard: Path, key: str, record: dict, slots: dict, where: str) -> list:
    if None in slots and len(slots) > 1:
        raise BunnyError(f"{where}: {key} has both an unnumbered image and numbered ones")
    if None in slots:
        slots = {0: slots[None]}
    listed = record.get("image")
    if listed is not None:
        expected = 1 if isinstance(listed, str) else len(listed) if isinstance(listed, list) else -1
        if expected < 0:
            raise BunnyError(f"{where}: 'image' must be a name or a list of names")
    else:
        convs = record.get("conversations")
        expected = sum(m["value"].count(IMAGE_PLACEHOLDER) for m in convs
                       if isinstance(m, dict) and isinstance(m.get("value"), str)) if isinstance(convs, list) else 0
    count = max([expected] + [i + 1 for i in slots])
    if listed is not None and count > expected:
        raise BunnyError(f"{where}: its 'image' field lists {expected} image(s) but the shard holds "
                         f"{len(slots)} for {key} (up to {key}.{count - 1}.*)")
    return [slots[i] if i in slots else
            MissingImage(f"{shard}:{key}.{i}.*" if count > 1 else f"{shard}:{key}.*")
            for i in range(count)]


# -- writing -----------------------------------------------------------------------------------

_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def _image_bytes(image) -> bytes:
    if isinstance(image, ImageRef):
        return image.read()
    return Path(image).read_bytes()


def _image_extension(data: bytes, sample_id: str) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError) as exc:
        raise BunnyError(f"sample {sample_id!r}: cannot read an image: {exc}") from None
    if fmt not in _FORMATS:
        raise BunnyError(f"sample {sample_id!r}: image format {fmt} has no webdataset extension; "
                         f"convert it to one of {', '.join(sorted(_FORMATS))}")
    return _FORMATS[fmt]


def _turns_json(conv: Conversation) -> list[dict]:
    return [{"from": "human" if role == "user" else "gpt", "value": text} for role, text in conv.turns]


def write_shards(data_path, out, fmt: str, samples_per_shard: int, image_root=None, prefix: str = "shard",
                 skip_missing: bool = False, rows_per_group: int = 64) -> dict:
    """Write `data_path` (anything `load_conversations` reads) as shards in folder `out`:
    `PREFIX-00000.parquet`, ... or `PREFIX-00000.tar`, ..., image bytes embedded.

    Validates the whole input first (the loader's rules). Shards are written under hidden
    temporary names and renamed only when all are complete, so a failed run leaves no shard
    behind. A folder that already holds shards of `fmt` is refused (a stale shard would join
    the data). Returns counts: {"format", "shards", "samples", "images", "skipped"}.
    """
    from bunny.data.llava import load_conversations

    if fmt not in ("parquet", "webdataset"):
        raise BunnyError(f"unknown shard format {fmt!r}; choose parquet or webdataset")
    if samples_per_shard < 1 or rows_per_group < 1:
        raise BunnyError("samples per shard and rows per group must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise BunnyError(f"shard prefix {prefix!r} may hold letters, digits, '_' and '-' only")
    convs, report = load_conversations(data_path, image_root, skip_missing)
    if not convs:
        raise BunnyError(f"{data_path}: no samples to write")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".parquet" if fmt == "parquet" else ".tar"
    existing = sorted(f.name for f in out.iterdir() if f.suffix == suffix)
    if existing:
        raise BunnyError(f"{out} already holds {len(existing)} {suffix} file(s) ({existing[0]}, ...); "
                         "choose an empty folder or remove them")
    chunks = [convs[i:i + samples_per_shard] for i in range(0, len(convs), samples_per_shard)]
    finals = [out / f"{prefix}-{n:05d}{suffix}" for n in range(len(chunks))]
    with atomic_files(*finals) as temporaries:  # every shard appears only once all are written
        for n, (chunk, tmp) in enumerate(zip(chunks, temporaries)):
            if fmt == "parquet":
                _write_parquet(tmp, chunk, rows_per_group)
            else:
                _write_tar(tmp, chunk, n * samples_per_shard)
    return {"format": fmt, "shards": len(chunks), "samples": len(convs),
            "images": sum(len(c.images) for c in convs), "skipped": len(report.skipped_missing),
            "out": str(out)}


def _write_parquet(path: Path, convs: list[Conversation], rows_per_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()),
                        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
                        ("image", pa.list_(pa.binary()))])
    # No dictionary or min/max statistics for image bytes: both would only copy them.
    with pq.ParquetWriter(path, schema, use_dictionary=["id"], write_statistics=["id"]) as writer:
        for i in range(0, len(convs), rows_per_group):
            part = convs[i:i + rows_per_group]
            writer.write_table(pa.table({
                "id": [c.id for c in part],
                "conversations": [_turns_json(c) for c in part],
                "image": [[_image_bytes(img) for img in c.images] for c in part],
            }, schema=schema), row_group_size=rows_per_group)


def _write_tar(path: Path, convs: list[Conversation], first_index: int) -> None:
    def add(tf, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for k, conv in enumerate(convs):
            key = f"{first_index + k:09d}"  # ids may hold dots or slashes; keys may not
            record = {"id": conv.id, "conversations": _turns_json(conv)}
            add(tf, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
            for i, image in enumerate(conv.images):
                data = _image_bytes(image)
                ext = _image_extension(data, conv.id)
                add(tf, f"{key}.{ext}" if len(conv.images) == 1 else f"{key}.{i}.{ext}", data)
