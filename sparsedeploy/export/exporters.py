"""The two exporters of a checkpoint to an ONNX decoder with KV cache: optimum-onnx for the architectures it
knows, else ``torch.onnx.export`` of a small wrapper with optimum's input/output names."""

from __future__ import annotations

from pathlib import Path

from sparsedeploy.export.config import DTYPES
from sparsedeploy.runtimes.stack_graphs import head_dim_of


def optimum_supports(model_dir: Path, task: str) -> bool:
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs with the TasksManager
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(str(model_dir)).model_type
    if model_type not in TasksManager._SUPPORTED_MODEL_TYPE:
        return False
    return task in TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")


def export_with_optimum(model_dir: Path, out_dir: Path, task: str, dtype: str, opset: int) -> None:
    from optimum.exporters.onnx import main_export

    main_export(
        str(model_dir),
        str(out_dir),
        task=task,
        opset=opset,
        device="cpu",
        dtype=DTYPES[dtype],
        do_validation=False,
        local_files_only=True,
        library_name="transformers",
    )


def export_with_torch(model_dir: Path, out_dir: Path, task: str, dtype: str, opset: int) -> None:
    """torch.onnx.export of a wrapper with optimum's input/output names (for architectures optimum lacks)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, attn_implementation="eager").eval()
    config = model.config
    layers = int(config.num_hidden_layers)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = head_dim_of(config)
    with_past = task.endswith("-with-past")
    wrapper = _DecoderWrapper(model, layers, with_past)
    batch, seq, past_len = 2, 3, 4 if with_past else 0
    ids = torch.randint(0, int(config.vocab_size), (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = (
        [torch.randn(batch, kv_heads, past_len, head_dim, dtype=torch_dtype) for _ in range(2 * layers)]
        if with_past
        else []
    )
    names_in = ["input_ids", "attention_mask", "position_ids"]
    names_out = ["logits"]
    axes = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for i in range(layers if with_past else 0):
        for kind in ("key", "value"):
            names_in.append(f"past_key_values.{i}.{kind}")
            names_out.append(f"present.{i}.{kind}")
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch_size", 2: "past_sequence_length"}
            axes[f"present.{i}.{kind}"] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (ids, mask, positions, *past),
            str(out_dir / "model.onnx"),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


class _DecoderWrapper:
    """nn.Module built lazily (torch imported only when exporting) -- see export_with_torch."""

    def __new__(cls, model, layers: int, with_past: bool):
        import torch
        from transformers import DynamicCache

        class DecoderWrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, *past):
                cache = None
                if with_past:
                    cache = DynamicCache()
                    for i in range(layers):
                        cache.update(past[2 * i], past[2 * i + 1], i)
                # A ready 4-D additive mask: transformers' own mask builder uses vmap, which tracing cannot follow.
                query = torch.cumsum(torch.ones_like(input_ids[0]), 0) - 1  # 0..q-1, traced shape
                keys = torch.cumsum(torch.ones_like(attention_mask[0]), 0) - 1  # 0..kv-1
                offset = attention_mask.shape[1] - input_ids.shape[1]
                causal = keys[None, :] <= (query[:, None] + offset)
                allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
                dtype = self.model.dtype
                mask4d = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=mask4d,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=with_past,
                )
                if not with_past:
                    return out.logits
                flat = []
                for i in range(layers):
                    layer = out.past_key_values.layers[i]
                    flat += [layer.keys, layer.values]
                return (out.logits, *flat)

        return DecoderWrapper()
