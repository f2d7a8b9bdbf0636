"""Run `train.main(args)` in N local processes on gloo, as torchrun would (for the dist tests)."""
from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: list[str], codes) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import train

    codes[rank] = train.main(args)


def run_world(world: int, args: list[str]) -> list[int]:
    """Exit codes of the ranks."""
    manager = mp.Manager()
    codes = manager.dict()
    mp.start_processes(_worker, args=(world, free_port(), args, codes), nprocs=world, start_method="spawn")
    return [codes[rank] for rank in range(world)]
