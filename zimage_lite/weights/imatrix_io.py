"""Importance-matrix files: llama.cpp's GGUF, and the legacy `.dat` that llama.cpp and stable-diffusion.cpp share.

- GGUF (llama.cpp `llama-imatrix`, current): `general.type = "imatrix"`, `imatrix.datasets` (strings),
  `imatrix.chunk_count`, `imatrix.chunk_size` (u32), and per weight `<name>.in_sum2` (F32, ne = [n_in, 1]:
  the raw sum of x^2 over rows) and `<name>.counts` (F32, ne = [1, 1]: the rows). Names are the tensor names
  our converter writes (ComfyUI names for the transformer, llama.cpp names for the text encoder).
- `.dat` (llama.cpp's legacy format, which stable-diffusion.cpp's `--imat-out` writes): int32 entry count;
  per entry int32 name length, the name, int32 ncall, int32 nval, nval float32 = mean square * ncall; then
  int32 chunk count; llama.cpp appends int32 length + the dataset file name, sd.cpp does not. A reader
  recovers the mean as value / ncall (llama-quantize and sd.cpp both do). We write `.dat` files for sd.cpp,
  with its tensor names: `model.diffusion_model.<ComfyUI name>` and `text_encoders.llm.model.<HF name>`,
  and map them back (and llama.cpp's legacy names, which are ours already) on reading.
The file type follows the extension on writing (`.gguf` or `.dat`); reading looks at the magic bytes.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import gguf
import numpy as np
import torch

from zimage_lite.errors import CheckpointError, UsageError
from zimage_lite.quant.imatrix import Entry, Imatrix

log = logging.getLogger(__name__)

SUM2, COUNTS = ".in_sum2", ".counts"
SDCPP_DIT_PREFIX = "model.diffusion_model."
SDCPP_LLM_PREFIX = "text_encoders.llm."
SUFFIXES = (".gguf", ".dat")


# -- names -------------------------------------------------------------------------------------------------
def to_sdcpp_name(name: str) -> str:
    """Our tensor name -> stable-diffusion.cpp's: `blk.*` text-encoder names become its LLM names (HF names
    under `text_encoders.llm.model.`), everything else is the transformer's."""
    from zimage_lite.weights.names_qwen3 import gguf_to_hf_name

    if name.startswith("blk."):
        return f"{SDCPP_LLM_PREFIX}model.{gguf_to_hf_name(name)}"
    return SDCPP_DIT_PREFIX + name


def from_sdcpp_name(name: str) -> str:
    """stable-diffusion.cpp's (or llama.cpp's) name -> ours; names of neither stay as they are."""
    from zimage_lite.weights.names_qwen3 import hf_to_gguf_name

    if name.startswith(SDCPP_DIT_PREFIX):
        return name.removeprefix(SDCPP_DIT_PREFIX)
    if name.startswith(SDCPP_LLM_PREFIX):
        try:
            return hf_to_gguf_name(name.removeprefix(SDCPP_LLM_PREFIX))
        except CheckpointError:
            return name
    return name


# -- GGUF ---------------------------------------------------------------------------------------------------
def write_gguf(imatrix: Imatrix, path: Path) -> None:
    w = gguf.GGUFWriter(str(path), arch="")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, list(imatrix.datasets))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, imatrix.chunks)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, imatrix.chunk_size)
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        w.add_tensor(name + SUM2, e.sum2.to(torch.float32).numpy().reshape(1, -1))  # numpy (1, n) = ne [n, 1]
        w.add_tensor(name + COUNTS, np.array([[float(e.count)]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _field(reader: gguf.GGUFReader, key: str, default):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(path: Path) -> Imatrix:
    reader = gguf.GGUFReader(str(path))
    kind = _field(reader, gguf.Keys.General.TYPE, None)
    if kind != gguf.GGUFType.IMATRIX:
        raise CheckpointError(f"{path}: a GGUF of type {kind!r}, not an imatrix")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    entries = {}
    for key, sums in tensors.items():
        if not key.endswith(SUM2):
            continue
        name = key.removesuffix(SUM2)
        counts = tensors.get(name + COUNTS)
        if counts is None or counts.size != 1:  # several counts: a mixture of experts, which we have none of
            raise CheckpointError(
                f"{path}: entry {name} has {0 if counts is None else counts.size} counts, not 1"
            )
        entries[name] = Entry(
            torch.from_numpy(sums.reshape(-1).astype(np.float64)), int(counts.reshape(-1)[0])
        )
    return Imatrix(
        entries,
        int(_field(reader, gguf.Keys.IMatrix.CHUNK_COUNT, 0)),
        int(_field(reader, gguf.Keys.IMatrix.CHUNK_SIZE, 0)),
        list(_field(reader, gguf.Keys.IMatrix.DATASETS, [])),
    )


# -- legacy .dat (llama.cpp, stable-diffusion.cpp) -----------------------------------------------------------
def write_dat(imatrix: Imatrix, path: Path) -> None:
    """stable-diffusion.cpp's file: its names, values = mean * ncall with ncall = the chunk count."""
    ncall = max(imatrix.chunks, 1)
    parts = [struct.pack("<i", len(imatrix.entries))]
    for name in sorted(imatrix.entries):
        sd_name = to_sdcpp_name(name).encode()
        values = (imatrix.entries[name].values().double() * ncall).to(torch.float32).numpy()
        parts += [
            struct.pack("<i", len(sd_name)),
            sd_name,
            struct.pack("<ii", ncall, values.size),
            values.tobytes(),
        ]
    parts.append(struct.pack("<i", imatrix.chunks))
    path.write_bytes(b"".join(parts))


class _Bytes:
    def __init__(self, data: bytes, path: Path):
        self.data, self.at, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise CheckpointError(f"{self.path}: truncated imatrix file (at byte {self.at})")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def int32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]


def read_dat(path: Path) -> Imatrix:
    r = _Bytes(path.read_bytes(), path)
    n = r.int32()
    if n < 1:
        raise CheckpointError(f"{path}: no imatrix entries")
    entries = {}
    for _ in range(n):
        length = r.int32()
        if not 0 < length < 4096:
            raise CheckpointError(f"{path}: not an imatrix file (a name of {length} bytes)")
        name = from_sdcpp_name(r.take(length).decode("utf-8", errors="replace"))
        ncall, nval = r.int32(), r.int32()
        if nval < 1 or ncall < 0:
            raise CheckpointError(f"{path}: entry {name} has {nval} values and {ncall} calls")
        values = np.frombuffer(r.take(4 * nval), dtype="<f4").astype(np.float64)
        entry = Entry(torch.from_numpy(values), ncall)  # values / ncall = the mean, as the C readers do
        if name in entries:
            entries[name].sum2 += entry.sum2
            entries[name].count += entry.count
        else:
            entries[name] = entry
    chunks = r.int32() if r.at + 4 <= len(r.data) else 0
    datasets = []
    if r.at + 4 <= len(r.data):  # llama.cpp's legacy files end with the dataset's file name
        datasets = [r.take(r.int32()).decode("utf-8", errors="replace")]
    return Imatrix(entries, chunks, 0, datasets)


# -- entry points ------------------------------------------------------------------------------------------
def check_suffix(path: Path) -> None:
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"{path}: an imatrix file is .gguf (llama.cpp) or .dat (stable-diffusion.cpp)")


def write_imatrix(imatrix: Imatrix, path: str | Path, force: bool = True) -> Path:
    """Write atomically; the format follows the extension (.gguf: llama.cpp's, .dat: sd.cpp's)."""
    from zimage_lite.convert.atomic import atomic_path

    path = Path(path)
    check_suffix(path)
    write = write_gguf if path.suffix.lower() == ".gguf" else write_dat
    with atomic_path(path, force) as tmp:
        write(imatrix, tmp)
    return path


def read_imatrix(path: str | Path) -> Imatrix:
    """Any of the three formats, by content; names mapped to ours."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such imatrix file")
    with path.open("rb") as f:
        magic = f.read(4)
    imatrix = read_gguf(path) if magic == b"GGUF" else read_dat(path)
    if not imatrix.entries:
        raise CheckpointError(f"{path}: no imatrix entries")
    return imatrix
