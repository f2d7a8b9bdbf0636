"""Train a sparse (or dense) decoder-only LM.

    python train.py                                   # tiny model, default corpus, CPU or GPU
    python train.py model=small sparsity.l1=1e-3      # Hydra overrides: group=option, key=value
    python train.py --cfg                             # print the composed config and exit
"""
from __future__ import annotations

import logging
import sys

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparse_llm.config import ConfigError, compose_config, validate
from sparse_llm.data import DataError
from sparse_llm.train.trainer import TrainingDiverged


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    print_only = "--cfg" in argv
    overrides = [arg for arg in argv if arg != "--cfg"]
    try:
        cfg = compose_config(overrides)
        from sparse_llm.parallel.distributed import init_distributed, shutdown

        world = init_distributed(cfg.device)
        try:  # the process group goes down on every way out, a config error at start included
            run(cfg, world, print_only)
        finally:
            shutdown()
    except (ConfigError, DataError, HydraException, OmegaConfBaseException) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 3
    return 0


def run(cfg, world, print_only: bool) -> None:
    if not world.is_main:  # one console for the run; torchrun --log-dir keeps every rank's own output
        logging.getLogger().setLevel(logging.WARNING)
    validate(cfg, world.size)
    if print_only:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return
    from sparse_llm.train.run import build_trainer

    trainer = build_trainer(cfg, world)
    try:
        trainer.fit()
    finally:
        trainer.logger.close()


def one_line(error: Exception) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
