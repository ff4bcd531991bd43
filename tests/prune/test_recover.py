import json

import pytest
import torch
from safetensors.torch import load_file

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.models import find_blocks, find_linears, load_model
from sparsedeploy.common.sparsity import parse_sparsity, satisfies_nm
from sparsedeploy.prune.blocks import prune_model
from sparsedeploy.prune.driver import PruneConfig, run_prune
from sparsedeploy.prune.methods import build_method
from sparsedeploy.prune.recover import (
    MaskedLoRA,
    RecoverConfig,
    attach_adapters,
    merge_adapters,
    recover_model,
    same_zeros,
    zero_pattern,
)
from tests.conftest import tiny_llama

CPU = torch.device("cpu")


def learnable_windows(n: int, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    """Rotations of one fixed random sequence: a pattern the adapters can learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (64,), generator=g)
    return torch.stack([base.roll(int(s)) for s in torch.randint(0, 64, (n,), generator=g)])[:, :seqlen]


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_recovery_keeps_every_zero_and_lowers_loss(sparsity):
    model = tiny_llama()
    samples = learnable_windows(60)
    masks = prune_model(
        model, samples[:8], build_method("wanda"), lambda i, n: parse_sparsity(sparsity), CPU, show_progress=False
    )
    before = zero_pattern(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    info = recover_model(
        model, masks, samples, RecoverConfig(steps=60, rank=4, lr=1e-2, seqlen=32), CPU, show_progress=False
    )
    assert same_zeros(before, zero_pattern(model))  # the zero set is identical, position by position
    assert info["loss_last"] < info["loss_first"] - 0.2
    assert info["tokens"] == 60 * 32
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert changed and all(".layers." in k and k.endswith("proj.weight") for k in changed)  # only decoder linears moved
    for block in find_blocks(model):  # adapters are gone after merging
        assert all(type(lin) is torch.nn.Linear for lin in find_linears(block).values())
        if sparsity == "2:4":
            assert all(satisfies_nm(lin.weight, 2, 4) for lin in find_linears(block).values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: recovery on CUDA not checked here")
def test_recovery_on_cuda_keeps_every_zero_and_lowers_loss():
    model = tiny_llama()
    samples = learnable_windows(40)
    masks = prune_model(
        model, samples[:8], build_method("wanda"), lambda i, n: parse_sparsity("2:4"), CPU, show_progress=False
    )
    before = zero_pattern(model)
    info = recover_model(
        model,
        masks,
        samples,
        RecoverConfig(steps=40, rank=4, lr=1e-2, seqlen=32),
        torch.device("cuda"),
        show_progress=False,
    )
    assert same_zeros(before, zero_pattern(model))
    assert info["loss_last"] < info["loss_first"] - 0.2
    assert all(p.device.type == "cpu" for p in model.parameters())  # merged back where it came from


def test_distillation_against_teacher_lowers_kl():
    teacher = tiny_llama(seed=0)
    model = tiny_llama(seed=0)
    samples = learnable_windows(40, seed=3)
    masks = prune_model(
        model, samples[:8], build_method("magnitude"), lambda i, n: parse_sparsity("0.6"), CPU, show_progress=False
    )
    before = zero_pattern(model)
    info = recover_model(
        model,
        masks,
        samples,
        RecoverConfig(steps=40, rank=4, lr=1e-2, seqlen=32),
        CPU,
        teacher=teacher,
        show_progress=False,
    )
    assert info["loss"] == "kl" and info["loss_last"] < info["loss_first"]
    assert same_zeros(before, zero_pattern(model))


def test_merge_never_creates_a_new_zero_and_masks_the_update():
    base = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 0.0]]))
    adapter = MaskedLoRA(base, base.weight != 0, rank=1, scale=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.lora_b.fill_(1.0)
        adapter.lora_a.copy_(torch.tensor([[-1.0, 0.5, 7.0]]))  # would zero w0 exactly and fill the pruned w2
    merged = adapter.merged()
    assert merged.tolist() == [[1.0, 2.5, 0.0]]


def test_stored_masks_restrict_the_adapters():
    model = tiny_llama()
    lin = find_linears(find_blocks(model)[0])["mlp.up_proj"]
    mask = torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    wrapped = attach_adapters(model, {"model.layers.0.mlp.up_proj": mask}, rank=2, scale=1.0)
    adapter = next(a for b, n, a in wrapped if n == "mlp.up_proj" and b is find_blocks(model)[0])
    assert torch.equal(adapter.mask, mask & (lin.weight != 0))
    merge_adapters(wrapped)
    with pytest.raises(UserError, match="shape"):  # a stored mask of the wrong shape is refused by itself
        attach_adapters(tiny_llama(), {"model.layers.0.mlp.up_proj": mask[:, :5]}, rank=2, scale=1.0)


def test_bad_settings_are_user_errors():
    for cfg in (RecoverConfig(steps=0), RecoverConfig(rank=0), RecoverConfig(lr=0.0)):
        with pytest.raises(UserError):
            cfg.validate()
    model = tiny_llama()
    with pytest.raises(UserError, match="training windows"):
        recover_model(model, None, learnable_windows(3), RecoverConfig(steps=5, seqlen=32), CPU, show_progress=False)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(" ".join(f"w{i % 40} the quick brown fox jumps." for i in range(600)))
    return path


def test_recover_command_writes_checkpoint_masks_and_report(tiny_checkpoint, text_file, tmp_path):
    from sparsedeploy.cli import main

    pruned = tmp_path / "pruned"
    run_prune(
        PruneConfig(
            model=str(tiny_checkpoint), sparsity="2:4", calib=f"text:{text_file}", nsamples=4, seqlen=32, device="cpu"
        ),
        pruned,
        show_progress=False,
    )
    out = tmp_path / "recovered"
    main(
        [
            "-q",
            "recover",
            "--model",
            str(pruned),
            "--data",
            f"text:{text_file}",
            "--steps",
            "12",
            "--rank",
            "2",
            "--lr",
            "5e-3",
            "--seqlen",
            "32",
            "--eval",
            f"text:{text_file}",
            "--eval-windows",
            "4",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--json",
        ]
    )
    report = json.loads((out / "recover_report.json").read_text())
    assert report["zeros_identical"] and report["sparsity_after"] == report["sparsity_before"] == pytest.approx(0.5)
    assert report["recovery"]["tokens"] == 12 * 32 and report["ppl_after"] < report["ppl_before"]
    assert (out / "masks.safetensors").read_bytes() == (pruned / "masks.safetensors").read_bytes()
    masks = load_file(str(out / "masks.safetensors"))
    a, b = load_model(str(pruned)).model, load_model(str(out)).model
    assert same_zeros(zero_pattern(a), zero_pattern(b))
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for i, block in enumerate(find_blocks(b)):
        for name, lin in find_linears(block).items():
            assert torch.equal(lin.weight == 0, ~masks[f"model.layers.{i}.{name}"])
    # an existing output is refused (one line, exit 2) and left untouched
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "-q",
                "recover",
                "--model",
                str(pruned),
                "--data",
                f"text:{text_file}",
                "--steps",
                "2",
                "--seqlen",
                "32",
                "--device",
                "cpu",
                "--output",
                str(out),
            ]
        )
    assert exc.value.code == 2 and json.loads((out / "recover_report.json").read_text()) == report


@pytest.mark.slow
def test_recovery_on_the_real_model_lowers_perplexity_and_keeps_zeros(smollm, wikitext_test):
    """smollm2-135m pruned 70% by Wanda: a short masked-LoRA recovery lowers WikiText-2 perplexity, every zero kept."""
    import copy

    from sparsedeploy.common.data import calibration_samples, eval_tokens
    from sparsedeploy.common.evaluate import layer_sparsity, overall_sparsity, perplexity

    model = copy.deepcopy(smollm.model)
    calib = calibration_samples(smollm.tokenizer, "gensim-wiki", nsamples=8, seqlen=256, seed=0)
    masks = prune_model(
        model, calib, build_method("wanda"), lambda i, n: parse_sparsity("0.7"), CPU, show_progress=False
    )
    tokens = eval_tokens(smollm.tokenizer, f"wikitext2:{wikitext_test}")
    before_ppl = perplexity(model, tokens, 256, CPU, max_windows=8, show_progress=False).ppl
    before, sparsity = zero_pattern(model), overall_sparsity(layer_sparsity(model))
    train = calibration_samples(smollm.tokenizer, "gensim-wiki", nsamples=30, seqlen=128, seed=7)
    info = recover_model(
        model, masks, train, RecoverConfig(steps=30, seqlen=128, rank=8, lr=2e-3), CPU, show_progress=False
    )
    after_ppl = perplexity(model, tokens, 256, CPU, max_windows=8, show_progress=False).ppl
    print(f"ppl {before_ppl:.2f} -> {after_ppl:.2f}", info)
    assert same_zeros(before, zero_pattern(model))
    assert overall_sparsity(layer_sparsity(model)) == sparsity
    assert after_ppl < before_ppl * 0.97
