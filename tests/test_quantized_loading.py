"""Quantizing as the checkpoint is read: big tensors are read in ranges of rows (`CheckpointIndex.read_rows`,
plain reads, never a mapping of the file) and quantized chunk by chunk into exactly the int8 values and scales that
quantizing the whole float tensor gives; the heap's freed memory is handed back (glibc)."""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.split.parts import LoraSettings, SplitPart
from common.split.quantize import Int8Embedding, Int8Linear, Rows, int8_rows, quantize_frozen
from common.weights import CheckpointError, CheckpointIndex
from tests.support.families import checkpoint_dir

GLIBC = platform.libc_ver()[0] == "glibc"


def test_read_rows_gives_the_stored_rows_in_any_dtype_and_refuses_rows_outside(tmp_path: Path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"table": torch.randn(37, 5, generator=gen).to(torch.bfloat16), "ids": torch.arange(12).view(3, 4),
               "scalar": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    index = CheckpointIndex(tmp_path)
    assert torch.equal(index.read_rows("table", 3, 11), tensors["table"][3:11])
    assert torch.equal(index.read_rows("table", 30, 37, torch.float32), tensors["table"][30:].float())
    assert torch.equal(index.read_rows("ids", 1, 3, torch.float32), tensors["ids"][1:])  # integers are not cast
    assert torch.equal(index.read("scalar", torch.float64), torch.tensor(2.5, dtype=torch.float64))
    assert index.read_rows("table", 4, 4).shape == (0, 5)
    with pytest.raises(CheckpointError, match=r"rows \[30, 38\) are not in tensor table of shape \[37, 5\]"):
        index.read_rows("table", 30, 38)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # the last tensor's bytes cut short
    last = max(index.tensors, key=lambda n: index.tensors[n].end)
    with pytest.raises(CheckpointError, match=f"truncated inside tensor {last}"):
        CheckpointIndex(tmp_path).read(last)


def test_int8_from_row_chunks_of_the_file_is_bit_identical_to_the_whole_float_tensor(tmp_path: Path):
    weight = torch.randn(1000, 24, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.01, 5, 1000)[:, None]
    weight[17] = 0.0  # a row of zeros keeps its epsilon scale
    save_file({"w": weight}, str(tmp_path / "model.safetensors"))
    index = CheckpointIndex(tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        want = int8_rows(weight.to(dtype))
        rows = Rows(lambda a, b, dtype=dtype: index.read_rows("w", a, b, dtype), (1000, 24), dtype)
        for chunk in (1, 7, 333, 4096):
            got = int8_rows(rows, rows_per_chunk=chunk)
            assert all(torch.equal(g, w) and g.dtype == w.dtype for g, w in zip(got, want)), (dtype, chunk)


def test_a_part_quantized_from_row_chunks_holds_the_values_of_quantizing_its_float_weights(tmp_path: Path):
    """Every int8 weight and scale of a part quantized while it is read equals the one quantizing the loaded
    float part gives, for the embedding (read in chunks) and every projection."""
    model_dir = tmp_path / "llama"
    shutil.copytree(checkpoint_dir("llama"), model_dir)
    lora = LoraSettings(4, 8, 0.0, ())
    after = SplitPart(model_dir, "client", 2, lora)
    quantize_frozen(after, "int8")
    loaded = SplitPart(model_dir, "client", 2, lora, quantization="int8")
    want, got = after.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and sum(k.endswith("qweight") for k in got) == 15
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    modules = dict(loaded.named_modules())
    assert sum(isinstance(m, (Int8Linear, Int8Embedding)) for m in modules.values()) == 15
    stored = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    table = next(m for m in modules.values() if isinstance(m, Int8Embedding))
    assert torch.equal(table.qweight, int8_rows(stored)[0]) and torch.equal(table.scale, int8_rows(stored)[1])


_HEAP_PROBE = """
import sys, torch
from common.heap import keep_heap_small, release_freed_memory
if sys.argv[1] == "pinned":
    assert keep_heap_small()
freed = torch.ones(16 << 20, dtype=torch.uint8)
del freed  # glibc's dynamic threshold grows to 16 MiB: from now on an 8 MiB block would land in the heap
block = torch.ones(8 << 20, dtype=torch.uint8)
heaps = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
print(any(int(lo, 16) <= block.data_ptr() < int(hi, 16) for lo, hi in heaps))
del block
print(release_freed_memory())
"""


@pytest.mark.skipif(not GLIBC, reason="malloc_trim and mallopt are glibc's")
@pytest.mark.parametrize("mode", ["dynamic", "pinned"])
def test_a_pinned_mmap_threshold_keeps_big_blocks_out_of_the_heap_and_trim_returns_freed_pages(mode: str):
    """glibc's own behaviour, which `keep_heap_small` and `release_freed_memory` rely on: after a 16 MiB block is
    freed, an 8 MiB one lands in the heap (where it stays resident once freed, until trimmed) unless the threshold
    is pinned; trimming then hands the freed block back."""
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split()
    assert out == (["True", "True"] if mode == "dynamic" else ["False", out[1]])
