import os

import pytest
import torch

from nanochat import common


def test_base_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "x"))
    assert common.get_base_dir() == str(tmp_path / "x")
    assert os.path.isdir(tmp_path / "x")


def test_compute_dtype_pinned_by_env():
    # conftest pins float32 so CPU results are exact and comparable
    assert common.COMPUTE_DTYPE == torch.float32


def test_bad_dtype_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "int8")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE"):
        common._detect_compute_dtype()


def test_single_process_init_on_cpu():
    ddp, rank, local_rank, world, device = common.compute_init("cpu")
    assert (ddp, rank, world, device.type) == (False, 0, 1, "cpu")


def test_peak_flops_table():
    assert common.get_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.get_peak_flops("some unknown accelerator") == 0.0
