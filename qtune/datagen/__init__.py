"""Instruction-data generation with a local model: Self-Instruct, Alpaca-style and Evol-Instruct.

Pipelines: `self_instruct.run_self_instruct(recipe)` (Self-Instruct or Alpaca-style, `qtune self-instruct`)
and `evol_instruct.run_evol_instruct(recipe)` (`qtune evol-instruct`), both writing
output.dir/instructions.jsonl, alpaca.json and report.json, and resumable.

Parts: `rouge` (ROUGE-L as rouge-score computes it), `filters` (reasons to reject instructions and
instances), `prompts` / `evol` (prompt builders, evolution operations and elimination rules), `parse`
(completion parsers), `seeds` (seed tasks), `difficulty` (instruction-following difficulty), `store`
(resumable output), `runner` (generation, progress, final files), `config` (recipe schemas).
"""
