
import pytest
from hydra.errors import HydraException

from sparse_llm.config import ConfigError, grad_accumulation_steps, validate
from tests.helpers import CONF_DIR, compose_config

GROUP_OPTIONS = [(group.name, option.stem) for group in sorted(CONF_DIR.iterdir()) if group.is_dir()
                 for option in sorted(group.glob("*.yaml"))]


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_config_file_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "shards":
        overrides.append("data.path=/tmp/some_shards")
    if group == "parallel":
        overrides.append("micro_batch_size=8")  # so that a world of `replicate` ranks divides the batch
    if group == "kernel" and option != "torch":
        overrides.append("sparsity=l1")
    cfg = compose_config(overrides)
    validate(cfg, world_size=cfg.parallel.replicate)


def test_defaults_are_the_tiny_sparse_run():
    cfg = compose_config()
    assert (cfg.model.name, cfg.sparsity.ffn, cfg.kernel.name, cfg.data.name) == ("tiny", "relu_gated", "torch", "default")
    assert cfg.run_name == "tiny-l1"


@pytest.mark.parametrize("name,layers", [("0p5b", 8), ("1b", 18), ("1p5b", 28), ("2b", 38)])
def test_paper_shapes(name, layers):
    cfg = compose_config([f"model={name}"])
    m = cfg.model
    assert (m.d_model, m.d_ff, m.n_heads, m.vocab_size, m.seq_len, m.n_layers) == (2048, 5632, 32, 49152, 2048, layers)
    assert cfg.tokens_per_step == 512 * 2048 and cfg.max_steps == 30000 and cfg.schedule.warmup_steps == 600
    assert cfg.optim.lr == 1e-3 and list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.weight_decay == 0.1


def test_command_line_override_reaches_the_dataclass():
    cfg = compose_config(["model=1b", "sparsity.l1=1e-4"])
    assert cfg.sparsity.l1 == 1e-4 and cfg.model.n_layers == 18


@pytest.mark.parametrize("overrides,match", [
    (["model.d_model=130"], "model.d_model=130 is not divisible by model.n_heads"),
    (["sparsity.l1=-1"], "sparsity.l1"),
    (["sparsity=dense", "sparsity.l1=1e-3"], "sparsity.l1"),
    (["kernel=hybrid", "sparsity=dense"], "kernel=hybrid"),
    (["data=shards", "data.path=null"], "data.path"),
    (["tokens_per_step=1000"], "tokens_per_step=1000"),
    (["optim.lr=0"], "optim.lr"),
    (["logging.wandb.mode=sometimes"], "logging.wandb.mode"),
    (["run_name=a/b"], "run_name"),
    (["parallel.grad_sync=sometimes"], "parallel.grad_sync"),
])
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_config(overrides))


@pytest.mark.parametrize("override,match", [("model.not_a_key=1", "not_a_key"), ("model=xxl", "model/xxl"),
                                            ("model.d_model=abc", "d_model")])
def test_unknown_keys_groups_and_types_fail_at_composition(override, match):
    with pytest.raises(HydraException, match=match):
        compose_config([override])


def test_grad_accumulation_from_tokens_per_step():
    cfg = compose_config(["tokens_per_step=16384", "micro_batch_size=4"])  # tiny: seq 256
    assert grad_accumulation_steps(cfg, world_size=1) == 16
    assert grad_accumulation_steps(cfg, world_size=4) == 4
    with pytest.raises(ConfigError, match="world size"):
        grad_accumulation_steps(cfg, world_size=3)
    # the error names the overrides that fit: 4096 tokens on 2 ranks of 16 x 256 sequences
    cfg = compose_config(["tokens_per_step=4096", "micro_batch_size=16"])
    with pytest.raises(ConfigError, match="set tokens_per_step=8192 or micro_batch_size=8"):
        grad_accumulation_steps(cfg, world_size=2)
    cfg = compose_config(["tokens_per_step=768", "micro_batch_size=2"])  # 3 sequences: no micro-batch fits 2 ranks
    with pytest.raises(ConfigError, match=r"set tokens_per_step=1024$"):
        grad_accumulation_steps(cfg, world_size=2)
