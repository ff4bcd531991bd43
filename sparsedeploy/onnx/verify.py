"""Proving an ONNX export kept the pruned model: sparsity equality, N:M layout, and logit parity.

* Sparsity: every pruned linear's weight is located in the ONNX graph -- by the exporter's node
  scope names, else by an exact value fingerprint, else by shape and closest values -- following
  Identity/Cast/Transpose chains and Gemm/FusedMatMul ``transB``; its zero count must equal that of
  the PyTorch tensor (cast to the ONNX dtype), its values must be identical, and every position the
  pruning mask removed must be zero.
* N:M: in the ONNX layout a MatMul computes ``A[.., K] @ B[K, N]``, so the groups of M run down
  axis 0 of the effective B (the reduction dimension), which is what TensorRT's sparse kernels need.
* Parity: the same prompts through PyTorch and ONNX Runtime, prefill and decode steps with the KV
  cache, max |delta logits|, and greedy continuations compared token for token.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.sparsity import nm_violations
from sparsedeploy.onnx.graph import Graph, OnnxWeight, fingerprint, scope_key

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("The capital of France is", "In the beginning of the twentieth century, the city")
FP32_ATOL = 1e-4
# float16 ONNX vs the float32 PyTorch model, measured (docs/export.md): 0.042 (Wanda 50 %) and 0.046 (2:4) on
# smollm2-135m, 0.0005 on the tiny test model. The bound leaves ~2x headroom over the worst measured value.
FP16_ATOL = 0.1


# ---------------------------------------------------------------- sparsity verification


@dataclass
class LayerCheck:
    name: str
    onnx_source: str | None
    onnx_node: str | None
    matched_by: str | None
    torch_shape: list[int]
    onnx_shape: list[int] | None
    transposed: bool | None
    zeros_torch: int
    zeros_onnx: int | None
    pruned_by_mask: int | None
    pruned_nonzero_in_onnx: int | None
    max_abs_diff: float | None
    sparsity: float
    ok: bool
    nm_ok: bool | None = None
    nm_reason: str | None = None
    problem: str | None = None


@dataclass
class SparsityReport:
    layers: list[LayerCheck]
    nm: str | None

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers) and (self.nm is None or all(layer.nm_ok for layer in self.layers))

    @property
    def problems(self) -> list[str]:
        out = [f"{layer.name}: {layer.problem}" for layer in self.layers if not layer.ok]
        if self.nm:
            out += [
                f"{layer.name}: not {self.nm} along K ({layer.nm_reason})"
                for layer in self.layers
                if layer.ok and not layer.nm_ok
            ]
        return out

    def to_dict(self) -> dict:
        zeros_t = sum(layer.zeros_torch for layer in self.layers)
        zeros_o = sum(layer.zeros_onnx or 0 for layer in self.layers)
        total = sum(int(np.prod(layer.torch_shape)) for layer in self.layers)
        return {
            "ok": self.ok,
            "nm_pattern": self.nm,
            "linears": len(self.layers),
            "total_weights": total,
            "zeros_torch": zeros_t,
            "zeros_onnx": zeros_o,
            "sparsity": zeros_t / max(total, 1),
            "nm_qualifying": None if self.nm is None else sum(bool(layer.nm_ok) for layer in self.layers),
            "problems": self.problems,
            "layers": [asdict(layer) for layer in self.layers],
        }


def verify_sparsity(
    model,
    reference: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None = None,
    nm: tuple[int, int] | None = None,
) -> SparsityReport:
    """Match each reference linear weight ([out, in], in the ONNX dtype) to the graph and compare zeros exactly."""
    graph = Graph(model)
    weights = graph.matmul_weights()
    by_scope: dict[str, list[OnnxWeight]] = {}
    for weight in weights:
        by_scope.setdefault(scope_key(weight.node), []).append(weight)
    by_print: dict[str, OnnxWeight] = {}
    for weight in weights:
        by_print.setdefault(fingerprint(weight.matrix), weight)
    claimed: set[int] = set()
    layers: list[LayerCheck] = []
    pending: list[tuple[str, np.ndarray]] = []

    def match_scope(name: str, expected: np.ndarray) -> OnnxWeight | None:
        key = "." + name + "."
        for scope, found in by_scope.items():
            if key in scope:
                for weight in found:
                    if weight.matrix.shape == expected.shape and id(weight) not in claimed:
                        return weight
        return None

    matches: dict[str, tuple[OnnxWeight | None, str | None]] = {}
    for name, weight_oi in reference.items():
        expected = np.ascontiguousarray(weight_oi.T)  # [K=in, N=out]
        found = match_scope(name, expected)
        how = "node scope name" if found is not None else None
        if found is None:
            found = by_print.get(fingerprint(expected))
            if found is not None and id(found) in claimed:
                found = None
            how = "exact values" if found is not None else None
        if found is not None:
            claimed.add(id(found))
            matches[name] = (found, how)
        else:
            pending.append((name, expected))
    for name, expected in pending:  # last resort: same shape, most values equal
        best, best_eq = None, 0.0
        for weight in weights:
            if id(weight) in claimed or weight.matrix.shape != expected.shape or weight.matrix.dtype != expected.dtype:
                continue
            eq = float((weight.matrix == expected).mean())
            if eq > best_eq:
                best, best_eq = weight, eq
        if best is not None and best_eq >= 0.25:
            claimed.add(id(best))
            matches[name] = (best, f"shape and {best_eq:.0%} equal values")
        else:
            matches[name] = (None, None)

    for name, weight_oi in reference.items():
        expected = np.ascontiguousarray(weight_oi.T)
        found, how = matches[name]
        zeros_t = int((expected == 0).sum())
        mask = None if masks is None or name not in masks else np.ascontiguousarray(masks[name].T)
        pruned = None if mask is None else int((~mask).sum())
        if found is None:
            layers.append(
                LayerCheck(
                    name,
                    None,
                    None,
                    None,
                    list(weight_oi.shape),
                    None,
                    None,
                    zeros_t,
                    None,
                    pruned,
                    None,
                    None,
                    zeros_t / expected.size,
                    False,
                    problem=(
                        f"no MatMul/Gemm weight of shape {list(expected.shape)} (K x N) "
                        "with its values is in the ONNX graph"
                    ),
                )
            )
            continue
        matrix = found.matrix
        zeros_o = int((matrix == 0).sum())
        diff = float(np.abs(matrix.astype(np.float64) - expected.astype(np.float64)).max()) if matrix.size else 0.0
        pruned_nz = None if mask is None else int(((~mask) & (matrix != 0)).sum())
        problem = None
        if zeros_o != zeros_t:
            problem = (
                f"ONNX initializer {found.source} has {zeros_o} zeros but the PyTorch weight has {zeros_t}: "
                "the export lost or changed sparsity"
            )
        elif pruned_nz:
            problem = f"{pruned_nz} positions the pruning mask removed are non-zero in ONNX initializer {found.source}"
        elif diff != 0.0:
            problem = f"ONNX initializer {found.source} differs from the PyTorch weight (max |delta| {diff:.3g})"
        check = LayerCheck(
            name,
            found.source,
            found.node,
            how,
            list(weight_oi.shape),
            list(found.stored_shape),
            found.transposed,
            zeros_t,
            zeros_o,
            pruned,
            pruned_nz,
            diff,
            zeros_t / expected.size,
            problem is None,
            problem=problem,
        )
        if nm is not None:
            check.nm_ok, check.nm_reason = nm_violations(matrix, *nm)
        layers.append(check)
    return SparsityReport(layers, None if nm is None else f"{nm[0]}:{nm[1]}")


# ---------------------------------------------------------------- reference weights from a checkpoint


def checkpoint_reference(
    checkpoint: Path | str, dtype=np.float32
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, tuple[int, int] | None]:
    """Pruned linear weights ([out, in], cast to `dtype`), keep-masks and N:M pattern of a pruned checkpoint."""
    import json

    import torch
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    files = sorted(checkpoint.glob("*.safetensors"))
    files = [f for f in files if f.name != "masks.safetensors"]
    if not files:
        raise UserError(f"{checkpoint} has no *.safetensors weights: pass a checkpoint written by `sparsedeploy prune`")
    masks = None
    mask_file = checkpoint / "masks.safetensors"
    if mask_file.is_file():
        with safe_open(str(mask_file), framework="pt") as handle:
            masks = {key: handle.get_tensor(key).bool().numpy() for key in handle.keys()}
    weights: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if not key.endswith(".weight"):
                    continue
                name = key[: -len(".weight")]
                if masks is not None and name not in masks:
                    continue
                if masks is None and (".layers." not in key and ".h." not in key):
                    continue
                tensor = handle.get_tensor(key)
                if tensor.ndim != 2:
                    continue
                weights[name] = tensor.to(torch.float32).numpy().astype(dtype)
    if masks is not None:
        missing = sorted(set(masks) - set(weights))
        if missing:
            raise UserError(
                f"{checkpoint}: masks.safetensors names {missing[0]} but the checkpoint has no {missing[0]}.weight"
            )
    nm = None
    report = checkpoint / "report.json"
    if report.is_file():
        spec = json.loads(report.read_text()).get("sparsity_spec", "")
        if ":" in str(spec):
            n, m = (int(x) for x in str(spec).split(":"))
            nm = (n, m)
    return weights, masks, nm


# ---------------------------------------------------------------- parity


@dataclass
class ParityReport:
    dtype: str
    atol: float
    prompts: list[dict]
    max_abs_diff: float
    greedy_identical: bool
    ok: bool
    decode_steps: int
    greedy_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _prompt_ids(tokenizer, prompts, vocab: int, seed: int = 0) -> list[np.ndarray]:
    if tokenizer is not None:
        return [np.asarray(tokenizer(p, return_tensors="np")["input_ids"], dtype=np.int64) for p in prompts]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=(1, 8 + 3 * i), dtype=np.int64) for i in range(len(prompts))]


def verify_parity(
    checkpoint: Path | str,
    onnx_path: Path | str,
    prompts=DEFAULT_PROMPTS,
    decode_steps: int = 4,
    greedy_tokens: int = 32,
    atol: float | None = None,
    torch_model=None,
    tokenizer=None,
    custom_op_library: Path | str | None = None,
) -> ParityReport:
    """Prefill + decode steps with the KV cache through PyTorch (float32) and ONNX Runtime; compare logits and greedy
    tokens. custom_op_library: a sparse-cpu export runs whole in ONNX Runtime with it (storage.session_from_path)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsedeploy.onnx.decoder import OnnxDecoder, load_tokenizer

    decoder = OnnxDecoder.load(onnx_path, custom_op_library=custom_op_library)
    dtype = "float16" if decoder.kv_dtype == np.float16 else "float32"
    if atol is None:
        atol = FP16_ATOL if dtype == "float16" else FP32_ATOL
    model = torch_model
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    if tokenizer is None:
        tokenizer = load_tokenizer(checkpoint) or load_tokenizer(decoder.path.parent)
    vocab = int(model.config.vocab_size)

    def torch_run(ids, mask, past):
        positions = torch.from_numpy(np.cumsum(mask, axis=1) - 1)[:, -ids.shape[1] :]
        with torch.no_grad():
            out = model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
            )
        return out.logits.float().numpy(), out.past_key_values

    results, worst, all_same = [], 0.0, True
    for text, ids in zip(prompts, _prompt_ids(tokenizer, prompts, vocab)):
        mask = np.ones_like(ids)
        t_logits, t_past = torch_run(ids, mask, None)
        o_logits, o_past = decoder.run(ids, mask, None)
        diffs = [float(np.abs(t_logits - o_logits.astype(np.float32)).max())]
        for _ in range(decode_steps):  # feed both the same (PyTorch-greedy) token
            token = np.array([[int(t_logits[0, -1].argmax())]], np.int64)
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            t_logits, t_past = torch_run(token, mask, t_past)
            if decoder.with_past:
                o_logits, o_past = decoder.run(token, mask, o_past)
            else:
                ids = np.concatenate([ids, token], axis=1)
                o_logits, _ = decoder.run(ids, mask, None)
                o_logits = o_logits[:, -1:]
            diffs.append(float(np.abs(t_logits[:, -1] - o_logits[:, -1].astype(np.float32)).max()))
        first_ids = (
            _prompt_ids(tokenizer, [text], vocab)[0]
            if tokenizer is not None
            else ids[:, : ids.shape[1] - (0 if decoder.with_past else decode_steps)]
        )
        torch_tokens = _torch_greedy(torch_run, first_ids, greedy_tokens)
        onnx_tokens = decoder.greedy(first_ids, greedy_tokens).tolist()
        same = torch_tokens == onnx_tokens
        first_diff = next((i for i, (a, b) in enumerate(zip(torch_tokens, onnx_tokens)) if a != b), None)
        entry = {
            "prompt": text,
            "prompt_tokens": int(first_ids.shape[1]),
            "prefill_max_abs_diff": diffs[0],
            "decode_max_abs_diff": diffs[1:],
            "max_abs_diff": max(diffs),
            "greedy_identical": same,
            "first_divergence": first_diff,
            "torch_tokens": torch_tokens,
            "onnx_tokens": onnx_tokens,
        }
        if tokenizer is not None:
            entry["torch_text"] = tokenizer.decode(torch_tokens, skip_special_tokens=True)
            entry["onnx_text"] = tokenizer.decode(onnx_tokens, skip_special_tokens=True)
        results.append(entry)
        worst = max(worst, max(diffs))
        all_same = all_same and same
    ok = worst <= atol and (all_same or dtype == "float16")
    return ParityReport(dtype, atol, results, worst, all_same, ok, decode_steps, greedy_tokens)


def _torch_greedy(torch_run, ids: np.ndarray, steps: int) -> list[int]:
    mask = np.ones_like(ids)
    logits, past = torch_run(ids, mask, None)
    tokens = []
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits, past = torch_run(np.array([[token]], np.int64), mask, past)
    return tokens
