"""ROUGE-L scoring on known strings, aggregation per task, and generation on a tiny model."""

from __future__ import annotations

import pytest
import torch

from fixtures import make_byte_tokenizer, save_tiny_causal_lm
from peft_mode.data import PromptTokenizer
from peft_mode.data.sni import SNIInstance
from peft_mode.evaluation import generate_predictions, normalize_text, results_table, rouge_l, score_predictions


@pytest.mark.parametrize(
    "prediction, references, expected",
    [
        ("The cat sat.", ["the cat sat"], 100.0),
        ("Yes!", ["yes"], 100.0),
        # LCS of (a b c d) and (a b x d) is 3 tokens: precision = recall = 3/4.
        ("a b c d", ["a b x d"], 75.0),
        # LCS 2 of 2 predicted and 4 reference tokens: P = 1, R = 0.5, F = 2PR / (P + R) = 2/3.
        ("a b", ["a x b y"], 200.0 / 3.0),
        # The Porter stemmer maps "running" and "runs" to "run".
        ("running fast", ["runs fast"], 100.0),
        ("", ["anything"], 0.0),
        ("blue", ["red", "blue sky"], 2 * (1.0 * 0.5) / 1.5 * 100),
    ],
)
def test_rouge_l_known_strings(prediction, references, expected):
    assert rouge_l(prediction, references) == pytest.approx(expected, rel=1e-6)


def test_normalize_text():
    assert normalize_text("  Hello,   WORLD!\n(ok) ") == "hello world ok"


def test_rouge_l_needs_references():
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l("x", [])


def instance(task, number, *references):
    return SNIInstance(task, f"{task}-{number}", "definition", "input", tuple(references))


def test_scores_aggregate_per_task_and_overall():
    instances = [instance("t1", 0, "yes"), instance("t1", 1, "no"), instance("t2", 0, "a b c d")]
    predictions = ["yes", "yes", "a b x d"]

    results = score_predictions(instances, predictions)

    assert results["per_task"] == {"t1": 50.0, "t2": pytest.approx(75.0)}
    assert results["overall"] == pytest.approx((100 + 0 + 75) / 3)
    assert results["task_mean"] == pytest.approx((50 + 75) / 2)
    assert results["counts"] == {"t1": 2, "t2": 1}
    assert results["instances"][2]["prediction"] == "a b x d"
    baseline = {"per_task": {"t1": 10.0, "t2": 20.0}, "overall": 15.0, "task_mean": 15.0}
    table = results_table(results, baseline, labels=("untuned", "tuned"))
    assert "| task | eval instances | untuned ROUGE-L | tuned ROUGE-L | change |" in table
    assert "| t1 | 2 | 10.00 | 50.00 | +40.00 |" in table


def test_score_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions for 1 instances"):
        score_predictions([instance("t", 0, "x")], ["a", "b"])


def test_generation_matches_unbatched_greedy(tmp_path):
    """Left padding and length sorting give the same text as generating each prompt alone."""
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_causal_lm(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = make_byte_tokenizer()
    prompts = PromptTokenizer(tokenizer, max_source_length=64, max_target_length=8)
    items = [SNIInstance("t", str(i), "Say it.", text, ("x",)) for i, text in enumerate(["a", "longer input", "mid"])]

    batched = generate_predictions(model, tokenizer, prompts, items, batch_size=3, max_new_tokens=6, show_progress=False)

    for item, prediction in zip(items, batched):
        ids = torch.tensor([prompts.prompt_ids(item.definition, item.input)])
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert prediction == tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
