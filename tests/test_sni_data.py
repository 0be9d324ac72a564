"""SNI task loading, the deterministic split, prompt building and loss masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures import TASKS, make_byte_tokenizer, write_sni_fixture
from peft_mode.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    PromptTokenizer,
    SNIDataError,
    load_sni_splits,
    load_task,
    tokenize_for_training,
)
from peft_mode.data.sni import instances_to_dataset, resolve_task_names, split_task

SHARED_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "natural-instructions-subset"


@pytest.fixture
def sni_dir(tmp_path):
    return write_sni_fixture(tmp_path / "sni")


def test_load_task_reads_definition_and_instances(sni_dir):
    instances = load_task(sni_dir, "task001_reverse_word")

    assert len(instances) == 10
    assert instances[0].definition == "Write the given word backwards."
    assert (instances[0].input, instances[0].references) == ("cat", ("tac",))
    assert instances[0].task == "task001_reverse_word"


def test_split_is_90_10_and_deterministic(sni_dir):
    first = load_sni_splits(sni_dir, list(TASKS), eval_fraction=0.1, seed=3)
    second = load_sni_splits(sni_dir, list(TASKS), eval_fraction=0.1, seed=3)
    other_seed = load_sni_splits(sni_dir, list(TASKS), eval_fraction=0.1, seed=4)

    assert [i.id for i in first.train] == [i.id for i in second.train]
    assert [i.id for i in first.eval] == [i.id for i in second.eval]
    assert [i.id for i in first.eval] != [i.id for i in other_seed.eval]
    for task, eval_items in first.eval_by_task().items():
        train_ids = {i.id for i in first.train if i.task == task}
        assert len(eval_items) == 1 and len(train_ids) == 9
        assert not train_ids & {i.id for i in eval_items}


def test_split_does_not_depend_on_other_tasks(sni_dir):
    alone = load_sni_splits(sni_dir, ["task002_uppercase"], seed=1)
    together = load_sni_splits(sni_dir, list(TASKS), seed=1)

    assert [i.id for i in alone.eval] == [i.id for i in together.eval if i.task == "task002_uppercase"]


def test_instances_per_task_caps_before_split(sni_dir):
    splits = load_sni_splits(sni_dir, ["task001"], instances_per_task=5, eval_fraction=0.2)

    assert (len(splits.train), len(splits.eval)) == (4, 1)


def test_eval_count_rounds_up():
    from peft_mode.data.sni import SNIInstance

    instances = [SNIInstance("t", str(i), "d", str(i), ("x",)) for i in range(25)]

    train, evaluation = split_task(instances, None, 0.1, seed=0)

    assert (len(train), len(evaluation)) == (22, 3)


def test_number_prefix_and_split_file(sni_dir):
    assert resolve_task_names(sni_dir, ["task002"]) == ["task002_uppercase"]
    assert load_sni_splits(sni_dir, "split:splits/default/train_tasks.txt").tasks == list(TASKS)


def test_split_entry_inside_task_list(sni_dir):
    splits = load_sni_splits(sni_dir, [list(TASKS)[0], "split:splits/default/train_tasks.txt"])

    assert splits.tasks == list(TASKS)


def test_shared_subset_loads_all_eleven_tasks():
    splits = load_sni_splits(SHARED_SUBSET, "split:splits/default/train_tasks.txt")

    assert len(splits.tasks) == 11
    assert len(splits.train) + len(splits.eval) == 2697
    assert all(len(items) >= 23 for items in splits.eval_by_task().values())


@pytest.mark.parametrize(
    "make_problem, expected",
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: root / "tasks", "has no tasks/ subfolder"),
    ],
)
def test_bad_paths(sni_dir, make_problem, expected):
    with pytest.raises(SNIDataError, match=expected):
        load_sni_splits(make_problem(sni_dir), ["task001"])


def test_unknown_task_suggests_close_names(sni_dir):
    with pytest.raises(SNIDataError) as error:
        load_sni_splits(sni_dir, ["task001_reverse_wrd"])

    assert "Unknown task 'task001_reverse_wrd'" in str(error.value)
    assert "task001_reverse_word" in str(error.value)


def test_duplicate_and_empty_task_lists(sni_dir):
    with pytest.raises(SNIDataError, match="more than once"):
        load_sni_splits(sni_dir, ["task001", "task001_reverse_word"])
    with pytest.raises(SNIDataError, match="empty"):
        load_sni_splits(sni_dir, [])


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON (line 1"),
        (json.dumps({"Definition": ["x"]}), "no 'Instances' key"),
        (json.dumps({"Instances": []}), "no 'Definition' key"),
        (json.dumps({"Definition": ["x"], "Instances": []}), "no usable instances"),
        (json.dumps({"Definition": ["x"], "Instances": [{"input": "a", "output": [""]}]}), "no usable instances"),
        (json.dumps({"Definition": 3, "Instances": []}), "'Definition' must be a list of strings"),
        (json.dumps({"Definition": ["x"], "Instances": [{"output": ["a"]}]}), "instance 0 needs a string 'input'"),
        (json.dumps([1, 2]), "must contain a JSON object"),
    ],
)
def test_malformed_task_files(sni_dir, content, expected):
    (sni_dir / "tasks" / "task009_broken.json").write_text(content)

    with pytest.raises(SNIDataError) as error:
        load_sni_splits(sni_dir, ["task009_broken"])

    assert expected in str(error.value)
    assert "task009_broken" in str(error.value)


def test_prompt_masking_and_target():
    tokenizer = make_byte_tokenizer()
    prompts = PromptTokenizer(tokenizer, "Definition: {definition}\nInput: {input}\nOutput: ", 64, 8)

    example = prompts.training_example("Reverse it.", "cat", "tac")

    prompt_length = len(prompts.prompt_ids("Reverse it.", "cat"))
    assert tokenizer.decode(example["input_ids"][:prompt_length]) == "Definition: Reverse it.\nInput: cat\nOutput: "
    assert example["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:]
    assert tokenizer.decode(example["labels"][prompt_length:]) == "tac</s>"
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_long_prompt_shortens_definition_then_input():
    tokenizer = make_byte_tokenizer()
    prompts = PromptTokenizer(tokenizer, "D: {definition}\nI: {input}\nO: ", max_source_length=40, max_target_length=4)

    long_definition = prompts.prompt_ids("d" * 100, "input")
    long_both = prompts.prompt_ids("d" * 100, "x" * 100 + "QUESTION")
    target = prompts.target_ids("abcdefgh")

    assert len(long_definition) == 40
    assert tokenizer.decode(long_definition).endswith("\nI: input\nO: ")
    assert len(long_both) == 40
    assert tokenizer.decode(long_both).endswith("QUESTION\nO: ")
    assert "D: " + "d" * 16 in tokenizer.decode(long_both)
    assert tokenizer.decode(target) == "abc</s>"


@pytest.mark.parametrize("template", ["{definition} only", "{definition} {input} {extra}", "{input} {input} {definition}"])
def test_prompt_template_fields_checked(template):
    with pytest.raises(ValueError, match="prompt_template"):
        PromptTokenizer(make_byte_tokenizer(), template)


def test_dataset_keeps_task_names_and_collator_pads(sni_dir):
    tokenizer = make_byte_tokenizer()
    splits = load_sni_splits(sni_dir, list(TASKS))
    dataset = tokenize_for_training(instances_to_dataset(splits.train), PromptTokenizer(tokenizer))
    collator = CausalLMCollator(tokenizer.pad_token_id)

    batch = collator([dataset[0], dataset[15]])

    assert set(dataset["task"]) == set(TASKS)
    assert dataset[0]["length"] == len(dataset[0]["input_ids"])
    assert batch["input_ids"].shape[1] % 8 == 0
    shorter = min(dataset[0]["length"], dataset[15]["length"])
    row = 0 if dataset[0]["length"] == shorter else 1
    assert batch["attention_mask"][row, shorter:].sum() == 0
    assert (batch["labels"][row, shorter:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][row, shorter:] == tokenizer.pad_token_id).all()


def test_left_padding_for_generation():
    collator = CausalLMCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=None)

    batch = collator([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [8], "attention_mask": [1]}])

    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in batch
    assert batch["input_ids"].dtype == torch.long
