"""traind.toml's memory and speed knobs as the worker applies them: TrainingArguments, the attention kernel, and
a real job on the tiny model with gradient checkpointing, its memory estimate and measured peak in the events."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.core import protocol
from engine.core.config import CheckpointConfig, TrainingConfig
from engine.data.demo_data import write_demo_file
from worker_runs import TRAINING, make_spec, of, run_worker

pytestmark = pytest.mark.e2e


def test_the_knobs_reach_the_trainer_arguments(tmp_path, capsys):
    from engine.worker.train import training_arguments

    t = TrainingConfig(gradient_checkpointing=True, optim="adamw_torch_fused", max_grad_norm=0.5,
                       use_liger_kernel=True, torch_compile=False)
    args = training_arguments(tmp_path, t, CheckpointConfig(), "fp32")
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.optim == "adamw_torch_fused" and args.max_grad_norm == 0.5 and not args.torch_compile
    # liger-kernel is not installed here: the job goes on without it, and says so
    assert not args.use_liger_kernel
    assert "use_liger_kernel is set but the liger-kernel package is not installed" in capsys.readouterr().out
    plain = training_arguments(tmp_path, TrainingConfig(), CheckpointConfig(), "fp32")
    assert not plain.activation_checkpointing and plain.optim == "adamw_torch" and plain.max_grad_norm == 1.0


def test_auto_attention_is_sdpa_without_flash_attn_and_asking_for_it_says_what_is_missing():
    from engine.worker.train import installed, resolve_attn_implementation

    if installed("flash_attn"):
        pytest.skip("flash-attn is installed here")
    assert resolve_attn_implementation("auto", "bf16") == "sdpa"
    assert resolve_attn_implementation("eager", "fp32") == "eager"
    with pytest.raises(ValueError) as err:
        resolve_attn_implementation("flash_attention_2", "bf16")
    assert "traind.toml: training.attn_implementation = 'flash_attention_2': the flash-attn package is not " \
           "installed" in str(err.value)


def test_a_job_with_gradient_checkpointing_trains_and_reports_its_memory(tmp_path, tiny_model_dir):
    data = write_demo_file(tmp_path / "text.jsonl", 100, "text", seed=1)
    spec = make_spec(tmp_path, tiny_model_dir, "text", data, "knobs")
    spec = dataclasses.replace(spec, training=dict(TRAINING, gradient_checkpointing=True, optim="adamw_torch",
                                                   max_grad_norm=0.5))
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    start, end = of(events, "job_start")[0], events[-1]
    assert end["event"] == "job_end" and end["outcome"] == "done" and end["step"] == start["total_steps"]
    assert end["peak_memory"] is None  # a CPU: nothing measured
    estimate = start["memory_estimate"]
    assert estimate["method"] == "full" and estimate["parameters"] == estimate["trainable"] > 0
    assert estimate["batch_size"] == TRAINING["batch_size"] and estimate["seq_length"] == TRAINING["max_seq_length"]
    parts = ("weights", "optimizer", "weight_copies", "activations", "logits", "gradients", "step_temporaries")
    assert estimate["total"] >= estimate["weights"] + estimate["optimizer"] > 0 and set(parts) <= set(estimate)
    assert start["attn_implementation"] == "sdpa"
    assert "GPU memory estimate: about" in Path(spec.log_path).read_text()
    assert Path(spec.model_out, protocol.MODEL_MARKER).exists()


def test_an_optimizer_transformers_does_not_know_fails_the_job_naming_it(tmp_path, tiny_model_dir):
    """traind.toml's own check stops a misspelt name before any job; a spec that still carries one (another
    transformers than the daemon's list was made from) fails with transformers' own words, naming it."""
    data = write_demo_file(tmp_path / "text.jsonl", 20, "text", seed=1)
    spec = make_spec(tmp_path, tiny_model_dir, "text", data, "badoptim")
    spec = dataclasses.replace(spec, training=dict(TRAINING, optim="adamw_bogus"))
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_FAILED
    assert "adamw_bogus is not a valid OptimizerNames" in of(events, "error")[0]["message"]
    assert not of(events, "job_start") and not Path(spec.model_out).exists()
