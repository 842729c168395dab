"""Training data: loading, the Alpaca / chat / ShareGPT / text formats, label masks, caching, mixtures, batches.

    from qtune.data import build_sft_data, DataPosition
    data = build_sft_data(recipe.data, tokenizer, seed=recipe.train.seed)
    for position, batch in data.batches(recipe.train.micro_batch_size, recipe.train.seed, start=DataPosition()):
        ...
"""

from qtune.data.batching import DataPosition, collate, epoch_batches, pack_rows
from qtune.data.records import DataError, Records, load_records
from qtune.data.render import IGNORE, PROMPT_DICT, alpaca_prompt, detect_format, tokenize_record
from qtune.data.sft import SFTData, build_sft_data, mixture_counts
from qtune.data.tokenized import Example, TokenizedSet, tokenize_cached, tokenize_records

__all__ = [
    "DataPosition", "collate", "epoch_batches", "pack_rows", "DataError", "Records", "load_records", "IGNORE",
    "PROMPT_DICT", "alpaca_prompt", "detect_format", "tokenize_record", "SFTData", "build_sft_data",
    "mixture_counts", "Example", "TokenizedSet", "tokenize_cached", "tokenize_records",
]
