"""Export verbs: `qtune export-gguf` (llama.cpp, Ollama, LM Studio).

The result (the output file) goes to stdout; progress and notes go to stderr.
"""

import time

import click

from qtune.cli.common import command, err


@command("export-gguf")
@click.argument("model")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None,
              help="A PEFT LoRA directory to fold into MODEL first (as `qtune merge` does).")
@click.option("--type", "type_name", default="f16", show_default=True,
              help="Tensor type of the 2-D weights: f16, bf16, q8_0, q4_0 (or another type the gguf package "
                   "can quantize); norms and biases stay f32.")
@click.option("--from-original", is_flag=True,
              help="Add the adapter to the original 16-bit weights instead of the dequantized NF4 weights it was "
                   "trained against.")
@click.option("--no-double-quant", is_flag=True,
              help="The adapter was trained on NF4 without double quantization (absmax kept in fp32).")
@click.option("--ollama", is_flag=True,
              help="Also write an Ollama Modelfile beside OUT (FROM, TEMPLATE, SYSTEM, PARAMETER stop); then "
                   "`ollama create NAME -f Modelfile`.")
@click.option("--adapter-only", is_flag=True,
              help="Write only the adapter, as a GGUF LoRA file for llama.cpp's --lora (needs --adapter).")
def export_gguf_cmd(model, out, adapter, type_name, from_original, no_double_quant, ollama, adapter_only):
    """Write MODEL (a directory or alias), with ADAPTER merged in, as the GGUF file OUT, then read it back
    and check logits, chat-template tokens and stop tokens against the model (a failed check deletes OUT)."""
    from qtune.lora.export import export_gguf
    from qtune.lora.gguf_adapter import export_gguf_adapter

    t0 = time.perf_counter()
    if adapter_only:
        if adapter is None:
            raise click.ClickException("--adapter-only needs --adapter DIR (the PEFT LoRA directory to write)")
        click.echo(export_gguf_adapter(model, adapter, out))
        return
    check = export_gguf(model, out, type_name, adapter_dir=adapter, from_original=from_original,
                        double_quant=not no_double_quant, ollama=ollama)
    err.print(f"round-trip check passed: chat tokens identical, end-of-turn token stops, logits {check.what} "
              f"{check.logit_error:.2g} (allowed {check.tolerance:g}); {time.perf_counter() - t0:.1f}s")
    click.echo(out)


COMMANDS = [export_gguf_cmd]
