"""kernel=auto routing on CPU: decisions follow the measured active fraction with hysteresis, are
read back only at log steps, and survive a checkpoint."""
import torch

from sparse_llm.config import ModelConfig, compose_config
from sparse_llm.kernels.reference import activation_stats
from sparse_llm.model import FFNStats, ModelOutput, Transformer
from sparse_llm.train.routing import KernelRouting


class FakeTrainer:
    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")


def output_with_active(n_layers, d_ff, active_per_token, tokens=64):
    stats = []
    for active in active_per_token:
        h = torch.zeros(tokens, d_ff)
        h[:, :active] = 1.0
        stats.append(FFNStats(*activation_stats(h)))
    return ModelOutput(torch.zeros(1), stats)


def test_auto_trains_on_the_kernels_only_below_the_whole_model_crossover():
    # 0.7% active: TwELL inference is faster, but whole training steps were not: dense training
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=1000, vocab_size=10, seq_len=8)
    model = Transformer(cfg, kernel="auto")
    callback = KernelRouting(cfg.d_model, cfg.d_ff)
    callback.on_fit_start(FakeTrainer(model))
    for _ in range(200):
        callback.on_micro_batch_end(None, output_with_active(2, 1000, [7, 3]))
    callback.on_step_end(None, 1, {})
    assert callback.ffns[0].route_inference and not callback.ffns[0].route_training
    assert callback.ffns[1].route_inference and callback.ffns[1].route_training


def test_layers_switch_with_hysteresis_at_log_steps():
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=1000, vocab_size=10, seq_len=8)
    model = Transformer(cfg, kernel="auto")
    routing = KernelRouting(cfg.d_model, cfg.d_ff)
    trainer = FakeTrainer(model)
    routing.on_fit_start(trainer)
    ffns = routing.ffns
    assert not any(f.route_training or f.route_inference for f in ffns)
    for _ in range(200):  # layer 0 at 0.2% active (sparse), layer 1 at 50%
        routing.on_micro_batch_end(trainer, output_with_active(2, 1000, [2, 500]))
    routing.on_step_end(trainer, 1, None)  # not a log step: nothing read back
    assert not ffns[0].route_training
    metrics = {}
    routing.on_step_end(trainer, 2, metrics)
    assert ffns[0].route_training and ffns[0].route_inference
    assert not ffns[1].route_training and not ffns[1].route_inference
    assert metrics["kernel/layers_on_kernel"] == 1
    # between the switch-on and switch-off thresholds: layer 0 stays on the kernel
    inside = round(1000 * (routing.router.low + routing.router.high) / 2)
    assert routing.router.low < inside / 1000 < routing.router.high
    for _ in range(200):
        routing.on_micro_batch_end(trainer, output_with_active(2, 1000, [inside, 500]))
    routing.on_step_end(trainer, 3, {})
    assert ffns[0].route_training
    state = routing.state_dict()
    restored = KernelRouting(cfg.d_model, cfg.d_ff)
    restored.load_state_dict(state)
    model2 = Transformer(cfg, kernel="auto")
    restored.on_fit_start(FakeTrainer(model2))
    assert restored.ffns[0].route_training and not restored.ffns[1].route_training


def test_cpu_calls_always_use_the_reference():
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, vocab_size=10, seq_len=8)
    ffn = Transformer(cfg, kernel="auto").blocks[0].ffn
    ffn.route_training = ffn.route_inference = True
    assert ffn.kernel_for_call(torch.zeros(2, 32)) is None


def test_kernels_without_cupy_on_a_gpu_is_a_clear_error(monkeypatch):
    import builtins

    import pytest

    from sparse_llm.config import ConfigError
    from sparse_llm.train.run import check_kernel_runtime

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(ConfigError, match=r"kernel=hybrid needs CuPy.*\.\[gpu\]"):
        check_kernel_runtime(compose_config(["kernel=hybrid", "model=small"]), torch.device("cuda", 0))
    check_kernel_runtime(compose_config(["kernel=torch"]), torch.device("cuda", 0))  # the reference needs no CuPy
    check_kernel_runtime(compose_config(["kernel=hybrid"]), torch.device("cpu"))     # CPU runs the reference


def test_kernels_the_shape_or_precision_rules_out_are_named_at_start(monkeypatch, caplog):
    import sys
    import types

    import pytest

    from sparse_llm.config import ConfigError
    from sparse_llm.train.run import check_kernel_runtime

    from sparse_llm.train import run

    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))  # present, as on a GPU machine
    monkeypatch.setattr(run, "compute_capability", lambda device: (9, 0))
    gpu = torch.device("cuda", 0)
    # kernel=twell would raise at the first evaluation
    with pytest.raises(ConfigError, match=r"multiples of 64.*model\.d_model=320, model\.d_ff=900"):
        check_kernel_runtime(compose_config(["kernel=twell", "model.d_model=320", "model.d_ff=900"]), gpu)
    with pytest.raises(ConfigError, match=r"precision=fp32.*or precision=bf16"):
        check_kernel_runtime(compose_config(["kernel=twell", "model=small", "precision=fp32"]), gpu)
    with caplog.at_level("WARNING", logger="sparse_llm"):
        # the hybrid op would run its PyTorch reference: a warning that names the key
        check_kernel_runtime(compose_config(["kernel=hybrid", "model=tiny"]), gpu)
        assert "model.d_model=128" in caplog.text and "multiple of 256" in caplog.text
        caplog.clear()
        check_kernel_runtime(compose_config(["kernel=hybrid", "model=small", "precision=fp32"]), gpu)
        assert "precision=fp32" in caplog.text
        caplog.clear()
        # kernel=auto keeps such layers dense, and says so
        check_kernel_runtime(compose_config(["kernel=auto", "model.d_model=320", "model.d_ff=960"]), gpu)
        assert "dense in training" in caplog.text and "dense in evaluation" not in caplog.text
        caplog.clear()
        for kernel in ("twell", "hybrid", "auto"):
            check_kernel_runtime(compose_config([f"kernel={kernel}", "model=small"]), gpu)  # d_model 512: supported
        assert caplog.text == ""
        # a GPU older than Ampere: the kernels' PTX does not build there
        from sparse_llm.kernels.loader import capability_problem

        assert capability_problem(8, 0) is None and capability_problem(9, 0) is None and capability_problem(7, 5)
        monkeypatch.setattr(run, "compute_capability", lambda device: (7, 0))
        with pytest.raises(ConfigError, match=r"compute capability 7\.0 .* 8\.0 or newer; use kernel=hybrid or kernel=torch"):
            check_kernel_runtime(compose_config(["kernel=twell", "model=small"]), gpu)
        check_kernel_runtime(compose_config(["kernel=auto", "model=small"]), gpu)
        assert "dense in training" in caplog.text and "dense in evaluation" in caplog.text


def test_auto_keeps_layers_dense_where_the_kernels_cannot_run():
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=1000, vocab_size=10, seq_len=8)
    for training, inference in ((False, True), (True, False), (False, False)):
        routing = KernelRouting(cfg.d_model, cfg.d_ff, training=training, inference=inference)
        routing.on_fit_start(FakeTrainer(Transformer(cfg, kernel="auto")))
        for _ in range(200):  # 0.2% active: both kernels would be chosen
            routing.on_micro_batch_end(None, output_with_active(2, 1000, [2, 2]))
        routing.on_step_end(None, 1, {})
        assert all(f.route_training == training and f.route_inference == inference for f in routing.ffns)
