"""The benchmark's CPU mode runs end to end on tiny sizes (so it cannot rot) and writes its records."""

import json

import torch

from mmfast.bench.__main__ import main
from mmfast.bench.norm import NormCase

FIELDS = {"op", "provider", "direction", "dtype", "M", "N", "ms", "gbps", "frac_of_copy", "peak_mem_bytes",
          "device", "torch", "triton", "commit"}


def test_bench_quick_run(tmp_path, capsys):
    rc = main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "NOT GPU performance" in out.out or torch.cuda.is_available()
    data = json.loads((tmp_path / "results.json").read_text())
    records = data["records"]
    assert {r["provider"] for r in records} >= {"hf-eager", "torch-native", "torch.compile"}
    assert any(r["provider"].startswith("mmfast-") for r in records)
    assert {r["direction"] for r in records} == {"fwd", "bwd", "fwd+bwd"}
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["error"] is None and r["ms"] > 0 and r["gbps"] > 0


def test_byte_model():
    c = NormCase("rms_norm", 10, 100, torch.bfloat16)
    assert c.bytes_moved("fwd") == 4 * 10 * 100  # read x, write y
    assert c.bytes_moved("bwd") == 6 * 10 * 100  # read x, dy; write dx
    r = NormCase("layer_norm", 10, 100, torch.float32, residual=True)
    assert r.bytes_moved("fwd") == 4 * 4 * 10 * 100  # read x, residual; write y, residual_out
    assert r.bytes_moved("fwd+bwd") == r.bytes_moved("fwd") + 4 * 4 * 10 * 100
