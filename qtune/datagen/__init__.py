"""Instruction-data generation with a local model: Self-Instruct, Alpaca-style and Evol-Instruct.

Modules: `rouge` (ROUGE-L as rouge-score computes it), `filters` (reasons to reject instructions and
instances), `prompts` / `evol` (prompt builders, evolution operations and elimination rules), `parse`
(completion parsers), `seeds` (seed tasks), `store` (resumable output), `config` (recipe schemas).
"""
