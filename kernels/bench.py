"""`python -m sparse_llm.kernels.bench {inference,training} [options]`: kernel timings against dense
PyTorch (eager and torch.compile) measured in the same run."""
import sys


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("inference", "training"):
        sys.exit("usage: python -m sparse_llm.kernels.bench {inference,training} [--help]")
    if argv[0] == "inference":
        from sparse_llm.kernels.bench_inference import main as run
    else:
        from sparse_llm.kernels.bench_training import main as run
    run(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
