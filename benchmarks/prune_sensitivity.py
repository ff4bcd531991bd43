"""Where a model's pruning loss comes from: one method at one sparsity on a subset of the decoder linears.

Same calibration and evaluation windows as benchmarks/quality.py (its `Setting`, the BOS-per-window protocol
where the family needs it). Rows: dense; every linear pruned (the quality table's row); only the attention
projections; only the MLP projections. The other linears stay dense. One process, one model load; the weights
are restored between rows.

    python benchmarks/prune_sensitivity.py --model PATH.gguf [--method wanda] [--sparsity 0.5] [--threads 1]

Writes benchmarks/results/sensitivity_<model>.json (`--out` to change) and prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from quality import RESULTS, Setting, machine

ATTENTION_MODULES = frozenset({"self_attn", "attn", "attention", "self_attention"})
SUBSETS = ("all", "attention", "mlp")

log = logging.getLogger("sensitivity")


def is_attention(name: str) -> bool:
    """A decoder-block linear's name (e.g. `self_attn.q_proj`, `mlp.up_proj`) belongs to the attention."""
    return name.split(".")[0] in ATTENTION_MODULES


def run(setting: Setting, method_name: str, sparsity: str) -> dict:
    import torch

    from sparsedeploy.common.data import calibration_samples, eval_tokens, window_bos
    from sparsedeploy.common.evaluate import layer_sparsity, overall_sparsity, perplexity
    from sparsedeploy.common.models import find_blocks, find_linears, load_model, resolve_device
    from sparsedeploy.common.sparsity import SparsitySpec, parse_sparsity
    from sparsedeploy.prune.blocks import prune_model
    from sparsedeploy.prune.methods import build_method

    torch.set_num_threads(setting.threads)
    device = resolve_device(setting.device)
    lm = load_model(setting.model, "float32")
    bos = window_bos(lm.model, lm.tokenizer)
    tokens = eval_tokens(lm.tokenizer, setting.eval_data)
    samples = calibration_samples(
        lm.tokenizer, setting.calib, setting.nsamples, setting.calib_seqlen, setting.seed, bos
    )
    linears = {(i, n): lin for i, b in enumerate(find_blocks(lm.model)) for n, lin in find_linears(b).items()}
    dense = {k: lin.weight.detach().clone() for k, lin in linears.items()}
    spec, keep = parse_sparsity(sparsity), SparsitySpec.unstructured(0.0)

    def ppl() -> float:
        return perplexity(lm.model, tokens, setting.eval_seqlen, device, setting.max_windows, False, bos).ppl

    rows = [{"subset": "dense", "ppl": ppl(), "sparsity_measured": overall_sparsity(layer_sparsity(lm.model))}]
    log.info("dense: %.3f", rows[0]["ppl"])
    for subset in SUBSETS:
        chosen = {k for k in linears if subset == "all" or (subset == "attention") == is_attention(k[1])}
        start = time.perf_counter()
        prune_model(
            lm.model,
            samples,
            build_method(method_name),
            lambda i, n, chosen=chosen: spec if (i, n) in chosen else keep,
            device,
            show_progress=False,
        )
        row = {
            "subset": subset,
            "linears": sorted({n for _, n in chosen}),
            "pruned_params": sum(linears[k].weight.numel() for k in chosen),
            "prune_seconds": time.perf_counter() - start,
            "sparsity_measured": overall_sparsity(layer_sparsity(lm.model)),
            "ppl": ppl(),
        }
        row["vs_dense"] = row["ppl"] / rows[0]["ppl"]
        rows.append(row)
        log.info("%s: %.3f (%.2fx dense)", subset, row["ppl"], row["vs_dense"])
        with torch.no_grad():
            for k, lin in linears.items():
                lin.weight.copy_(dense[k])
    total = sum(p.numel() for p in lm.model.parameters())
    embed = lm.model.get_input_embeddings().weight.numel()
    return {
        "setting": asdict(setting),
        "method": method_name,
        "sparsity": sparsity,
        "bos_per_window": bos is not None,
        "params_total": total,
        "params_embedding": embed,
        "params_decoder_linears": sum(w.numel() for w in dense.values()),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=Setting.model)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    doc = run(Setting(model=args.model, threads=args.threads, device=args.device), args.method, args.sparsity)
    out = args.out or RESULTS / f"sensitivity_{Path(args.model).stem}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
