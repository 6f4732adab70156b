"""Replay: the pool of earlier files' training examples, its bound, and the mixed dataset a job trains on.

The worker's sample and mix run with the real tokenizer (and, for resume, the real worker and tiny model); the
pool's bound is checked on a stream of 50 small files, each sample written by the worker's own code.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from engine.quality import replay, suite
from engine.store import jobs
from engine.core.config import Config, EvalConfig, ReplayConfig
from engine.data.demo_data import write_demo_file
from worker_runs import losses, make_spec, of, run_worker
from workspaces import make_workspace

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def cached(tmp: Path, tokenizer, name: str, lines: int, seed: int, holdout: dict | None = None):
    from engine.worker import data

    path = write_demo_file(tmp / f"{name}.jsonl", lines, "prompt_completion", seed=seed)
    data.build_cache(path, "prompt_completion", tokenizer, 64, tmp / name / "data", log=lambda _m: None,
                     holdout=holdout, holdout_out=tmp / name / "holdout.jsonl")
    return data.TokenDataset(tmp / name / "data")


def sample(own, folder: Path, tokenizer, tokens: int, job_id: str):
    from engine.worker import data
    from engine.worker import replay as worker_replay

    return worker_replay.write_sample(own, folder, tokens, 3, job_id, data.tokenizer_fingerprint(tokenizer), 64,
                                      lambda _m: None)


def examples(folder: Path, n: int) -> list[tuple]:
    from engine.worker import data

    ds = data.TokenDataset(folder, limit=n)
    return [tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds))]


def test_a_sample_is_a_seeded_uniform_prefix_and_cutting_it_keeps_a_prefix(tmp_path, tokenizer):
    own = cached(tmp_path, tokenizer, "a", 300, seed=1)
    every = Counter(tuple(own[i]["input_ids"].tolist()) for i in range(len(own)))
    meta = sample(own, tmp_path / "s1", tokenizer, 2000, "00001-a")
    assert 0 < meta["tokens"] <= 2000 and meta["examples"] < len(own)
    first = examples(tmp_path / "s1", meta["examples"])
    assert not Counter(first) - every, "training examples of the file, none twice"
    assert examples(tmp_path / "s1", meta["examples"]) == first  # read again: the same
    again = sample(own, tmp_path / "s2", tokenizer, 2000, "00001-a")
    assert examples(tmp_path / "s2", again["examples"]) == first, "the same seed and job: the same sample"

    # The daemon cuts it to a share: what stays is the sample's own beginning, within the share.
    cut = replay._cut(tmp_path / "s1", meta, 700)
    assert cut["tokens"] <= 700 and 0 < cut["examples"] < meta["examples"]
    assert examples(tmp_path / "s1", cut["examples"]) == first[: cut["examples"]]
    assert (tmp_path / "s1" / "tokens.bin").stat().st_size == cut["tokens"] * 4
    assert json.loads((tmp_path / "s1" / "meta.json").read_text())["examples"] == cut["examples"]


def test_the_mix_draws_the_fraction_from_the_pool_the_same_way_every_time(tmp_path, tokenizer):
    from engine.worker import data
    from engine.worker import replay as worker_replay

    sources = []
    for n, name in enumerate(("00001-a", "00002-b")):
        own = cached(tmp_path, tokenizer, name, 200, seed=n)
        meta = sample(own, tmp_path / "pool" / name, tokenizer, 10**9, name)
        sources.append({"name": name, "path": str(tmp_path / "pool" / name), "examples": meta["examples"]})
    own = cached(tmp_path, tokenizer, "00003-c", 300, seed=7)
    plan = {"fraction": 0.3, "seed": 3, "sources": sources}
    fingerprint = data.tokenizer_fingerprint(tokenizer)
    mixed, info = worker_replay.mix(own, plan, fingerprint, 64, "00003-c", lambda _m: None)
    assert info["examples"] == round(len(own) * 0.3 / 0.7) == len(mixed) - len(own)
    assert set(info["sources"]) == {"00001-a", "00002-b"} and sum(info["sources"].values()) == info["examples"]
    pooled = Counter(tuple(x) for s in sources for x in examples(Path(s["path"]), s["examples"]))
    replayed = [tuple(mixed[i]["input_ids"].tolist()) for i in range(len(own), len(mixed))]
    assert not Counter(replayed) - pooled, "examples of the pool, none twice"
    again, _ = worker_replay.mix(own, plan, fingerprint, 64, "00003-c", lambda _m: None)
    assert [tuple(again[i]["input_ids"].tolist()) for i in range(len(again))] == \
        [tuple(mixed[i]["input_ids"].tolist()) for i in range(len(mixed))]
    # A pool smaller than the fraction asks for: all of it, once each.
    small = {**plan, "sources": [{**sources[0], "examples": 5}]}
    _, info = worker_replay.mix(own, small, fingerprint, 64, "00003-c", lambda _m: None)
    assert info["examples"] == 5 and info["wanted"] > 5


def test_fifty_small_files_keep_the_pool_and_the_suite_within_their_caps(tmp_path, tokenizer):
    """Each file's sample and held-out lines, as its job leaves them; the pool and the suite stay bounded."""
    ws = make_workspace(tmp_path / "ws")
    config = dataclasses.replace(Config(), replay=ReplayConfig(max_pool_tokens=20_000),
                                 eval=EvalConfig(per_source_examples=20, max_suite_examples=300))
    holdout = {"fraction": 0.05, "min": 4, "max": 20, "seed": 3}
    totals = []
    for n in range(1, 51):
        job_id = f"{n:05d}-f{n}"
        run_dir = ws.run_dir(job_id)
        run_dir.mkdir()
        own = cached(run_dir, tokenizer, "x", 60, seed=n, holdout=holdout)
        (run_dir / "holdout.jsonl").write_bytes((run_dir / "x" / "holdout.jsonl").read_bytes())
        (run_dir / "job.json").write_text(json.dumps({"id": job_id, "original_name": f"f{n}.jsonl", "state": "done",
                                                      "attempts": [], "format": "prompt_completion"}))
        (ws.queue("done") / f"{job_id}.jsonl").write_text("{}\n")
        plan = {"sample_tokens": replay.share(config, len(replay.pooled(ws)) + 1)}
        sample(own, run_dir / replay.SAMPLE, tokenizer, plan["sample_tokens"], job_id)
        replay.add(ws, config, job_id)
        totals.append(replay.summary(ws)["tokens"])
        assert sum(p.stat().st_size for p in ws.replay.rglob("tokens.bin")) == totals[-1] * 4  # cut on disk too
    assert max(totals) <= 20_000 and replay.summary(ws)["sources"] == 50
    assert min(m["examples"] for _, _, m in replay.pooled(ws)) > 0, "every file keeps a part"
    found, _ = suite.sources(ws, config)
    assert len(found) == 50 and sum(s["lines"] for s in found) <= 300


def test_a_job_plan_is_fixed_at_its_first_attempt(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    ws.run_dir("00001-a").mkdir(parents=True)
    job = jobs.Job(ws, "00001-a", {"id": "00001-a", "original_name": "a.jsonl", "state": "active", "attempts": []})
    first = replay.plan(ws, Config(), job)
    assert first["fraction"] == 0.05 and first["sources"] == []
    later = dataclasses.replace(Config(), replay=ReplayConfig(fraction=0.5))
    again = jobs.Job(ws, "00001-a", json.loads(job.record_path.read_text()))  # the record as the next attempt reads it
    assert replay.plan(ws, later, again) == first, "a changed config applies from the next file"


def test_a_replayed_job_resumes_at_the_exact_data_position(tmp_path, tiny_model_dir, tokenizer):
    earlier = cached(tmp_path, tokenizer, "00001-a", 200, seed=1)
    meta = sample(earlier, tmp_path / "pool" / "00001-a", tokenizer, 10**9, "00001-a")
    plan = {"fraction": 0.25, "seed": 3, "sample_tokens": 10**9,
            "sources": [{"name": "00001-a", "path": str(tmp_path / "pool" / "00001-a"), "examples": meta["examples"]}]}
    data_file = write_demo_file(tmp_path / "b.jsonl", 160, "prompt_completion", seed=5)

    def spec(name: str, **hooks):
        made = make_spec(tmp_path, tiny_model_dir, "prompt_completion", data_file, name, **hooks)
        return dataclasses.replace(made, job_id="00002-b", replay=plan)  # one job id: one mix

    reference = spec("reference")
    rc, whole = run_worker(reference)
    assert rc == 0, Path(reference.log_path).read_text()[-3000:]
    start = of(whole, "job_start")[0]
    assert start["replay"]["examples"] > 0 and start["replay"]["sources"] == {"00001-a": start["replay"]["examples"]}
    own = json.loads((Path(reference.run_dir) / "replay" / "meta.json").read_text())
    assert own["examples"] > 0, "the job left its own sample for the pool"

    resumed = spec("resumed", step_sleep_seconds=0.05)

    def stop_mid_job(proc, event):
        if event["event"] == "step" and event["step"] == 7:
            proc.send_signal(signal.SIGTERM)

    rc, first = run_worker(resumed, stop_mid_job)
    stopped = first[-1]["step"]
    rc, second = run_worker(resumed)
    assert rc == 0 and of(second, "job_start")[0]["resumed_from_step"] == stopped
    expected = losses(whole)
    for step, loss in losses(second).items():
        assert loss == pytest.approx(expected[step], abs=1e-5), f"step {step}"


def test_status_says_what_a_job_replays():
    from engine.api import status

    queue = dict.fromkeys(("inbox", "pending", "active", "done", "held", "failed", "rejected"), 0)
    job = {"id": "00003-c", "original_name": "c.jsonl", "phase": "training", "attempt": 1,
           "replay": {"examples": 120, "sources": {"00001-a": 70, "00002-b": 50}}}
    text = status.render({"workspace": "/ws", "daemon": {"state": "offline"}, "job": job, "queue": queue}, [])
    assert "replay     120 earlier examples from 2 file(s) (00001-a 70, 00002-b 50)" in text
