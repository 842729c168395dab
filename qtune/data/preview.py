"""`qtune data preview`: a few examples as the model sees them, trained tokens highlighted, plus statistics."""

from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from qtune.data.render import IGNORE
from qtune.data.tokenized import Example


def labelled_spans(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The example's text as (text, trained) runs: consecutive tokens with the same trained flag decoded together.

    Decoding runs rather than single tokens keeps multi-byte characters that span tokens intact.
    """
    trained = example.labels != IGNORE
    spans, start = [], 0
    for t in range(1, len(trained) + 1):
        if t == len(trained) or trained[t] != trained[start]:
            text = tokenizer.decode(example.input_ids[start:t].tolist(), skip_special=False)
            spans.append((text, bool(trained[start])))
            start = t
    return spans


def example_text(example: Example, tokenizer) -> Text:
    """Rich text: trained tokens bold green, the rest dim."""
    out = Text()
    for text, trained in labelled_spans(example, tokenizer):
        out.append(text, style="bold green" if trained else "dim")
    return out


def stats_table(stats: dict) -> Table:
    table = Table(title="data", show_edge=False)
    for column in ("source", "format", "records", "examples", "truncated", "dropped", "train", "val", "cached"):
        table.add_column(column, justify="left" if column in ("source", "format") else "right")
    rows = stats["sources"] + ([stats["pretrain"]] if stats["pretrain"] else [])
    for s in rows:
        name = Path(s["name"]).name if Path(s["name"]).exists() else s["name"]  # a file's name, or a dataset's
        table.add_row(name, s["format"], *(str(s.get(k, "")) for k in
                                                ("records", "examples", "truncated", "dropped", "train", "val",
                                                 "cached")))
    return table


def show_preview(data, tokenizer, n: int = 3, console: Console | None = None) -> None:
    """Print the first `n` training examples and the statistics of an `SFTData`."""
    console = console or Console()
    for i, example in enumerate(data.train[:n]):
        trained = int((example.labels != IGNORE).sum())
        title = f"example {i}: {len(example.input_ids)} tokens, {trained} trained"
        console.print(Panel(example_text(example, tokenizer), title=title, title_align="left"))
    console.print(Text("bold green", style="bold green") + Text(" = trained tokens, ") + Text("dim", style="dim")
                  + Text(" = context only"))
    console.print(stats_table(data.stats))
    s = data.stats
    summary = (f"train: {s['train_examples']} examples in {s['train_rows']} rows, {s['train_tokens']} tokens "
               f"({s['trained_tokens']} trained); val: {s['val_examples']} examples; "
               f"truncated {s['truncated']}, dropped {s['dropped']}")
    if "row_fill" in s:
        summary += f"; packed rows {100 * s['row_fill']:.1f}% full"
    console.print(summary)
