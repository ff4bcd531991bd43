"""Text sources for calibration and evaluation, and the Wanda/SparseGPT sampling protocol.

Sources (``--calib`` / ``--data``):
  wikitext2:PATH   a WikiText-2 raw file (e.g. wiki.test.raw), joined the way the HF dataset rows are
  wikitext2        WikiText-2 raw through `datasets` (online; train split for calibration, test for eval)
  c4               C4 English through `datasets` (online; train shard 0 for calibration, validation for eval)
  gensim-wiki      the English Wikipedia articles shipped inside the `gensim` wheel (offline default)
  text:PATH        a plain UTF-8 text file
  jsonl:PATH[#key] a JSON-lines file, one document per line under "text" (or the given key)

Windows and BOS: the Wanda/SparseGPT protocol cuts windows straight out of the token stream, so only the
first window starts with the tokenizer's BOS. That is kept for every family except the ones whose models
are trained to always see a leading BOS and collapse without it (Gemma 1-3, `BOS_PER_WINDOW`): for those
every calibration and evaluation window is BOS followed by `seqlen - 1` text tokens (still `seqlen` long).
`window_bos` is the one place that decides it; calibration (here) and evaluation (`evaluate.eval_windows`)
both take its answer.
"""

from __future__ import annotations

import bz2
import json
import logging
import os
import re
from pathlib import Path

import torch

from sparsedeploy.common.errors import UserError

log = logging.getLogger(__name__)

SOURCES_HELP = "wikitext2:PATH, wikitext2, c4, gensim-wiki, text:PATH or jsonl:PATH[#key]"


def _read_file(path_text: str, what: str) -> str:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist: check the path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} file {path} is not UTF-8 text: convert it to UTF-8") from None


def wikitext_rows_joined(raw: str) -> str:
    """Rebuild the HF `wikitext-2-raw-v1` rows from a raw file and join them with blank lines.

    The HF loader yields each line of the raw file as a row (keeping its newline, blank lines as
    ""), and the Wanda/SparseGPT protocol evaluates on "\\n\\n".join(rows).
    """
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


# The cleaned gensim-wiki text is cached (parsing the XML dump takes a while); bump the name when the
# cleaning below changes. A machine without gensim can use a cache copied from one that has it.
GENSIM_WIKI_CACHE = "gensim-wiki-v1.txt"


def _gensim_wiki_text() -> str:
    from sparsedeploy.common.models import cache_dir

    cached = cache_dir() / "data" / GENSIM_WIKI_CACHE
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = _extract_gensim_wiki()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, cached)
    except OSError as exc:  # a read-only cache only costs the parse next time
        log.debug("could not cache the gensim-wiki text at %s: %s", cached, exc)
    return text


def _extract_gensim_wiki() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("calibration source gensim-wiki needs the gensim package: pip install gensim")
    folder = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    files = sorted(folder.glob("enwiki-latest-pages-articles1.xml-*.bz2"))
    if not files:
        raise UserError(f"gensim is installed but its Wikipedia sample is missing from {folder}: reinstall gensim")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.BZ2File(files[0]) as fh:
        for title, markup, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            text = filter_wiki(markup)
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
            text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)  # == Heading ==
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if text:
                articles.append(f"{title}\n\n{text}")
    return "\n\n".join(articles)


def _hf_dataset_text(name: str, split: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(
            f"source {name} needs the `datasets` package and network access: pip install datasets, or use a local file "
            "(wikitext2:PATH, text:PATH)"
        ) from None
    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calib" else "test")["text"]
            return "\n\n".join(rows)
        if split == "calib":
            ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        else:
            ds = load_dataset(
                "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
            )
            ds = ds.select(range(1100))  # the SparseGPT/Wanda validation subset
        return "\n\n".join(ds["text"])
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds when offline
        raise UserError(
            f"could not fetch {name} through datasets ({type(exc).__name__}); offline, use wikitext2:PATH or "
            "gensim-wiki"
        ) from None


def load_text(source: str, split: str = "calib") -> str:
    """Return the text of a source; `split` is 'calib' or 'eval' for the online datasets."""
    kind, _, arg = source.partition(":")
    if kind == "wikitext2" and arg:
        return wikitext_rows_joined(_read_file(arg, "WikiText-2"))
    if kind in ("wikitext2", "c4") and not arg:
        return _hf_dataset_text(kind, split)
    if kind == "gensim-wiki" and not arg:
        return _gensim_wiki_text()
    if kind == "text" and arg:
        return _read_file(arg, "text")
    if kind == "jsonl" and arg:
        path, _, key = arg.partition("#")
        key = key or "text"
        docs = []
        for lineno, line in enumerate(_read_file(path, "JSONL").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {lineno} is not valid JSON: fix the line or use text:PATH") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise UserError(
                    f"{path} line {lineno} has no string field {key!r}: use jsonl:{path}#FIELD to name the text field"
                )
            docs.append(record[key])
        return "\n\n".join(docs)
    raise UserError(f"unknown text source {source!r}: use {SOURCES_HELP}")


# config.model_type of the families whose windows each begin with BOS (see the module docstring).
BOS_PER_WINDOW = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


def window_bos(model, tokenizer) -> int | None:
    """The token id every window must begin with for this model, or None (the plain Wanda/SparseGPT windows).

    The tokenizer's BOS (what it prepends to text) is used, the model config's when the tokenizer has none.
    """
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in BOS_PER_WINDOW:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    if bos is None:
        raise UserError(
            f"{kind} models need a BOS token before every window, but neither the tokenizer nor the config names "
            "one: save a tokenizer with its bos_token next to the model"
        )
    return int(bos)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus once, as the Wanda/SparseGPT protocol does: a 1-D LongTensor."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    return ids


def calibration_samples(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0, bos: int | None = None
) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens ([nsamples, seqlen]), reproducible from `seed`.

    With `bos` (from `window_bos`) each window is `bos` and then `seqlen - 1` text tokens.
    """
    if nsamples < 1:
        raise UserError(f"--nsamples {nsamples} must be at least 1")
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen} must be at least 2")
    ids = tokenize(tokenizer, load_text(source, "calib"))
    if bos is not None:
        ids = strip_bos(ids, bos)
    span = seqlen if bos is None else seqlen - 1  # text tokens per window
    if ids.numel() <= span:
        raise UserError(
            f"calibration text {source!r} has {ids.numel()} tokens, too few for one window of {seqlen}: "
            "give more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - span, (nsamples,), generator=gen)
    log.info(
        "calibration: %d windows of %d tokens from %s (%d tokens, seed %d%s)",
        nsamples,
        seqlen,
        source,
        ids.numel(),
        seed,
        "" if bos is None else f", BOS {bos} before every window",
    )
    windows = torch.stack([ids[s : s + span] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


def strip_bos(ids: torch.Tensor, bos: int) -> torch.Tensor:
    """The token stream without the BOS the tokenizer put in front of it (windows get their own)."""
    return ids[1:] if ids.numel() and int(ids[0]) == bos else ids


def eval_tokens(tokenizer, source: str) -> torch.Tensor:
    return tokenize(tokenizer, load_text(source, "eval"))


def default_wikitext_test() -> str | None:
    """The offline WikiText-2 test file next to a checkout (../shared/data), if present."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
        if candidate.is_file():
            return str(candidate)
    env = os.environ.get("SPARSEDEPLOY_WIKITEXT2")
    return env if env and Path(env).is_file() else None
