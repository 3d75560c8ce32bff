"""
Things every stage needs: where artifacts live, which device and dtype we compute in,
distributed set-up (torchrun), and rank-0 printing.
"""

import os
import logging

import torch
import torch.distributed as dist

# Configure only our own logger: a root basicConfig would also switch on the INFO chatter of libraries
# (rustbpe logs every 1% of merges).
logger = logging.getLogger("nanochat")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# -----------------------------------------------------------------------------
# Artifact root

def get_base_dir():
    """$NANOCHAT_BASE_DIR, default ~/.cache/nanochat, created on demand."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


# -----------------------------------------------------------------------------
# Compute dtype (explicit, no autocast). Master weights stay fp32; Linear casts its weight to this.

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def cpu_has_fast_bf16():
    """bf16 matmuls only pay off on CPUs with native bf16 dot products (AVX512-BF16 / AMX); elsewhere they are
    emulated, far slower than fp32 (dev/PERF.md, "bf16 on CPU")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def _detect_compute_dtype():
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        if override not in _DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE={override!r} is not one of bfloat16, float16, float32")
        dtype = _DTYPES[override]
        if (dtype == torch.bfloat16 and not torch.cuda.is_available() and not torch.backends.mps.is_available()
                and not cpu_has_fast_bf16()):
            logger.warning("NANOCHAT_DTYPE=%s on a CPU without native bf16 (no avx512_bf16/amx_bf16 in "
                           "/proc/cpuinfo): its matmuls are emulated, ~100x slower than float32. Unset "
                           "NANOCHAT_DTYPE to compute in float32 here.", override)
        return dtype
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return torch.bfloat16 if major >= 8 else torch.float32
    if cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


COMPUTE_DTYPE = _detect_compute_dtype()


def embedding_table_dtype(device):
    """Storage dtype of the embedding tables (wte, value embeddings). On CUDA the compute dtype, as nanochat
    does: it halves tables and their gradients, GBs at d20+; fp16 keeps fp32 because GradScaler cannot unscale
    fp16 gradients. Elsewhere fp32 master weights like every matrix: bf16 tables round away part of each update
    and of the summed row gradients (dev/PERF.md, "bf16 on CPU")."""
    device = torch.device(device)
    if device.type == "cuda" and COMPUTE_DTYPE != torch.float16:
        return COMPUTE_DTYPE
    return torch.float32


# -----------------------------------------------------------------------------
# Printing and devices

def is_rank0():
    """True in a single process and on torchrun's rank 0: the process that prints, logs and writes reports."""
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs)


def warn_if_cpu_is_busy(what="each step"):
    """OpenMP threads wait for each other at every op; when other processes hold the cores, one thread gets
    descheduled and the rest wait: several times slower steps (dev/PERF.md, "Busy machines"). Call it for CPU
    runs only."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    if threads > 1 and load > 0.5 * cores:
        print0(f"WARNING: this machine is busy (load {load:.1f} on {cores} cores) and torch uses {threads} threads: "
               f"{what} can be several times slower than with OMP_NUM_THREADS=1 (or OMP_WAIT_POLICY=PASSIVE).")


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def is_ddp_requested():
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def is_ddp_initialized():
    return dist.is_available() and dist.is_initialized()


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from torchrun's environment."""
    if is_ddp_requested():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type="", seed=42):
    """Seed (42 is nanochat's only seed), pick the device, and join the process group when launched by torchrun
    (NCCL on CUDA, gloo on CPU). Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device-type cuda was requested but torch sees no CUDA GPU. "
                           "Install a CUDA build of torch or pass --device-type cpu.")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device-type mps was requested but MPS is not available. Pass --device-type cpu.")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and not is_ddp_initialized():
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        dist.barrier()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    if rank == 0:
        logger.info(f"device={device} world_size={world_size} compute_dtype={COMPUTE_DTYPE}")
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if is_ddp_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Peak FLOPs for MFU (dense bf16 tensor-core numbers, per device)

_PEAK_FLOPS = [
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("B300", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("A10G", 125e12), ("A10", 125e12), ("A6000", 155e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("RTX 6000 Ada", 364e12), ("4090", 165e12), ("4080", 97e12), ("3090", 71e12),
    ("3080", 59e12), ("V100", 125e12), ("T4", 65e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


# Peak memory bandwidth for MBU (bytes/s, per device). First match wins: the more specific names come before the
# names they contain (GH200 before H200, A100 before A10, L40 before L4).
_PEAK_BANDWIDTH = [
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
    ("H800", 3.35e12), ("B200", 8.0e12), ("B300", 8.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB", 1.935e12),
    ("A100", 1.555e12), ("A800", 2.039e12), ("A10G", 0.6e12), ("A10", 0.6e12), ("A6000", 0.768e12),
    ("L40S", 0.864e12), ("L40", 0.864e12), ("L4", 0.3e12), ("RTX 6000 Ada", 0.96e12), ("4090", 1.008e12),
    ("4080", 0.717e12), ("3090", 0.936e12), ("3080", 0.76e12), ("V100", 0.9e12), ("T4", 0.32e12),
    ("MI300X", 5.3e12), ("MI250X", 3.2e12),
]


def _lookup(table, device_name):
    for key, value in table:
        if key.lower() in device_name.lower():
            return value
    return 0.0


def get_peak_flops(device_name):
    """Peak FLOP/s for a device name (torch.cuda.get_device_name()); 0 when unknown (MFU then reads 0)."""
    return _lookup(_PEAK_FLOPS, device_name)


def get_peak_bandwidth(device_name):
    """Peak memory bandwidth in bytes/s for a device name; 0 when unknown (MBU then reads 0)."""
    return _lookup(_PEAK_BANDWIDTH, device_name)


class DummyWandb:
    """Stands in for wandb when --run dummy: same calls, does nothing."""
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass
