"""Padding-free packing: the row plan, what a packed row computes, and jobs that train on packed rows.

The central claim is that packing changes speed, not what is learned: a packed
row's per-token losses equal those of its examples run one by one (sdpa and
eager, fp32), because positions restart and no example attends to another.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budget import examples
from engine.core import protocol
from engine.store import checkpoints
from engine.data.demo_data import write_demo_file
from engine.worker import packing
from worker_runs import TRAINING, losses, make_spec, of, run_worker


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- the row plan (no model) --------------------------------------------------------------------


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=300), st.integers(0, 3))
def test_every_example_is_in_exactly_one_row_and_no_row_is_over_capacity(lengths, seed):
    offsets, items = packing.plan_rows(np.array(lengths), 64, seed)
    assert sorted(items.tolist()) == list(range(len(lengths)))
    rows = [items[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    assert all(len(r) and sum(lengths[i] for i in r) <= 64 for r in rows)
    # Best fit decreasing never opens a row that an earlier one could still have taken whole: at most one row
    # is at most half full (two such rows would have fitted together).
    assert sum(sum(lengths[i] for i in r) <= 32 for r in rows) <= 1


def test_the_plan_is_the_same_for_the_same_seed_and_fills_rows_well():
    lengths = np.random.default_rng(0).lognormal(np.log(200), 0.8, 5000).clip(2, 1024).astype(np.int64)
    a, b = packing.plan_rows(lengths, 1024, 7), packing.plan_rows(lengths, 1024, 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other = packing.plan_rows(lengths, 1024, 8)
    assert not np.array_equal(a[1], other[1])  # equal lengths are grouped another way for another seed
    rows = len(a[0]) - 1
    assert lengths.sum() / (rows * 1024) > 0.97  # lognormal chat lengths leave under 3% of a row empty


def test_the_row_plan_is_stored_with_the_cache_and_made_again_when_the_examples_change(tmp_path, tokenizer):
    from engine.worker import data

    src = write_demo_file(tmp_path / "c.jsonl", 200, "messages", seed=4)
    data.build_cache(src, "messages", tokenizer, 64, tmp_path / "cache", log=lambda m: None)
    said = []
    first = packing.row_plan(data.TokenDataset(tmp_path / "cache"), tmp_path / "cache", 64, 3, said.append)
    again = packing.row_plan(data.TokenDataset(tmp_path / "cache"), tmp_path / "cache", 64, 3, said.append)
    assert "plan made" in said[0] and "plan stored" in said[1]
    assert np.array_equal(first.items, again.items) and np.array_equal(first.offsets, again.offsets)
    fewer = packing.row_plan(data.TokenDataset(tmp_path / "cache", limit=150), tmp_path / "cache", 64, 3, said.append)
    assert "plan made" in said[2] and fewer.example_count() == 150
    # A damaged plan is made again, not trusted.
    (tmp_path / "cache" / "rows.bin").write_bytes(b"\0" * 8)
    packing.row_plan(data.TokenDataset(tmp_path / "cache", limit=150), tmp_path / "cache", 64, 3, said.append)
    assert "plan made" in said[3]


# --- a packed row computes what its examples compute alone ----------------------------------------


def _examples(tokenizer, tmp_path: Path) -> list[tuple[list[int], list[int]]]:
    from engine.worker import data

    chats = [json.loads(line) for line in write_demo_file(tmp_path / "c.jsonl", 8, "messages", seed=9).open()]
    texts = [json.loads(line) for line in write_demo_file(tmp_path / "t.jsonl", 4, "text", seed=9).open()]
    pairs = [json.loads(line) for line in write_demo_file(tmp_path / "p.jsonl", 4, "prompt_completion", seed=9).open()]
    return (data.encode_records(chats, "messages", tokenizer, 64) + data.encode_records(texts, "text", tokenizer, 64)
            + data.encode_records(pairs, "prompt_completion", tokenizer, 64))


def _per_token_losses(model, batch):
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             reduction="none").view(logits.shape[0], -1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_gives_each_example_the_losses_it_has_alone(tmp_path, tiny_model_dir, tokenizer, attn):
    import torch
    from transformers import AutoModelForCausalLM

    from engine.worker import data

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False  # as the Trainer sets it (args.use_cache)
    model.eval()
    examples = _examples(tokenizer, tmp_path)
    feats = [{"input_ids": np.array(ids), "loss_mask": np.array(mask, np.uint8)} for ids, mask in examples]
    offsets, items = packing.plan_rows(np.array([len(f["input_ids"]) for f in feats]), 160, seed=1)
    rows = packing.PackedDataset(feats, offsets, items, 160)
    assert len(rows) < len(feats) / 2  # several examples a row: the claim is tested where it matters
    collator = packing.PackedCollator(tokenizer.pad_token_id)
    batch = collator([rows[r] for r in range(len(rows))])
    assert "attention_mask" not in batch
    worst = 0.0
    with torch.no_grad():
        packed = _per_token_losses(model, batch)
        for r in range(len(rows)):
            start = 0
            for i in items[offsets[r]: offsets[r + 1]]:
                alone = data.Collator(tokenizer.pad_token_id)([feats[i]])
                own = _per_token_losses(model, alone)[0]
                n = len(feats[i]["input_ids"])
                # packed[r, start + k] predicts token start + k + 1: the example's own tokens 1..n-1
                got = packed[r, start: start + n - 1]
                assert torch.equal(got == 0, own == 0), "the same tokens are trained"
                worst = max(worst, (got - own).abs().max().item())
                start += n
            assert (packed[r, start - 1:] == 0).all()  # nothing after the row's last example is a target
    assert worst < 1e-5, worst
    # Every trained token of the batch is counted once, and padding is not counted as a real token.
    trained = sum(int(np.sum(f["loss_mask"][1:])) for f in feats)
    assert int((batch["labels"] != -100).sum()) == trained
    assert int(packing.real_tokens(batch)) == sum(len(f["input_ids"]) for f in feats)


def test_flash_attention_input_is_one_sequence_with_its_boundaries(tokenizer, tmp_path):
    feats = [{"input_ids": np.array(ids), "loss_mask": np.array(mask, np.uint8)}
             for ids, mask in _examples(tokenizer, tmp_path)[:6]]
    lengths = [len(f["input_ids"]) for f in feats]
    rows = packing.PackedDataset(feats, np.array([0, 3, 6]), np.arange(6), 256)
    batch = packing.PackedCollator(tokenizer.pad_token_id, flash=True)([rows[0], rows[1]])
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    assert batch["cu_seq_lens_q"].tolist() == np.cumsum([0, *lengths]).tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    assert batch["position_ids"][0, : lengths[0] + 1].tolist() == [*range(lengths[0]), 0]


def test_text_documents_keep_their_own_positions_unless_cross_document(tokenizer):
    from engine.worker import data

    docs = [{"text": "alpha beta gamma"}, {"text": "delta " * 40}, {"text": "epsilon"}]
    apart = data.encode_records(docs, "text", tokenizer, 32)
    eos = tokenizer.eos_token_id
    assert [ids[-1] for ids, _ in apart][0] == eos and all(len(ids) <= 32 for ids, _ in apart)
    whole = [t for ids, _ in apart for t in ids]
    joined = data.encode_records(docs, "text", tokenizer, 32, cross_document=True)
    assert whole == [t for ids, _ in joined for t in ids]  # the same tokens, none lost: a long document is split, not cut
    assert len(apart) > len(joined) and all(len(ids) == 32 for ids, _ in joined[:-1])
    row = packing.PackedDataset([{"input_ids": np.array(i), "loss_mask": np.array(m, np.uint8)} for i, m in apart],
                                np.array([0, len(apart)]), np.arange(len(apart)), 10**6)[0]
    batch = packing.PackedCollator(tokenizer.pad_token_id)([row])
    assert (batch["position_ids"][0] == 0).sum() == len(apart)  # positions restart at every document (piece)


# --- jobs on packed rows (the real worker) ------------------------------------------------------


@pytest.mark.e2e
def test_kill_9_with_packing_resumes_on_the_same_rows_loss_for_loss(tmp_path, tiny_model_dir):
    chats = write_demo_file(tmp_path / "chat.jsonl", 600, "messages", seed=6)
    reference = make_spec(tmp_path, tiny_model_dir, "messages", chats, "ref")
    rc, ref_events = run_worker(reference)
    assert rc == protocol.EXIT_DONE, Path(reference.log_path).read_text()[-3000:]
    start = of(ref_events, "job_start")[0]
    assert start["rows"] < start["examples"] / 2  # packed: several conversations a row
    assert f"packing: {start['examples']} examples in {start['rows']} rows" in Path(reference.log_path).read_text()

    spec = make_spec(tmp_path, tiny_model_dir, "messages", chats, "killed", step_sleep_seconds=0.05)

    def kill_after_a_checkpoint(proc, event):
        if event["event"] == "checkpoint" and event["step"] >= 10:
            proc.send_signal(signal.SIGKILL)

    rc, first = run_worker(spec, kill_after_a_checkpoint)
    assert rc == -signal.SIGKILL
    saved = checkpoints.newest_complete(spec.run_dir)[0]
    rc, second = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    assert of(second, "job_start")[0]["resumed_from_step"] == saved
    assert "plan stored" in Path(spec.log_path).read_text()
    expected = losses(ref_events)
    resumed = losses(second)
    assert sorted(resumed) == list(range(saved + 1, max(expected) + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    # Tokens seen count every real token once: the whole file's tokens by the end of the uninterrupted run.
    tokens = of(ref_events, "job_start")[0]["tokens"]
    assert of(ref_events, "step")[-1]["tokens_seen"] == tokens


@pytest.mark.e2e
def test_packing_off_trains_each_example_in_its_own_padded_row(tmp_path, tiny_model_dir):
    chats = write_demo_file(tmp_path / "chat.jsonl", 120, "messages", seed=6)
    spec = make_spec(tmp_path, tiny_model_dir, "messages", chats, "padded")
    spec = dataclasses.replace(spec, training={**TRAINING, "packing": False})
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    start = of(events, "job_start")[0]
    assert start["rows"] is None and start["total_steps"] == -(-start["examples"] // TRAINING["batch_size"])
    assert "packing:" not in Path(spec.log_path).read_text()
