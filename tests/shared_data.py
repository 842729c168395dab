"""Where the reference data lives: `shared/data/` beside the repository (or $QTUNE_SHARED_DATA)."""

import os
from pathlib import Path

import pytest

SHARED_DATA_DIR = Path(os.environ.get("QTUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ALPACA_DEMO = SHARED_DATA_DIR / "llamafactory" / "alpaca_en_demo.json"
DPO_DEMO = SHARED_DATA_DIR / "llamafactory" / "dpo_en_demo.json"
C4_DEMO = SHARED_DATA_DIR / "llamafactory" / "c4_demo.jsonl"
HH_HARMLESS = SHARED_DATA_DIR / "hh_rlhf" / "harmless-base_test.jsonl.gz"
SEED_TASKS = SHARED_DATA_DIR / "self_instruct" / "seed_tasks.jsonl"
SHARED_DATA = pytest.mark.skipif(not ALPACA_DEMO.is_file(), reason=f"shared data not found at {SHARED_DATA_DIR}")
