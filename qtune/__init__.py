"""qtune: lightweight single-GPU QLoRA fine-tuning.

The library is plain modules; import what you need:

    from qtune.weights.checkpoint import load_model   # Hugging Face directory -> CausalLM (NF4 on load)
    from qtune.lora import add_lora                    # adapters on chosen linear layers
    from qtune.tokenizer import load_tokenizer
    from qtune.generate import generate
"""

__version__ = "0.1.0"
