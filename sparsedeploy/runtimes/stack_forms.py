"""The static decoder-stack forms an export writes for bench: which ones a bench needs (FormSpec), their file names,
and the `static_forms` list of export_report.json that names them (written by export, read by bench).

JSON and paths only: the export stage writes the files (runtimes.stack_graphs traces them), bench looks them up.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST_KEY = "static_forms"  # export_report.json's key
PREFILL, STEP, HEAD = "prefill", "decode-step", "head"


@dataclass(frozen=True)
class FormSpec:
    """One static form: `phase` prefill (`seq` tokens, no cache), decode-step (one token over `past` cache slots)
    or head (the NumPy tables for generations with a prefill of `seq` tokens and a decode step over `past` slots)."""

    phase: str
    batch: int
    seq: int
    past: int

    def file_name(self) -> str:
        if self.phase == PREFILL:
            return f"stack_prefill_b{self.batch}_s{self.seq}.onnx"
        if self.phase == STEP:
            return f"stack_step_b{self.batch}_c{self.past}.onnx"
        return f"stack_head_b{self.batch}_s{self.seq}_c{self.past}.npz"


def static_specs(batch: int, prompt_len: int) -> tuple[FormSpec, FormSpec]:
    """Prefill over the prompt, and a decode step over a cache of the prompt's length (bench's static rows)."""
    return FormSpec(PREFILL, batch, prompt_len, 0), FormSpec(STEP, batch, 1, prompt_len)


def generation_specs(batch: int, prompt_len: int, context: int) -> dict[str, FormSpec]:
    """The three files of a generation bundle ({"prefill", "step", "head"}, as runtimes.decoder_stack runs them)."""
    return {
        "prefill": FormSpec(PREFILL, batch, prompt_len, 0),
        "step": FormSpec(STEP, batch, 1, context),
        "head": FormSpec(HEAD, batch, prompt_len, context),
    }


def bench_specs(batches: list[int] | tuple[int, ...], prompt_len: int, gen_len: int) -> list[FormSpec]:
    """Every form a bench over these shapes times: the static rows, and with gen_len > 0 the generation bundles."""
    specs: list[FormSpec] = []
    for batch in batches:
        specs.extend(static_specs(batch, prompt_len))
        if gen_len > 0:
            specs.extend(generation_specs(batch, prompt_len, prompt_len + gen_len).values())
    return list(dict.fromkeys(specs))


def files_bytes(path: Path) -> int:
    """Size of a form's file plus its external-data file, if any."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "_data")) if p.is_file())


def entry(spec: FormSpec, path: Path) -> dict:
    """The export report's line for one written form."""
    return {"file": path.name, **asdict(spec), "bytes": files_bytes(path)}


def read_manifest(export_dir: Path | str) -> dict | None:
    """The `static_forms` an export's report lists, or None when it lists none (or has no report)."""
    report = Path(export_dir) / "export_report.json"
    if not report.is_file():
        return None
    return json.loads(report.read_text()).get(MANIFEST_KEY) or None


class MissingForm(LookupError):
    """A form the manifest does not list, or lists with a file that is gone or changed size."""


def find_form(export_dir: Path | str, manifest: dict, spec: FormSpec) -> Path:
    """The path of `spec` as the manifest lists it; MissingForm (with the reason) when it cannot be used."""
    for item in manifest.get("files", []):
        if FormSpec(item["phase"], item["batch"], item["seq"], item["past"]) == spec:
            path = Path(export_dir) / item["file"]
            if not path.is_file():
                raise MissingForm(f"{item['file']} is listed in export_report.json but missing")
            if files_bytes(path) != item["bytes"]:
                raise MissingForm(
                    f"{item['file']} has {files_bytes(path)} bytes, export_report.json says {item['bytes']}"
                )
            return path
    raise MissingForm("not exported")
