"""Model verbs: `qtune generate`, `qtune eval`, `qtune quantize`.

Results go to stdout (the completion, or one JSON line); progress and notes go to stderr.
"""

import json
import sys
import time

import click

from qtune.cli.common import command, err

model_options = [
    click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None,
                 help="A LoRA adapter directory (PEFT format) to apply."),
    click.option("--quantize", type=click.Choice(["nf4", "none"]), default="nf4", show_default=True,
                 help="nf4: 4-bit base weights (QLoRA); none: the checkpoint's weights unquantized."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                 help="Compute dtype (default bfloat16 on CUDA, float32 on CPU)."),
]


def with_model_options(fn):
    for option in reversed(model_options):
        fn = option(fn)
    return fn


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(model_path: str, adapter: str | None, quantize: str, dtype: str | None):
    """Model (with adapter applied if given) and tokenizer, ready for inference."""
    from qtune.weights.checkpoint import load_model, resolve
    from qtune.tokenizer import load_tokenizer

    model_dir = resolve(model_path)
    t0 = time.perf_counter()
    model = load_model(model_dir, quantize=quantize, dtype=dtype, device=device_name())
    if adapter:
        from qtune.peft import load_adapter

        load_adapter(model, adapter)
    err.print(f"[dim]loaded {model_dir} ({quantize}) in {time.perf_counter() - t0:.1f}s[/dim]")
    return model, load_tokenizer(model_dir)


@command()
@click.argument("model")
@with_model_options
@click.option("--prompt", required=True, help="The prompt text.")
@click.option("--chat", is_flag=True, help="Render the prompt as a user turn with the model's chat template.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--greedy", is_flag=True, help="Greedy decoding (deterministic).")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=0.9, show_default=True, help="1.0 = off.")
@click.option("--seed", type=int, default=None)
@click.option("--nf4-cpu-kernel", type=click.Choice(["dense", "bitsandbytes"]), default="dense", show_default=True,
              help="NF4 on a CPU: exact fp32 copies, or bitsandbytes' 4-bit kernel (bf16 products, faster; "
                   "used only where a check on this CPU finds it matches).")
def generate(model, adapter, quantize, dtype, prompt, chat, system, max_new_tokens, greedy, temperature, top_k, top_p,
             seed, nf4_cpu_kernel):
    """Complete PROMPT with MODEL (a directory or an alias such as smollm2-135m); prints only the completion."""
    from qtune.generate import generate_text

    m, tok = load_for_inference(model, adapter, quantize, dtype)
    if chat and not tok.has_chat_template:
        raise click.UsageError(f"{model} has no chat template (tokenizer_config.json 'chat_template'); drop --chat")
    t0 = time.perf_counter()
    out = generate_text(m, tok, [prompt], chat=chat, system=system, max_new_tokens=max_new_tokens, greedy=greedy,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        nf4_cpu_kernel=nf4_cpu_kernel)[0]
    dt = time.perf_counter() - t0
    err.print(f"[dim]{len(out.token_ids)} tokens in {dt:.2f}s ({len(out.token_ids) / dt:.1f} tok/s), "
              f"finish: {out.finish_reason}[/dim]")
    sys.stdout.write(out.text + "\n")


@command(name="eval")
@click.argument("model")
@with_model_options
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Alpaca-format JSON / JSONL file (instruction, input, output).")
@click.option("--max-seq-len", type=int, default=1024, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N examples.")
def eval_cmd(model, adapter, quantize, dtype, data_path, max_seq_len, batch_size, limit):
    """Mean per-token loss and perplexity of MODEL on the responses of an Alpaca-format file.

    The last stdout line is a JSON object with `loss` (natural log), `ppl` and `tokens`.
    """
    from qtune.train.evaluate import alpaca_response_loss

    m, tok = load_for_inference(model, adapter, quantize, dtype)
    result = alpaca_response_loss(m, tok, data_path, max_seq_len=max_seq_len, batch_size=batch_size, limit=limit)
    err.print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.3f}  over {result['tokens']} response tokens "
              f"in {result['examples']} examples")
    click.echo(json.dumps(result))


@command()
@click.argument("model_dir")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="dtype of the unquantized tensors (default: the checkpoint's torch_dtype).")
@click.option("--no-double-quant", is_flag=True, help="Keep absmax in fp32 instead of double-quantizing it.")
def quantize(model_dir, out_dir, dtype, no_double_quant):
    """Write an NF4 copy of MODEL_DIR to OUT_DIR in the bitsandbytes 4-bit format (loads 4x smaller afterwards)."""
    from qtune.weights.checkpoint import quantize_checkpoint

    t0 = time.perf_counter()
    out = quantize_checkpoint(model_dir, out_dir, dtype=dtype, double_quant=not no_double_quant)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    err.print(f"wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    click.echo(str(out))


COMMANDS = [generate, eval_cmd, quantize]
