"""Raw records (one dict per example) from local JSON / JSONL / Parquet files or `datasets` names.

Every record remembers where it came from (`Records.where(i)`: a JSONL line number or a record index),
so a malformed or incomplete record anywhere in the pipeline is reported by file and line.
"""

import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from qtune.data.tasks import GENERATED_PREFIX, generated_records

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".json.gz", ".jsonl.gz")


class DataError(ValueError):
    """Training data qtune cannot use; the message names the file, the line or record, and the problem."""


@dataclass
class Records:
    name: str  # the file path or dataset name, as given
    rows: list[dict]
    lines: list[int] | None  # 1-based line of each row in a JSONL file, None for other sources
    content_hash: str  # sha256 of the file bytes (local files) or of the rows as JSON (datasets)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """"file.jsonl line 12" or "file.json record 5" (0-based index) for error messages."""
        if self.lines is not None:
            return f"{self.name} line {self.lines[i]}"
        return f"{self.name} record {i}"


def _read_text(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except gzip.BadGzipFile:
        raise DataError(f"{path}: not gzip data although the name ends in .gz; rename it without .gz or "
                        "compress it with gzip") from None
    except (EOFError, zlib.error) as e:  # click would report a bare EOFError as "Aborted!"
        raise DataError(f"{path}: the gzip data is truncated or corrupt ({e}); copy or download it again") from None


def _parse_jsonl(path: Path, text: str) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line of a JSONL file must be one complete JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        lines.append(n)
    return rows, lines


def _parse_json(path: Path, text: str) -> tuple[list[dict], list[int] | None]:
    """A JSON array of objects; a .json file that is really JSON lines is read as JSONL."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().split("\n", 1)[0]
        if e.msg == "Extra data" and first.startswith("{"):
            return _parse_jsonl(path, text)
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        return _parse_jsonl(path, text)  # a single object: a one-line JSONL file
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} record {i}: expected a JSON object, got {type(row).__name__}")
    return data, None


def _load_local_file(path: Path) -> Records:
    raw = _read_text(path)
    digest = hashlib.sha256(raw).hexdigest()
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return Records(str(path), rows, None, digest)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if name.endswith(".jsonl"):
        rows, lines = _parse_jsonl(path, text)
    else:
        rows, lines = _parse_json(path, text)
    return Records(str(path), rows, lines, digest)


def _load_with_datasets(name: str, split: str) -> Records:
    """A local dataset directory or a name `datasets.load_dataset` resolves (its own cache applies)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many unrelated types (network, missing split, missing files)
        raise DataError(f"{name}: datasets.load_dataset(..., split={split!r}) failed: {e}. "
                        "Point data.path at a local .json / .jsonl / .parquet file, or check the name and split") from e
    rows = ds.to_list()
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    return Records(name, rows, None, digest)


def _generated(path: str) -> Records:
    """Records qtune makes itself (`qtune:checkable-tasks?...`, `qtune:arithmetic?...`, see qtune/data/tasks.py)."""
    try:
        rows = generated_records(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return Records(path, rows, None, digest)


def load_records(path: str, split: str = "train") -> Records:
    """Read every record of `path`: a local file (by suffix), a local directory, a `datasets` name, or
    data qtune generates (`qtune:checkable-tasks?count=N&seed=S`)."""
    local = Path(path).expanduser()
    if path.startswith(GENERATED_PREFIX):
        records = _generated(path)
    elif local.is_file():
        if not local.name.endswith(LOCAL_SUFFIXES):
            raise DataError(f"{path}: unknown file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        records = _load_local_file(local)
    elif local.is_dir():
        records = _load_with_datasets(str(local), split)
    elif path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file")
    else:
        records = _load_with_datasets(path, split)
    if not records.rows:
        raise DataError(f"{path}: contains no records")
    return records
