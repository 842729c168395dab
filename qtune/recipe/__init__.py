"""TOML recipes: the engine (schema.py), the shared sections (sections.py), the alignment recipes
(align.py) and loading with the table of kinds (load.py)."""
