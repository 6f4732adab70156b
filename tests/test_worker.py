"""The training worker, driven as the daemon drives it: events pipe, spec on stdin, signals, exit codes.

Real tiny model on the CPU. Every worker runs with one torch thread, so two runs
of the same spec compute bit-identical losses and resume can be compared step by step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from engine.core import protocol
from engine.store import checkpoints
from engine.data.demo_data import write_demo_file
from engine.core.protocol import EVAL_BEFORE
from worker_runs import CHECKPOINT, cmdline, eval_suite, losses, make_spec, of, parent_of, run_worker, start_worker

pytestmark = pytest.mark.e2e

def assert_trained(spec: protocol.JobSpec, rc: int, events: list[dict]) -> None:
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    assert [e["event"] for e in events[:2]] == ["ready", "job_start"]
    start = of(events, "job_start")[0]
    assert start["resumed_from_step"] == 0 and start["examples"] > 0
    steps = of(events, "step")
    assert [e["step"] for e in steps] == list(range(1, start["total_steps"] + 1))
    assert all(math.isfinite(e["loss"]) and e["tokens_per_s"] > 0 for e in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0, "the tiny model should visibly learn"
    assert events[-1]["event"] == "job_end" and events[-1]["outcome"] == "done"

    out = Path(spec.model_out)
    marker = json.loads((out / protocol.MODEL_MARKER).read_text())
    assert marker["job_id"] == spec.job_id and marker["step"] == start["total_steps"]
    assert all((out / f).stat().st_size == size for f, size in marker["files"].items())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_text_job_trains_and_saves_a_loadable_model(text_reference):
    assert_trained(*text_reference)


def test_the_worker_log_says_each_step_and_checkpoint_in_traind_lines_without_transformers_info(text_reference):
    spec, rc, events = text_reference
    log = Path(spec.log_path).read_text().splitlines()
    steps = [line for line in log if line.startswith("traind-worker: step ")]
    assert [line.split(" lr ")[0] for line in steps] == [
        f"traind-worker: step {e['step']}/{e['total_steps']} loss {e['loss']:.4f}" for e in of(events, "step")]
    assert [line for line in log if line.startswith("traind-worker: saved checkpoint")] == [
        f"traind-worker: saved checkpoint checkpoint-{e['step']} (complete)" for e in of(events, "checkpoint")]
    library = [line for line in log if line.strip() and not line.startswith("traind-worker: ") and "warn" not in line.lower()]
    assert library == [], library  # no config dumps, save paths or log dicts: only a warning would be more


def test_messages_job_trains_and_checkpoints_on_time(tmp_path, tiny_model_dir):
    data = write_demo_file(tmp_path / "chat.jsonl", 300, "messages", seed=2)
    # every_steps is out of reach: only the clock (0.25 s, steps >= 0.03 s) can make checkpoints here.
    spec = make_spec(tmp_path, tiny_model_dir, "messages", data, "chat",
                     checkpoint=dict(every_steps=10_000, every_minutes=0.25 / 60, keep=2), step_sleep_seconds=0.03)
    spec = dataclasses.replace(spec, training={**spec.training, "batch_size": 2})  # packed rows: steps enough
    rc, events = run_worker(spec)
    assert_trained(spec, rc, events)
    total = of(events, "job_start")[0]["total_steps"]
    timed = [e for e in of(events, "checkpoint") if e["step"] < total]
    # On time: never sooner than the interval after the last one. (Not "every other step": on a loaded machine a
    # single step can outlast 0.25 s, and then the clock rightly asks for the next one at once.)
    gaps = [b["time"] - a["time"] for a, b in zip(timed, timed[1:])]
    assert len(timed) >= 3 and min(gaps) >= 0.25 - 0.1, [(e["step"], e["time"]) for e in timed]


def test_sigterm_checkpoints_and_rerun_resumes_exactly(tmp_path, tiny_model_dir, text_data, text_reference):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "resume", step_sleep_seconds=0.05)

    def stop_mid_job(proc, event):
        if event["event"] == "step" and event["step"] == 13:
            proc.send_signal(signal.SIGTERM)

    rc, first = run_worker(spec, stop_mid_job)
    assert rc == protocol.EXIT_INTERRUPTED, Path(spec.log_path).read_text()[-3000:]
    end = first[-1]
    assert end["event"] == "job_end" and end["outcome"] == "interrupted" and end["step"] >= 13
    newest = checkpoints.newest_complete(spec.run_dir)
    assert newest is not None and newest[0] == end["step"]
    assert of(first, "checkpoint")[-1]["step"] == end["step"]

    # A newer checkpoint that was never marked complete (a save cut short) must be ignored, then removed.
    torn = Path(spec.run_dir) / "checkpoints" / "checkpoint-31"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 100)

    rc, second = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    assert of(second, "job_start")[0]["resumed_from_step"] == end["step"]
    assert not torn.exists()
    assert "reusing the tokenized cache" in Path(spec.log_path).read_text()

    reference = losses(text_reference[2])
    resumed = losses(second)
    assert sorted(resumed) == list(range(end["step"] + 1, max(reference) + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), f"step {step}"
    for step, loss in losses(first).items():  # and the interrupted run matched it up to the stop
        assert loss == pytest.approx(reference[step], abs=1e-5), f"step {step}"
    assert len(checkpoints.complete_checkpoints(spec.run_dir)) == CHECKPOINT["keep"]


# The eval suite as the daemon hands it over (engine/quality/suite.py): the job's own held-out lines, measured on the
# starting model before the first step and on the candidate at the end.
EVAL = {"holdout": {"fraction": 0.02, "min": 8, "max": 500, "seed": 3}, "sources": [], "baseline": {},
        "batch_size": 0, "every_steps": 0}


def test_two_ranks_killed_after_a_checkpoint_resume_to_the_weights_of_the_uninterrupted_run(tmp_path, tiny_model_dir):
    """Two ranks (gloo on this CPU) with the eval suite on: kill -9 of the worker group after checkpoint-4, a
    new attempt resumes from it and publishes bit-identical weights; every step's loss equals the whole run's."""
    data = write_demo_file(tmp_path / "text.jsonl", 200, "text", seed=1)  # 12 steps of two ranks

    def two_rank_spec(name: str, **hooks) -> protocol.JobSpec:
        spec = make_spec(tmp_path, tiny_model_dir, "text", data, name, checkpoint=dict(every_steps=4, keep=2),
                         **hooks)
        return dataclasses.replace(spec, eval=EVAL)

    whole = two_rank_spec("whole")
    rc, reference = run_worker(whole, processes=2)
    assert rc == protocol.EXIT_DONE, Path(whole.log_path).read_text()[-3000:]

    def kill_group(proc, event):
        if event["event"] == "step" and event["step"] == 6:
            os.killpg(proc.pid, signal.SIGKILL)

    spec = two_rank_spec("killed", step_sleep_seconds=0.05)
    rc, first = run_worker(spec, kill_group, processes=2)
    assert rc == -signal.SIGKILL
    # The starting model's figures lost as well: the resumed model is checkpoint-4's, never measured in its place.
    (Path(spec.run_dir) / EVAL_BEFORE).unlink()
    rc, second = run_worker(spec, processes=2)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    assert of(second, "job_start")[0]["resumed_from_step"] == 4

    whole_losses, resumed = losses(reference), losses(second)
    assert sorted(resumed) == list(range(5, max(whole_losses) + 1))
    assert {s: whole_losses[s] for s in resumed} == resumed
    assert {s: whole_losses[s] for s in losses(first)} == losses(first)
    weights = "model.safetensors"
    assert (Path(spec.model_out) / weights).read_bytes() == (Path(whole.model_out) / weights).read_bytes()
    # The starting model was measured by the first attempt only; both candidates measure the same.
    assert [e["phase"] for e in of(first + second, "eval")] == ["before", "after"]
    assert of(second, "eval")[0]["loss"] == of(reference, "eval")[-1]["loss"]
    assert json.loads((Path(spec.run_dir) / "eval.json").read_text())["sources"]["killed"]["before"] is None
    assert "no figures of the starting model for killed" in Path(spec.log_path).read_text()


def test_two_ranks_train_one_model_whether_or_not_the_starting_model_is_evaluated_first(tmp_path, tiny_model_dir):
    """The eval suite measures the starting model before the first step; with two ranks that must leave them
    training one model together (DDP), so the run is the same step for step as one with no evaluation."""
    data = write_demo_file(tmp_path / "text.jsonl", 200, "text", seed=1)
    source = write_demo_file(tmp_path / "earlier.jsonl", 40, "text", seed=2)
    plain = make_spec(tmp_path, tiny_model_dir, "text", data, "plain")
    family = {}

    def note_family(proc, event):  # rank 0, the ranks' server, and the agent that started it
        if event["event"] == "ready":
            server = parent_of(event["pid"])
            family.update(agent=proc.pid, server=server, servers_parent=parent_of(server),
                          same_program=cmdline(server) == cmdline(proc.pid))

    rc, unevaluated = run_worker(plain, note_family, processes=2)
    assert rc == protocol.EXIT_DONE, Path(plain.log_path).read_text()[-3000:]
    # The ranks' server was forked from the agent, which has torch imported: no new python imported it again.
    assert family["servers_parent"] == family["agent"] and family["same_program"], family
    spec = dataclasses.replace(make_spec(tmp_path, tiny_model_dir, "text", data, "evaluated"),
                               eval=eval_suite(source, 40))
    rc, evaluated = run_worker(spec, processes=2)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    assert [(e["source"], e["phase"]) for e in of(evaluated, "eval")] == [("earlier", "before"), ("earlier", "after")]
    assert losses(evaluated) == losses(unevaluated)
    weights = "model.safetensors"
    assert (Path(spec.model_out) / weights).read_bytes() == (Path(plain.model_out) / weights).read_bytes()


def test_unusable_file_fails_with_a_clear_error(tmp_path, tiny_model_dir):
    data = tmp_path / "long-prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "7+8=" * 40, "completion": "15"}) + "\n" for _ in range(5)))
    spec = make_spec(tmp_path, tiny_model_dir, "prompt_completion", data, "bad")
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_FAILED
    assert "no usable examples" in of(events, "error")[0]["message"]
    assert "Traceback" in Path(spec.log_path).read_text()
    assert not Path(spec.model_out).exists()


def test_sigterm_while_waiting_for_a_job_exits_interrupted_promptly(tmp_path, tiny_model_dir, text_data):
    r, w = os.pipe()
    proc = start_worker(w)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        assert protocol.parse_event(pipe.readline())["event"] == "ready"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == protocol.EXIT_INTERRUPTED
    proc.stdin.close()
    assert time.monotonic() - t0 < 5


# --- data: loss masks (no Trainer) --------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


def test_prompt_completion_loss_is_on_the_completion_only(tokenizer):
    from engine.worker import data

    [(ids, mask)] = data.encode_records([{"prompt": "17+25=", "completion": "42"}], "prompt_completion", tokenizer, 64)
    assert trained_text(tokenizer, ids, mask) == "42" + tokenizer.eos_token
    assert tokenizer.decode([i for i, m in zip(ids, mask) if not m]) == "17+25="

    batch = data.Collator(tokenizer.pad_token_id)([{"input_ids": ids, "loss_mask": mask},
                                                    {"input_ids": ids[:3], "loss_mask": mask[:3]}])
    labels = batch["labels"].tolist()
    assert labels[0] == [i if m else -100 for i, m in zip(ids, mask)]
    assert labels[1] == [-100] * len(ids)  # prompt tokens and padding
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * (len(ids) - 3)


def test_messages_loss_is_on_assistant_turns_only(tokenizer):
    from engine.worker import data

    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2="},
                    {"role": "assistant", "content": "3"}, {"role": "user", "content": "reverse ab:"},
                    {"role": "assistant", "content": "ba"}]
    [(ids, mask)] = data.encode_records([{"messages": conversation}], "messages", tokenizer, 64)
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, ids, mask) == f"3{eos}ba{eos}"
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    for text in ("be brief", "1+2=", "reverse ab:", "<|user|>", "<|system|>"):
        assert text in untrained

    # Cut to a length that leaves no assistant token: the example is skipped, not trained on its prompt.
    assert data.encode_records([{"messages": conversation[:3]}], "messages", tokenizer, 8) == []


def test_cross_document_text_is_cut_into_full_blocks_and_the_cache_is_served_by_index(tmp_path, tokenizer):
    from engine.worker import data

    src = write_demo_file(tmp_path / "t.jsonl", 50, "text", seed=5)
    meta = data.build_cache(src, "text", tokenizer, 32, tmp_path / "cache", log=lambda m: None, cross_document=True)
    ds = data.TokenDataset(tmp_path / "cache")
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert len(ds) == meta["examples"] and sum(lengths) == meta["tokens"]
    assert set(lengths[:-1]) == {32} and 2 <= lengths[-1] <= 32
    joined = tokenizer.decode([t for i in range(len(ds)) for t in ds[i]["input_ids"].tolist()])
    first = json.loads(src.read_text().splitlines()[0])["text"]
    assert joined.startswith(first + tokenizer.eos_token)
    with pytest.raises(data.DataError, match="no usable examples"):
        empty = tmp_path / "empty.jsonl"
        empty.write_text(json.dumps({"prompt": "x" * 200, "completion": "y"}) + "\n")
        data.build_cache(empty, "prompt_completion", tokenizer, 8, tmp_path / "cache2", log=lambda m: None)


# --- checkpoints: only complete ones count (no torch) -----------------------------------------


def test_only_marked_checkpoints_with_intact_files_are_complete(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * step)
    for step in (10, 20, 30):
        checkpoints.write_marker(root / f"checkpoint-{step}", {"step": step})
    (root / "checkpoint-30" / "model.safetensors").write_bytes(b"x")  # truncated after it was marked
    assert [s for s, _ in checkpoints.complete_checkpoints(tmp_path)] == [10, 20]
    assert checkpoints.newest_complete(tmp_path)[0] == 20
    assert [s for s, _ in checkpoints.incomplete_checkpoints(tmp_path)] == [30, 40]

    removed = checkpoints.rotate(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == ["checkpoint-10"]  # 30 and 40 are newer: may be in progress
    assert checkpoints.remove_incomplete(tmp_path) and checkpoints.newest_complete(tmp_path)[0] == 20
    assert sorted(os.listdir(root)) == ["checkpoint-20"]
