import pytest
import torch

from sparsedeploy.common.models import find_blocks, find_linears
from sparsedeploy.prune.calibration import EngineConfig, InputStats, capture_block_inputs, walk_blocks


def _dense_reference_stats(model, samples):
    """Per-linear input statistics obtained by running the whole dense model, one sample at a time."""
    ref = {}
    handles = []
    for b, block in enumerate(find_blocks(model)):
        for name, lin in find_linears(block).items():
            key = (b, name)
            ref[key] = InputStats(lin.in_features, torch.device("cpu"), with_hessian=True)
            handles.append(lin.register_forward_pre_hook(lambda _m, args, key=key: ref[key].update(args[0])))
    with torch.no_grad():
        for j in range(samples.shape[0]):
            model(samples[j : j + 1], use_cache=False)
    for h in handles:
        h.remove()
    return ref


def test_engine_statistics_equal_dense_model(tiny_model, tiny_samples):
    ref = _dense_reference_stats(tiny_model, tiny_samples)
    seen = {}

    def record(index, block, linears, stats, _forward):
        assert set(stats) == set(linears)
        for name, st in stats.items():
            seen[(index, name)] = st

    walk_blocks(tiny_model, tiny_samples, EngineConfig(need_hessian=True, show_progress=False), record)
    assert set(seen) == set(ref)
    for key, st in seen.items():
        assert st.count == ref[key].count == tiny_samples.numel()
        assert torch.allclose(st.sum, ref[key].sum, atol=1e-4)
        assert torch.allclose(st.sumsq, ref[key].sumsq, rtol=1e-5, atol=1e-4)
        assert torch.allclose(st.xtx, ref[key].xtx, rtol=1e-5, atol=1e-3)


def test_linears_reading_one_tensor_share_stats(tiny_model, tiny_samples):
    groups = {}

    def record(index, block, linears, stats, _forward):
        groups[index] = stats

    walk_blocks(tiny_model, tiny_samples, EngineConfig(show_progress=False), record)
    st = groups[0]
    assert st["self_attn.q_proj"] is st["self_attn.k_proj"] is st["self_attn.v_proj"]
    assert st["mlp.gate_proj"] is st["mlp.up_proj"]
    assert st["self_attn.o_proj"] is not st["self_attn.q_proj"]
    assert st["mlp.down_proj"] is not st["mlp.up_proj"]
    assert st["self_attn.q_proj"].count == tiny_samples.numel()  # counted once, not three times


def test_sample_order_does_not_matter(tiny_model, tiny_samples):
    """No state (e.g. a KV cache) may leak from one calibration sample into the next."""

    def collect(samples):
        out = {}
        walk_blocks(
            tiny_model,
            samples,
            EngineConfig(show_progress=False),
            lambda i, b, lins, s, _f: out.update({(i, n): st.sumsq.clone() for n, st in s.items()}),
        )
        return out

    a = collect(tiny_samples)
    b = collect(tiny_samples.flip(0))
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_block_fn_changes_propagate_and_start_block(tiny_model, tiny_samples):
    calls, done = [], []

    def zero_q(index, block, linears, stats, _forward):
        calls.append(index)
        linears["self_attn.q_proj"].weight.data.zero_()

    walk_blocks(
        tiny_model,
        tiny_samples,
        EngineConfig(show_progress=False),
        zero_q,
        start_block=1,
        on_block_done=lambda i, b: done.append(i),
    )
    assert calls == [1] and done == [1]
    blocks = find_blocks(tiny_model)
    assert blocks[1].self_attn.q_proj.weight.abs().sum() == 0
    assert blocks[0].self_attn.q_proj.weight.abs().sum() > 0


def test_capture_gives_every_block_its_own_arguments(tiny_model, tiny_samples):
    inputs, calls = capture_block_inputs(tiny_model, tiny_samples, torch.device("cpu"))
    assert len(inputs) == tiny_samples.shape[0]
    assert inputs[0].shape == (1, tiny_samples.shape[1], tiny_model.config.hidden_size)
    assert len(calls) == len(find_blocks(tiny_model))
    for _args, kwargs in calls:
        assert "past_key_values" not in kwargs and "past_key_value" not in kwargs
        assert "position_embeddings" in kwargs
    # blocks were restored after capture
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in find_blocks(tiny_model))


def test_input_stats_moments():
    x = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    st = InputStats(2, torch.device("cpu"), with_hessian=True)
    st.update(x)
    assert st.mean.tolist() == [2.0, 0.0]
    assert st.var.tolist() == [1.0, 4.0]
    assert torch.allclose(st.hessian, 2.0 / 2 * x.T @ x)
    with pytest.raises(RuntimeError):
        _ = InputStats(2, torch.device("cpu")).hessian


def test_capture_runs_only_block_0_once_and_returns_what_the_block_returns(tiny_model, tiny_samples):
    """The recorders hand the model loop the real block's output structure, learnt from one run of block 0."""
    from sparsedeploy.prune.calibration import _like

    runs = []
    handles = [
        b.register_forward_hook(lambda _m, _a, out, i=i: runs.append((i, type(out))))
        for i, b in enumerate(find_blocks(tiny_model))
    ]
    capture_block_inputs(tiny_model, tiny_samples, torch.device("cpu"))
    for h in handles:
        h.remove()
    assert [i for i, _t in runs] == [0]  # one real run, of block 0, for the whole capture
    hidden = torch.ones(1, 3, 4)
    assert _like(torch.zeros(1), hidden) is hidden
    out = _like((torch.zeros(1), None), hidden)
    assert type(out) is tuple and out[0] is hidden and out[1] is None
    with pytest.raises(RuntimeError, match="only a tensor or a tuple"):
        _like({"hidden": hidden}, hidden)


def test_capture_refuses_a_block_0_without_weights(tiny_model, tiny_samples):
    find_blocks(tiny_model)[0].to("meta")
    with pytest.raises(RuntimeError, match="no weights during capture"):
        capture_block_inputs(tiny_model, tiny_samples, torch.device("cpu"))
