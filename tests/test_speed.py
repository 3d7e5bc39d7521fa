"""bigmodel_jax/speed.py: which peak a device kind (as jax reports it) takes, and MFU only where one is known."""

import types

import jax
import ml_collections
import numpy as np
import pytest

from bigmodel_jax import speed


@pytest.mark.parametrize("kind, row, bf16", [
    ("NVIDIA H100 80GB HBM3", "H100", 989.0),  # SXM
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.0),
    ("NVIDIA H200", "H200", 989.0),  # SXM
    ("NVIDIA H200 NVL", "H200 NVL", 835.0),  # not the SXM row
    ("NVIDIA GH200 480GB", "GH200", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("A100-SXM4-40GB", "A100", 312.0),  # older drivers: no "NVIDIA "
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA L4", "L4", 121.0),
    ("TPU v4", "TPU v4", 275.0),
    ("TPU v5", "TPU v5", 459.0),  # v5p on a TPU VM
    ("TPU v5p", "TPU v5p", 459.0),  # v5p under Pathways
    ("TPU v5 lite", "TPU v5 lite", 197.0),  # v5e: not v5p's row
    ("TPU v6 lite", "TPU v6 lite", 918.0),
])
def test_a_known_device_kind_takes_its_own_row(kind, row, bf16):
  assert speed.peak_name(kind) == row
  assert speed.peak_flops(kind, "bfloat16") == bf16 * 1e12


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA L40S", "NVIDIA H800", "NVIDIA GeForce RTX 4090", "TPU v4 lite",
                                  "TPU7x", "Radeon H100", ""])
def test_an_unknown_device_kind_has_no_peak(kind):
  assert speed.peak_flops(kind, "bfloat16") is None and speed.peak_flops(kind, "float32") is None


def test_float32_takes_tf32_on_gpus_and_an_unlisted_dtype_the_float32_peak():
  assert speed.peak_flops("NVIDIA H200 NVL", "float32") == 418.0e12
  assert speed.peak_flops("NVIDIA H100 80GB HBM3", "float16") == 494.0e12


def _gpt_rates(monkeypatch, device_kind):
  monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(device_kind=device_kind)])
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  config = ml_collections.ConfigDict({"model": {"name": "gpt", "num_layers": 2, "embed_dim": 8},
                                      "train": {"dtype": "bfloat16"}})
  dataset = types.SimpleNamespace(is_text=True, input_shape=(16,), kind="lm")
  params = {"embed": np.zeros((32, 8)), "pos_embed": np.zeros((16, 8)), "w": np.zeros((8, 8))}
  return speed.run_rates(config, dataset, params)({"tokens_per_s": 1e6})


def test_a_run_logs_mfu_only_on_a_device_with_a_known_peak(monkeypatch):
  known = _gpt_rates(monkeypatch, "NVIDIA H100 80GB HBM3")
  flops = 6 * (32 * 8 + 8 * 8) + 6 * 2 * 8 * 16  # 6N (no position table) + 6LdT
  assert known["model_tflops_per_s"] == pytest.approx(1e6 * flops / 1e12)
  assert known["mfu"] == pytest.approx(1e6 * flops / 989e12)
  unknown = _gpt_rates(monkeypatch, "cpu")
  assert unknown["model_tflops_per_s"] == known["model_tflops_per_s"] and "mfu" not in unknown
