"""Adapter verbs: `qtune merge`.

The result (the output directory) goes to stdout; progress and notes go to stderr.
"""

import time

import click

from qtune.cli.common import command, err


@command()
@click.argument("model")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--from-original", is_flag=True,
              help="Add the adapter to the original 16-bit weights instead of the dequantized NF4 weights it was "
                   "trained against.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="dtype of the merged weights (default: the base checkpoint's torch_dtype, else bfloat16).")
@click.option("--no-double-quant", is_flag=True,
              help="The adapter was trained on NF4 without double quantization (absmax kept in fp32).")
def merge(model, adapter, out_dir, from_original, dtype, no_double_quant):
    """Fold ADAPTER (a PEFT LoRA directory) into MODEL (a directory or alias); write a plain Hugging Face
    directory to OUT_DIR that transformers, vLLM or llama.cpp's converter load without PEFT."""
    from qtune.peft import merge_adapter_into_dir

    t0 = time.perf_counter()
    out = merge_adapter_into_dir(model, adapter, out_dir, from_original=from_original, dtype=dtype,
                              double_quant=not no_double_quant)
    base = "original 16-bit" if from_original else "dequantized NF4"
    err.print(f"merged {adapter} into the {base} weights of {model}: {out} in {time.perf_counter() - t0:.1f}s")
    click.echo(str(out))


COMMANDS = [merge]
