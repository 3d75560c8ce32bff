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


def test_peak_bandwidth_names_that_contain_other_names():
    """torch.cuda.get_device_name() strings: a name inside another (H200 in GH200, A10 in A100, L4 in L40S, H100 in
    H100 PCIe) must not take the other's bandwidth."""
    names = {"NVIDIA H200": 4.8e12, "NVIDIA GH200 480GB": 4.0e12, "NVIDIA H100 80GB HBM3": 3.35e12,
             "NVIDIA H100 PCIe": 2.0e12, "NVIDIA A100-SXM4-80GB": 2.039e12, "NVIDIA A100-SXM4-40GB": 1.555e12,
             "NVIDIA A10G": 0.6e12, "NVIDIA L40S": 0.864e12, "NVIDIA L4": 0.3e12, "a new accelerator": 0.0}
    assert {name: common.get_peak_bandwidth(name) for name in names} == names
