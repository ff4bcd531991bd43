"""The DeepSparse worker's replies, its engine replaced by a stand-in (DeepSparse itself is tested where installed)."""

import pytest

from sparsedeploy.runtimes import decoder_stack, deepsparse_worker


class _Engine:
    def run(self, data):
        return [data]


@pytest.fixture
def no_deepsparse(monkeypatch):
    monkeypatch.setattr(deepsparse_worker, "_engine", lambda *args, **kwargs: _Engine())
    monkeypatch.setattr(deepsparse_worker, "_inputs", lambda path, batch: [path])


def test_bench_reply_names_every_variant(no_deepsparse):
    req = {"action": "bench", "models": {"dense": "d.onnx", "sparse": "s.onnx"}, "batch": 2, "threads": 3}
    reply = deepsparse_worker.handle({**req, "rounds": 2, "per_round": 1, "warmup": 0})
    assert list(reply) == ["times", "inner", "order", "compile_s", "threads", "batch"]
    assert set(reply["times"]) == set(reply["inner"]) == set(reply["compile_s"]) == {"dense", "sparse"}
    assert all(len(t) == 2 for t in reply["times"].values())
    assert (reply["threads"], reply["batch"]) == (3, 2)


def test_bench_generate_reply_has_each_phase(no_deepsparse, monkeypatch):
    monkeypatch.setattr(decoder_stack.StackHead, "load", staticmethod(lambda path: path))
    monkeypatch.setattr(decoder_stack, "random_prompt", lambda head, n: list(range(n)))
    monkeypatch.setattr(decoder_stack, "generation_phases", lambda *a: {"prefill": 0.01, "decode": 0.02})
    files = {"head": "h.npz", "prefill": "p.onnx", "step": "s.onnx"}
    req = {"action": "bench_generate", "models": {"dense": files, "sparse": files}, "batch": 1, "threads": 1}
    reply = deepsparse_worker.handle({**req, "prompt_len": 4, "gen_len": 2, "rounds": 2, "warmup": 0})
    assert list(reply) == ["times", "phases", "order", "compile_s", "threads", "batch"]
    assert reply["phases"]["sparse"] == {"prefill": [0.01, 0.01], "decode": [0.02, 0.02]}
