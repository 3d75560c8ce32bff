"""CORE of a fixed model is deterministic and identical on 1 and 2 gloo ranks (real process group)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import core_eval as ce
from tests.test_core_eval import TOK, BigramModel, random_table


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, bundle, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = ce.evaluate_core(BigramModel(random_table(7)), TOK, "cpu", bundle_dir=bundle)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_core_equal_on_one_and_two_ranks(tmp_path, write_eval_bundle):
    bundle = tmp_path / "bundle"
    write_eval_bundle(bundle)
    single = ce.evaluate_core(BigramModel(random_table(7)), TOK, "cpu", bundle_dir=str(bundle))
    again = ce.evaluate_core(BigramModel(random_table(7)), TOK, "cpu", bundle_dir=str(bundle))
    assert single == again  # deterministic
    mp.start_processes(_rank_main, args=(2, _free_port(), str(bundle), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["results"] == pytest.approx(single["results"], abs=1e-12)
        assert out["core_metric"] == pytest.approx(single["core_metric"], abs=1e-12)
