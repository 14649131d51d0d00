"""CPU paged decode attention in C (engine/csrc/paged_decode_attention.c), built on first use.

Why C: torch has no paged attention on the CPU, so the torch path copies every
decoding sequence's blocks into a buffer before SDPA reads them, and with
grouped-query attention SDPA reads each KV head once per query head. The C
kernel reads each block once, in place, for every query head sharing it.

Why a plain shared library through ctypes rather than a torch extension: it
builds in about a second with the system C compiler (a torch extension takes a
minute of C++ headers), and ctypes releases the GIL for the call, so the
asyncio side of a worker keeps running while a step computes.

The library is compiled with -march=native into a per-user cache (created
0700; a library is loaded only when it and its folder belong to this user and
nobody else can write them) keyed by the
source, the flags, the compiler and this CPU's feature flags; the object is
written under a temporary name and renamed, so concurrent builders (several
engine processes starting at once) never load a half-written file. When no
compiler is found or the build fails, `load()` returns None and the engine
keeps the torch path (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from engine.device import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode_attention.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
SYMBOL = "pdserve_paged_decode_attention"
# Cache dtypes the kernel reads; a bfloat16 cache widens to float32 as it is read (exactly).
CACHE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def cache_dir() -> Path:
    """Where built libraries live: $PDSERVE_KERNEL_CACHE, else ~/.cache/pdserve/kernels."""
    configured = os.environ.get("PDSERVE_KERNEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "pdserve" / "kernels"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; None if it cannot be built here."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or platform.system() != "Linux":
        log.warning("no C compiler (or not Linux): CPU paged attention uses the torch path")
        return None
    directory = cache_dir()
    target = directory / f"paged_decode_attention-{_build_key(compiler)}.so"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not target.exists():
            _build(compiler, target)
    except (OSError, subprocess.CalledProcessError) as exc:
        output = getattr(exc, "stderr", "") or ""
        log.warning("building the CPU attention kernel failed, using the torch path: %r %s", exc, output[-2000:])
        return None
    untrusted = [p for p in (directory, target) if not _trusted(p)]
    if untrusted:  # loading a library runs its code: never one another user could have written
        log.warning("%s must belong to this user and be writable by nobody else; the CPU attention kernel "
                    "is not loaded, using the torch path", untrusted[0])
        return None
    lib = ctypes.CDLL(str(target))
    fn = getattr(lib, SYMBOL)
    i64p, f32p = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float)
    fn.argtypes = [f32p, ctypes.c_void_p, ctypes.c_void_p, i64p, ctypes.c_int64, i64p, f32p, ctypes.c_int,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int64,
                   ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    return load() is not None


def supports(dtype: str, head_dim: int) -> bool:
    """Whether the kernel handles this cache: float32 or bfloat16 rows of whole 16-element vectors."""
    return getattr(torch, dtype, None) in CACHE_DTYPES and head_dim % 16 == 0


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """Same contract as engine.attention.decode_attention_torch, for float32 or bfloat16 caches.

    The arithmetic is float32 for both: a bfloat16 query is widened (it is [B, H, D], small) and the
    output rounded back to the query's dtype. query [B, H, D]; k_cache/v_cache [num_blocks, block_size,
    Hkv, D]; block_tables
    [B, >= blocks needed] int64; seq_lens [B] int64 (tokens, the new one included,
    already in the cache). Returns [B, H, D].
    """
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU attention kernel is not built on this machine")
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if k_cache.dtype not in CACHE_DTYPES or v_cache.dtype != k_cache.dtype or query.dtype not in CACHE_DTYPES:
        raise TypeError(f"the CPU attention kernel takes float32 or bfloat16 caches of one dtype and query, "
                        f"got {query.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if cache_head_dim != head_dim or num_heads % num_kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"shapes do not fit: query {tuple(query.shape)}, caches {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("caches must be contiguous")
    q32 = query.to(torch.float32).contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q32)
    window = sliding_window if sliding_window is not None else 0
    status = getattr(lib, SYMBOL)(
        _ptr(q32, ctypes.c_float), k_cache.data_ptr(), v_cache.data_ptr(),
        _ptr(tables, ctypes.c_int64), tables.stride(0), _ptr(lens, ctypes.c_int64), _ptr(out, ctypes.c_float),
        batch, num_heads, num_kv_heads, head_dim, block_size, scale, window, torch.get_num_threads(),
        CACHE_DTYPES[k_cache.dtype])
    if status == -2:
        raise ValueError(f"head_dim must be a multiple of 16, got {head_dim}")
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its work buffers")
    return out.to(query.dtype)


def _trusted(path: Path) -> bool:
    """path belongs to this user and no one else can write it."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _ptr(tensor: torch.Tensor, ctype: type) -> ctypes._Pointer:
    return ctypes.cast(tensor.data_ptr(), ctypes.POINTER(ctype))


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), cpu_flags().encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


def _build(compiler: str, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
