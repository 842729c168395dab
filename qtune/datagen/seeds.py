"""Tasks in the Self-Instruct seed format, and reading them with errors that name the file and line.

One JSON object per line: `{"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}`.
Evol-Instruct may also start from an Alpaca-format JSON array (`[{"instruction", "input", "output"}]`).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# qtune's own small seed set (written for qtune, same format as the 175 Self-Instruct seeds).
BUILTIN_SEED_TASKS = Path(__file__).resolve().parent / "seed_tasks.jsonl"


class SeedError(ValueError):
    """A seed file qtune cannot read; the message names the file, the line and the field."""


@dataclass
class Instance:
    input: str
    output: str


@dataclass
class Task:
    """One task: an instruction and its input/output instances, plus where it came from."""

    id: str
    name: str
    instruction: str
    instances: list[Instance]
    is_classification: bool = False
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The Self-Instruct record (with `provenance` for generated tasks)."""
        record = {"id": self.id, "name": self.name, "instruction": self.instruction,
                  "instances": [{"input": i.input, "output": i.output} for i in self.instances],
                  "is_classification": self.is_classification}
        if self.provenance:
            record["provenance"] = self.provenance
        return record

    def alpaca_examples(self) -> list[dict]:
        """One Alpaca example (`instruction`, `input`, `output`) per instance."""
        return [{"instruction": self.instruction, "input": i.input, "output": i.output} for i in self.instances]


def task_name(instruction: str, words: int = 6) -> str:
    """A snake_case slug of the first words, like the seed tasks' `name`."""
    return "_".join(re.findall(r"[a-z0-9]+", instruction.lower())[:words]) or "task"


SEED_FIELDS = ("id", "name", "instruction", "instances", "is_classification")


def _require(record: dict, key: str, kind: type, where: str) -> object:
    if key not in record:
        raise SeedError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise SeedError(f"{where}: field {key!r} must be {kind.__name__}, found {type(value).__name__} {value!r:.60}")
    return value


def parse_task(record: object, where: str) -> Task:
    """Validate one decoded seed record; `where` ("file:line") prefixes every error."""
    if not isinstance(record, dict):
        raise SeedError(f"{where}: expected a JSON object, found {type(record).__name__}")
    missing = [k for k in SEED_FIELDS if k not in record]
    if missing:
        raise SeedError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                        f"(each task needs {', '.join(SEED_FIELDS)})")
    instruction = _require(record, "instruction", str, where)
    if not instruction.strip():
        raise SeedError(f"{where}: field 'instruction' is empty")
    instances = []
    for k, inst in enumerate(_require(record, "instances", list, where)):
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) or not isinstance(inst.get("output"), str):
            raise SeedError(f"{where}: instances[{k}] must be an object with string fields 'input' and 'output', "
                            f"found {inst!r:.80}")
        instances.append(Instance(inst["input"], inst["output"]))
    if not instances:
        raise SeedError(f"{where}: field 'instances' is empty (give at least one {{\"input\", \"output\"}} pair)")
    return Task(id=str(_require(record, "id", str, where)), name=_require(record, "name", str, where),
                instruction=instruction, instances=instances,
                is_classification=_require(record, "is_classification", bool, where))


def load_seed_tasks(path: str | Path) -> list[Task]:
    """Read a Self-Instruct seed file (JSONL). Blank lines are skipped; anything else malformed is an error
    naming the line."""
    path = Path(path)
    if not path.is_file():
        raise SeedError(f"seed file {path} does not exist (set data.seed_tasks to a JSONL file in the "
                        f"Self-Instruct format, or to 'builtin' for qtune's own seed set)")
    tasks, ids = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SeedError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                            f"JSON object") from None
        task = parse_task(record, where)
        if task.id in ids:
            raise SeedError(f"{where}: duplicate id {task.id!r}")
        ids.add(task.id)
        tasks.append(task)
    if not tasks:
        raise SeedError(f"seed file {path} holds no tasks")
    return tasks


def load_alpaca_examples(path: str | Path) -> list[Task]:
    """Read an Alpaca-format JSON array as one-instance tasks (for Evol-Instruct's starting set)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SeedError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(rows, list):
        raise SeedError(f"{path}: expected a JSON array of {{instruction, input, output}} objects")
    tasks = []
    for k, row in enumerate(rows):
        where = f"{path}: item {k}"
        if not isinstance(row, dict):
            raise SeedError(f"{where}: expected an object, found {type(row).__name__}")
        instruction = _require(row, "instruction", str, where)
        output = _require(row, "output", str, where)
        inp = row.get("input", "")
        if not isinstance(inp, str):
            raise SeedError(f"{where}: field 'input' must be str, found {type(inp).__name__}")
        tasks.append(Task(id=f"alpaca_{k}", name=task_name(instruction), instruction=instruction,
                          instances=[Instance(inp, output)]))
    return tasks


def load_tasks(path: str | Path) -> list[Task]:
    """Seed tasks from `path`: 'builtin' (qtune's set), a Self-Instruct JSONL file, or an Alpaca JSON array."""
    if str(path) == "builtin":
        return load_seed_tasks(BUILTIN_SEED_TASKS)
    if Path(path).suffix == ".json":
        return load_alpaca_examples(path)
    return load_seed_tasks(path)
