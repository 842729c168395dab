"""Data generation, text side: ROUGE-L against rouge-score, filters, parsers, prompt sampling, seeds, Evol rules."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from qtune.datagen import filters as F
from qtune.datagen.evol import (APOLOGY, COPIED_PROMPT, EMPTY_ANSWER, OPERATIONS, UNCHANGED, Elimination,
                                clean_evolved, evolution_prompt, judged_equal)
from qtune.datagen.parse import (parse_alpaca_list, parse_instances, parse_instruction_list, parse_yes_no,
                                 split_numbered_items)
from qtune.datagen.prompts import (alpaca_prompt, classification_prompt, instance_prompt, instruction_prompt,
                                   sample_demonstrations)
from qtune.datagen.rouge import InstructionPool, rouge_l, rouge_tokenize
from qtune.datagen.seeds import BUILTIN_SEED_TASKS, Instance, SeedError, Task, load_seed_tasks, load_tasks

SEEDS_175 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "self_instruct" / "seed_tasks.jsonl"
if not SEEDS_175.exists():
    SEEDS_175 = Path("/work/shared/data/self_instruct/seed_tasks.jsonl")


# ----------------------------------------------------------------------------- ROUGE-L

ROUGE_PAIRS = [
    ("Give three tips for staying healthy.", "Give three tips for staying fit and healthy."),
    ("Give three tips for staying healthy.", "What are the three primary colors?"),
    ("Write a poem about the ocean.", "Write a short poem about the sea."),
    ("Generate a list of 5 adjectives.", "Generate a list of 5 adverbs."),
    ("Café au lait, s'il vous plaît!", "cafe au LAIT -- s'il vous plait"),
    ("", "anything"),
    ("!!! ...", "???"),
    ("İstanbul naïve résumé 東京 2023", "istanbul 2023 resume"),
    ("tabs\tand\nnewlines  and_underscores", "tabs and newlines and underscores"),
    ("a b a b a b c", "b a b c a"),
]


def test_rouge_l_equals_rouge_score_on_pairs_and_seed_instructions():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    seeds = [json.loads(line)["instruction"] for line in SEEDS_175.read_text().splitlines()]
    rng = random.Random(0)
    pairs = ROUGE_PAIRS + [tuple(rng.sample(seeds, 2)) for _ in range(300)]
    for target, prediction in pairs:
        assert rouge_tokenize(target) == scorer._tokenizer.tokenize(target)
        assert rouge_l(target, prediction) == scorer.score(target, prediction)["rougeL"].fmeasure, (target, prediction)


def test_rouge_l_spec_vectors_and_pool_threshold():
    assert rouge_l("Give three tips for staying healthy.", "Give three tips for staying fit and healthy.") == pytest.approx(0.8571, abs=1e-4)
    assert rouge_l("Give three tips for staying healthy.", "What are the three primary colors?") == pytest.approx(0.1667, abs=1e-4)
    assert rouge_l("Write a poem about the ocean.", "Write a short poem about the sea.") == pytest.approx(0.7692, abs=1e-4)
    pool = InstructionPool()
    for text in ("Give three tips for staying healthy.", "What are the three primary colors?"):
        pool.add(text)
    sim = pool.similarity("Give three tips for staying fit and healthy.")
    assert sim.max_score == pytest.approx(6 / 7)
    assert list(sim.most_similar) == ["Give three tips for staying healthy.", "What are the three primary colors?"]
    assert sim.mean_score == pytest.approx((6 / 7 + rouge_l("What are the three primary colors?",
                                                              "Give three tips for staying fit and healthy.")) / 2)
    assert F.InstructionFilter().similarity_reason(sim.max_score) == F.TOO_SIMILAR
    assert F.InstructionFilter().similarity_reason(0.7) is None  # upstream keeps exactly 0.7


# ----------------------------------------------------------------------------- filters

@pytest.mark.parametrize("text, reason", [
    ("Tell me a joke about cats and dogs.", None),
    ("Name it now", F.TOO_SHORT),  # 3 words
    ("Name three things", F.TOO_SHORT),
    ("Name four green things", None),  # 4 words pass
    ("word " * 151, F.TOO_LONG),
    ("Describe the picture in detail please.", F.BLACKLISTED),
    ("Please Go To the store and buy milk.", F.BLACKLISTED),
    ("Explain how road mapping works in cartography.", None),  # "mapping" is not the word "map"
    ("Plot the sales data for me.", F.BLACKLISTED),
    ("Write a program to sort a list.", F.PROGRAM),
    ('"quote" this sentence for me please.', F.PUNCTUATION_START),
    ("¿Qué hora es ahora mismo?", F.NON_ASCII_START),
    ("   ", F.EMPTY_INSTRUCTION),
])
def test_instruction_filter_reasons(text, reason):
    assert F.InstructionFilter().reject_reason(text) == reason


def test_alpaca_blacklist_adds_media_words():
    assert F.InstructionFilter(blacklist=F.ALPACA_BLACKLIST).reject_reason("Compose some music for a birthday.") == F.BLACKLISTED
    assert F.InstructionFilter().reject_reason("Compose some music for a birthday.") is None


def test_instance_filters():
    rejected = Counter()
    kept = F.filter_instances([("same", "same"), ("x", ""), ("Input:", "y"), ("a", "b"), ("a", "b"), ("", "c")], rejected)
    assert kept == [("a", "b"), ("", "c")]
    assert rejected == {F.INPUT_EQUALS_OUTPUT: 1, F.EMPTY_OUTPUT: 1, F.ENDS_WITH_COLON: 1, F.DUPLICATE_INSTANCE: 1}
    rejected = Counter()
    assert F.filter_instances([("a", "b"), ("a", "c"), ("d", "e")], rejected) == []
    assert rejected == {F.CONFLICTING_OUTPUTS: 3}
    # Different outputs for an empty input are not a conflict (input-less tasks have many good answers).
    assert F.filter_instances([("", "b"), ("", "c")], Counter()) == [("", "b"), ("", "c")]


# ----------------------------------------------------------------------------- parsers

def test_self_instruct_list_spec_vector_then_filters():
    text = (" Write a Haiku about NASA and the Moon.\n10. Plot the sales data.\n11. Name it\n12. Write a program to sort "
            "a list.\n13. \"Quote\" this sentence for me please.\n14. Tell me a joke about cats and dogs.")
    parsed = parse_instruction_list(text, "stop")
    kept = [t for t in parsed.items if F.InstructionFilter().reject_reason(t) is None]
    assert kept == ["Write a haiku about nasa and the moon.", "Tell me a joke about cats and dogs."]


def test_numbered_list_malformed_numbering_and_truncation():
    text = (" First task here\n10) Second task here\n10 . Third task\n  12.Fourth task\ncontinues on a line\n"
            "7: Fifth task\n- not a number\n13. Sixth task is cut off in the mid")
    assert split_numbered_items(text) == ["First task here", "Second task here", "Third task",
                                          "Fourth task continues on a line", "Fifth task - not a number",
                                          "Sixth task is cut off in the mid"]
    parsed = parse_instruction_list(text, "length", capitalize=False)
    assert parsed.items[-1] == "Fifth task - not a number" and parsed.truncated == 1
    assert parse_instruction_list("", "length").items == []
    assert parse_instruction_list("\n\n", "stop").items == []


def test_alpaca_list_spec_vector_and_malformed_items():
    text = (" Rewrite the sentence in passive voice.\n4. Input:\nThe cat chased the mouse.\n4. Output:\nThe mouse was "
            "chased by the cat.\n###\n5. Instruction: Draw a map of your town.\n5. Input:\n<noinput>\n5. Output:\nN/A\n"
            "###\n6. Instruction: Name three primary colors.\n6. Input:\n<NoInput>\n6. Output:\nRed, blue and yellow.\n"
            "###\n7. Instruction: Explain photosynthesis")
    parsed = parse_alpaca_list(text, "length")
    flt = F.InstructionFilter(blacklist=F.ALPACA_BLACKLIST)
    kept = [t for t in parsed.items if flt.reject_reason(t["instruction"]) is None]
    assert kept == [{"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.",
                     "output": "The mouse was chased by the cat."},
                    {"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."}]
    assert parsed.truncated == 1
    # Wrong numbers, no "###", a missing output (malformed), and no truncation when the model stopped itself.
    text = (" Say hi politely to a guest.\n9. Output:\nHello, welcome!\n5) Instruction: Count the vowels.\n"
            "Input: banana\n###\n12. Instruction: A task without output\n12. Input:\nxyz\n"
            "Instruction: Add the numbers.\nInput: 2, 3\nOutput: 5")
    parsed = parse_alpaca_list(text, "stop")
    assert [t["instruction"] for t in parsed.items] == ["Say hi politely to a guest.", "Add the numbers."]
    assert parsed.items[1] == {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"}
    assert parsed.malformed == 2


def test_instance_parsing_spec_vectors():
    gen = ("Example 1\nSentence: I love it.\nOutput: positive\nExample 2\nSentence: I hate it.\nOutput: negative\n"
           "Example 3\nSentence: I love it.\nOutput: positive")
    parsed = parse_instances(gen, is_classification=False, finish_reason="stop")
    assert F.filter_instances(parsed.items, Counter()) == [("Sentence: I love it.", "positive"),
                                                          ("Sentence: I hate it.", "negative")]
    conflict = "Example 1\nSentence: I love it.\nOutput: positive\nExample 2\nSentence: I love it.\nOutput: negative"
    assert F.filter_instances(parse_instances(conflict, False, "stop").items, Counter()) == []
    clf = ("Class label: Positive\nSentence: Great movie!\nClass label: Negative\nSentence: Boring plot.\n"
           "Class label: Neutral")
    assert parse_instances(clf, True, "stop").items == [("Sentence: Great movie!", "Positive"),
                                                        ("Sentence: Boring plot.", "Negative"), ("", "Neutral")]
    assert parse_instances(clf, True, "length").items == [("Sentence: Great movie!", "Positive"),
                                                          ("Sentence: Boring plot.", "Negative")]


def test_instance_parsing_edge_cases():
    # A bare "Output:" (no input), an output that runs into another input, "Input 2:" labels, nothing to parse.
    assert parse_instances("Output: Plank, sit-ups", False, "stop").items == [("", "Plank, sit-ups")]
    assert parse_instances("Example 1\nInput: 2+2\nOutput: 4\nInput: 3+3", False, "stop").items == [("2+2", "4")]
    assert parse_instances("Example 1\nInput 2: [3, 1]\nOutput 2: [1, 3]", False, "stop").items == [("[3, 1]", "[1, 3]")]
    assert parse_instances("no markers at all", False, "stop").items == []
    assert parse_instances("Positive\nSentence: fine", True, "stop").items == []


def test_yes_no_and_judge_answers():
    assert parse_yes_no(" Yes") and parse_yes_no("yes.") and parse_yes_no("YES, it is")
    assert not parse_yes_no(" No") and not parse_yes_no("") and not parse_yes_no("Yesterday")
    assert judged_equal(" Equal.") and not judged_equal("Different") and not judged_equal("Not Equal")


# ----------------------------------------------------------------------------- prompts

def _tasks(n, prefix):
    return [Task(f"{prefix}_{i}", f"t{i}", f"{prefix} instruction number {i}:", [Instance("", "x")]) for i in range(n)]


def test_demonstrations_are_six_human_and_two_machine():
    seeds, machine = _tasks(175, "seed"), _tasks(30, "machine")
    rng = random.Random(7)
    for _ in range(50):
        demos = sample_demonstrations(rng, seeds, machine)
        sources = [d.source for d in demos]
        assert len(demos) == 8 and len(set(sources)) == 8
        assert sum(s.startswith("machine") for s in sources) == 2
        assert sum(s.startswith("seed") for s in sources) == 6
        assert all(not d.text.endswith(":") for d in demos)
    assert sum(d.source.startswith("machine") for d in sample_demonstrations(rng, seeds, machine[:1])) == 1
    assert all(d.source.startswith("seed") for d in sample_demonstrations(rng, seeds, []))
    # Seeded: the same seed gives the same prompt, and the machine tasks land at varying positions.
    a = sample_demonstrations(random.Random(3), seeds, machine)
    assert a == sample_demonstrations(random.Random(3), seeds, machine)
    positions = {i for s in range(40) for i, d in enumerate(sample_demonstrations(random.Random(s), seeds, machine))
                 if d.source.startswith("machine")}
    assert positions == set(range(8))


def test_prompt_builders_end_where_the_parsers_start():
    demos = sample_demonstrations(random.Random(0), _tasks(10, "seed"), [])
    prompt = instruction_prompt(demos)
    assert prompt.endswith("\n8. seed instruction number " + demos[-1].text.split()[-1] + "\n9.")
    assert prompt.count("\n") == 9
    assert classification_prompt("Is this spam?:").endswith("Task: Is this spam?\nDoes the answer come from a small, fixed set of labels?")
    assert instance_prompt("Sort the list.", True).endswith("Task: Sort the list.\n")
    assert "Class label:" in instance_prompt("x", True) and "Example 1" in instance_prompt("x", False)
    seeds = load_seed_tasks(SEEDS_175)[:3]
    prompt = alpaca_prompt(seeds)
    assert prompt.endswith("###\n4. Instruction:") and prompt.count("###\n") == 4
    assert "1. Input:\n<noinput>\n1. Output:\nYes, you can have" in prompt  # seed_task_0 has no input
    assert "2. Instruction: What is the relation between the given pairs?\n2. Input:\nNight : Day :: Right : Left\n" in prompt
    assert parse_alpaca_list(prompt.split("1. Instruction:", 1)[1], "stop").items[1]["input"] == "Night : Day :: Right : Left"


# ----------------------------------------------------------------------------- seeds

def test_seed_files_load():
    seeds = load_seed_tasks(SEEDS_175)
    assert len(seeds) == 175 and sum(t.is_classification for t in seeds) == 26
    assert sum(bool(t.instances[0].input) for t in seeds) == 125
    own = load_tasks("builtin")
    assert 20 <= len(own) <= 30 and 0 < sum(t.is_classification for t in own) < len(own)
    assert own[0].to_json() == json.loads(BUILTIN_SEED_TASKS.read_text().splitlines()[0])


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "name": "n", "instruction": "x", "instances": [{"input": "", "output": "y"}]', "not valid JSON"),
    ('{"id": "a", "name": "n", "instances": [{"input": "", "output": "y"}], "is_classification": false}',
     "missing field 'instruction' (each task needs id, name, instruction, instances, is_classification)"),
    ('{"id": "a", "name": "n", "instruction": "x", "instances": [{"input": ""}], "is_classification": false}',
     "instances[0]"),
    ('{"id": "a", "name": "n", "instruction": "x", "instances": [], "is_classification": false}', "'instances' is empty"),
    ('{"id": "a", "name": "n", "instruction": "x", "instances": [{"input": "", "output": "y"}], "is_classification": "no"}',
     "'is_classification' must be bool"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_bad_seed_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"id": "ok", "name": "n", "instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}],
                       "is_classification": False})
    path = tmp_path / "seeds.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(SeedError) as err:
        load_seed_tasks(path)
    assert f"{path}:3:" in str(err.value) and message in str(err.value)


# ----------------------------------------------------------------------------- Evol-Instruct

def test_evolution_prompts_cover_every_operation():
    rng = random.Random(0)
    prompts = {op: evolution_prompt(op, "Give three tips for staying healthy.", rng, ["a JSON object"]) for op in OPERATIONS}
    assert len(set(prompts.values())) == len(OPERATIONS)
    assert all("Give three tips for staying healthy." in p for p in prompts.values())
    assert "a JSON object" in prompts["complicate_input"]
    assert prompts["breadth"].endswith("Created task:\n") and prompts["deepen"].endswith("Rewritten task:\n")


def test_elimination_rules():
    rules = Elimination()
    original = "Give three tips for staying healthy."
    assert rules.evolution_reason(original, "Give three tips for staying healthy while working night shifts.") is None
    assert rules.evolution_reason(original, "  give three tips for staying HEALTHY. ") == UNCHANGED
    assert rules.evolution_reason(original, "") == "empty_evolution"
    assert rules.evolution_reason(original, "Here is the rewritten prompt: give tips for night-shift health.") == COPIED_PROMPT
    assert rules.answer_reason("I'm sorry, but I cannot help with that.") == APOLOGY
    assert rules.answer_reason("Sorry " + "word " * 80) is None  # long answers that apologise once are fine
    assert rules.answer_reason("... the, of and!") == EMPTY_ANSWER
    assert rules.answer_reason("") == EMPTY_ANSWER
    assert rules.answer_reason("Sleep eight hours, drink water, and walk daily.") is None
    assert clean_evolved('Rewritten task: "Name five rivers in Asia."') == "Name five rivers in Asia."
    assert clean_evolved("#Created Prompt#: Name a rare gem.") == "Name a rare gem."
