"""`qtune export-gguf`: base + adapter merged, written as GGUF, kept only when the round-trip check passes."""

import os
import tempfile
from pathlib import Path

from qtune.peft import merge_adapter_into_dir
from qtune.weights.checkpoint import resolve
from qtune.tokenizer import load_tokenizer
from qtune.weights.gguf_check import RoundTrip, check_round_trip, end_of_turn_id
from qtune.weights.gguf_export import ExportError, exportable_architecture, parse_type, write_gguf
from qtune.weights.ollama import modelfile_text, write_modelfile


def ollama_modelfile(model_dir: Path, out_path: Path) -> str:
    """The Modelfile text for `out_path`, computed before anything is written so an unknown format fails first."""
    tok = load_tokenizer(model_dir)
    if not tok.has_chat_template:
        raise ExportError(f"{model_dir}: no chat template, so there is no TEMPLATE to write for Ollama")
    eot = end_of_turn_id(tok)
    stops = [tok.decode([eot], skip_special=False)] if eot is not None else []
    try:
        return modelfile_text(tok, out_path.name, stops)
    except ValueError as e:
        raise ExportError(str(e)) from e


def export_gguf(model, out_path, type_name: str = "f16", adapter_dir=None, from_original: bool = False,
                double_quant: bool = True, ollama: bool = False) -> RoundTrip:
    """Write MODEL (+ the adapter folded in as `qtune merge` does) as the GGUF file `out_path`.

    Returns the check's measurements. The file is written under a temporary name and checked; a file that fails is
    deleted and the failure is an ExportError saying what differed. An existing `out_path` is replaced
    only by a file that passed. `ollama`: also write a Modelfile beside it (`qtune.weights.ollama`).
    """
    parse_type(type_name)  # a type the gguf package cannot write fails before anything loads
    model_dir, out_path = resolve(model), Path(out_path)
    exportable_architecture(model_dir)  # so does a family setting llama.cpp would run differently
    modelfile = ollama_modelfile(model_dir, out_path) if ollama else None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix=".qtune-export-", dir=out_path.parent) as tmp:
        source = model_dir
        if adapter_dir is not None:
            # fp32, so the file rounds the merged weights once, to the requested type.
            source = merge_adapter_into_dir(model_dir, adapter_dir, Path(tmp) / "merged", from_original=from_original,
                                         dtype="float32", double_quant=double_quant)
        try:
            write_gguf(source, partial, type_name)
            result = check_round_trip(source, partial, type_name.lower())
        except OSError as e:  # a full disk, a read-only folder: nothing partial is left
            partial.unlink(missing_ok=True)
            raise ExportError(f"{out_path}: cannot write the GGUF file ({e.strerror or e}); nothing was kept") from e
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if result.problems:
            partial.unlink()
            raise ExportError(f"{out_path}: the round-trip check failed, so the file was deleted: "
                              f"{'; '.join(result.problems)}")
        partial.replace(out_path)
    if modelfile is not None:
        write_modelfile(modelfile, out_path)
    return result
