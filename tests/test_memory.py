"""The GPU memory estimate (engine/ops/memory.py): parameter counts against transformers' own models, the bytes
against the tensors a real model saves for backward, and the daemon's preflight message when a job will not fit."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from engine.ops import memory
from engine.supervisor import preflight

GiB = 2**30
LLAMA_7B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000,
                num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
SHAPES = {
    "llama-7b": LLAMA_7B,
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                       vocab_size=32000, num_attention_heads=32, num_key_value_heads=8),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                       vocab_size=151936, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                       vocab_size=151936, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True),
}


def model_dir(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_safetensors_header(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file whose header names these bf16 tensors (the data is zeros)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


# -- parameters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_the_parameter_count_is_transformers_own(name):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: a 7B model in a tenth of a second
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPES[name]))
    assert memory.shape_from_config(SHAPES[name]).parameters == sum(p.numel() for p in model.parameters())


def test_an_unfamiliar_model_is_counted_from_its_safetensors_headers(tmp_path):
    config = dict(model_type="somethingnew", hidden_size=64, num_hidden_layers=2, vocab_size=100)
    d = model_dir(tmp_path / "m", config)
    assert memory.shape_from_config(config) is None  # its layout is not one we know
    write_safetensors_header(d / "model-00001-of-00002.safetensors", {"embed": [100, 64], "w1": [64, 256]})
    write_safetensors_header(d / "model-00002-of-00002.safetensors", {"w2": [256, 64], "head": [64, 100]})
    shape = memory.shape_of(str(d))
    assert shape.parameters == 100 * 64 + 64 * 256 + 256 * 64 + 64 * 100
    assert shape.hidden == 64 and shape.layers == 2 and shape.intermediate == 4 * 64  # the usual MLP width


def test_an_adapter_version_is_measured_by_its_base(tmp_path):
    base = model_dir(tmp_path / "base", LLAMA_7B)
    adapter = tmp_path / "models" / "00003-job"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 16}))
    assert memory.shape_of(str(adapter)).parameters == 6_738_415_616


def test_a_model_whose_files_say_nothing_gets_no_estimate(tmp_path):
    assert memory.shape_of(str(tmp_path / "missing")) is None
    assert memory.shape_of(str(model_dir(tmp_path / "empty", {}))) is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert memory.shape_of(str(tmp_path / "bad")) is None
    assert memory.estimate_job(str(tmp_path / "bad"), {}, None, "bf16") is None


def test_lora_trains_what_peft_trains():
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=176, vocab_size=300,
                  num_attention_heads=4, num_key_value_heads=2)
    shape = memory.shape_from_config(config)
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        model = peft.get_peft_model(LlamaForCausalLM(LlamaConfig(**config)),
                                    peft.LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert memory.estimate(shape, method="lora", lora_r=8, target_modules=targets).trainable == trained, targets


# -- bytes ----------------------------------------------------------------------------------------------


def test_full_fine_tuning_a_7b_model_needs_over_100_gib_and_adapters_far_less():
    shape = memory.shape_from_config(LLAMA_7B)
    full = memory.estimate(shape, precision="fp32", batch_size=1, seq_length=256)
    # fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter before any activation
    assert full.weights + full.gradients + full.optimizer == 16 * shape.parameters
    assert full.total > 100 * GiB
    lora = memory.estimate(shape, method="lora", precision="bf16", batch_size=1, seq_length=256)
    qlora = memory.estimate(shape, method="qlora", precision="bf16", batch_size=1, seq_length=256)
    assert 13 * GiB < lora.total < 20 * GiB  # the bf16 base (12.6 GiB) dominates
    assert qlora.total < 8 * GiB and qlora.weights < lora.weights / 2.5  # embeddings and head stay fp32
    assert lora.trainable < shape.parameters / 100


def test_each_knob_moves_the_estimate_the_way_it_should():
    shape = memory.shape_from_config(LLAMA_7B)
    base = memory.estimate(shape, method="lora", batch_size=8, seq_length=1024)
    checkpointed = memory.estimate(shape, method="lora", batch_size=8, seq_length=1024, gradient_checkpointing=True)
    assert checkpointed.activations < base.activations / 5
    smaller = memory.estimate(shape, method="lora", batch_size=2, seq_length=1024)
    assert smaller.activations == base.activations // 4
    eager = memory.estimate(shape, method="lora", batch_size=8, seq_length=1024, attn_implementation="eager")
    assert eager.activations > base.activations  # the heads x s x s scores are kept
    full = memory.estimate(shape, batch_size=1, seq_length=256)
    eight_bit = memory.estimate(shape, batch_size=1, seq_length=256, optim="adamw_8bit")
    assert eight_bit.optimizer == full.optimizer // 4 and eight_bit.step_temporaries == 0
    assert "GiB" in full.describe() and "full, 6.7B parameters" in full.describe()


def test_a_job_estimate_reads_traind_toml_sections_as_dicts(tmp_path):
    d = model_dir(tmp_path / "m", LLAMA_7B)
    training = {"batch_size": 4, "max_seq_length": 512, "gradient_checkpointing": True, "optim": "adamw_torch"}
    e = memory.estimate_job(str(d), training, {"method": "lora", "r": 8, "target_modules": ["q_proj"]}, "bf16")
    assert (e.method, e.batch_size, e.seq_length) == ("lora", 4, 512)
    assert e.trainable == 32 * 8 * (4096 + 4096)
    assert memory.estimate_job(str(d), training, None, "bf16").method == "full"  # no [adapter] section


@pytest.mark.parametrize("precision, attn, base", [("fp32", "sdpa", "fp32"), ("bf16", "sdpa", "fp32"),
                                                   ("bf16", "sdpa", "bf16"), ("bf16", "eager", "fp32")])
def test_activations_match_what_a_real_model_saves_for_backward(precision, attn, base):
    """Every tensor autograd keeps from a forward pass of transformers' Llama, counted with saved-tensor hooks,
    against the estimate's activations, weight copies and the log-softmax the loss keeps (the forward's share)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(model_type="llama", hidden_size=256, num_hidden_layers=4, intermediate_size=688, vocab_size=1000,
                  num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation=attn))
    if base == "bf16":
        model = model.to(torch.bfloat16)
    b, s = 4, 128
    ids = torch.randint(0, 1000, (b, s))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(input_ids=ids, labels=ids)
    e = memory.estimate(memory.shape_from_config(config), method="full" if base == "fp32" else "lora",
                        precision=precision, batch_size=b, seq_length=s, attn_implementation=attn)
    estimated = e.activations + e.weight_copies + b * s * 1000 * 4
    assert estimated == pytest.approx(sum(saved.values()), rel=0.1)


# -- the daemon's preflight -------------------------------------------------------------------------------


def gpu_sample(free: int, worker: int = 0, devices: int = 1) -> dict:
    """What GpuMonitor.sample() returns, for devices with `free` bytes free."""
    return {"mode": "gpu", "reason": None, "devices": [
        {"index": i, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{i}", "memory_total": 80 * GiB,
         "memory_used": 80 * GiB - free, "memory_free": free, "utilization_percent": 0, "temperature_c": 30,
         "power_w": 70.0, "power_limit_w": 700.0, "worker_memory": worker, "error": None} for i in range(devices)]}


TRAINING = {"batch_size": 8, "max_seq_length": 256, "precision": "auto", "auto_batch": False,
            "gradient_checkpointing": False, "optim": "adamw_torch", "attn_implementation": "auto", "processes": 1}


def test_a_full_fine_tune_that_cannot_fit_blocks_with_what_to_try(tmp_path):
    d = str(model_dir(tmp_path / "m", LLAMA_7B))
    problem = preflight.gpu_memory_problem(d, TRAINING, None, gpu_sample(free=70 * GiB))
    assert problem.startswith("GPU memory: needs about 1")  # over a hundred GiB
    assert ", GPU 0 has 70.0 GiB free: try adapter.method = lora, training.gradient_checkpointing = true or a " \
           "smaller training.batch_size (estimate about " in problem
    assert "optimizer 50.2 GiB" in problem  # the parts say why


def test_the_same_job_as_lora_fits_and_a_warm_workers_memory_counts_as_free(tmp_path):
    d = str(model_dir(tmp_path / "m", LLAMA_7B))
    lora = {"method": "lora", "r": 16, "target_modules": "all-linear", "dropout": 0.05}
    assert preflight.gpu_memory_problem(d, TRAINING, lora, gpu_sample(free=70 * GiB)) is None
    assert preflight.gpu_memory_problem(d, TRAINING, lora, gpu_sample(free=10 * GiB)) is not None
    assert preflight.gpu_memory_problem(d, TRAINING, lora, gpu_sample(free=10 * GiB, worker=60 * GiB)) is None


def test_suggestions_leave_out_what_is_already_set(tmp_path):
    d = str(model_dir(tmp_path / "m", LLAMA_7B))
    training = dict(TRAINING, gradient_checkpointing=True, batch_size=1)
    problem = preflight.gpu_memory_problem(d, training, {"method": "lora"}, gpu_sample(free=5 * GiB))
    assert "try adapter.method = qlora or a smaller training.max_seq_length (" in problem


def test_with_auto_batch_a_job_that_fits_at_a_smaller_batch_starts(tmp_path):
    d = str(model_dir(tmp_path / "m", LLAMA_7B))
    lora = {"method": "lora"}
    training = dict(TRAINING, batch_size=64, max_seq_length=2048)
    assert preflight.gpu_memory_problem(d, training, lora, gpu_sample(free=40 * GiB)) is not None
    # the CUDA OOM retries halve the micro-batch: the job may start, and they find the batch that fits
    assert preflight.gpu_memory_problem(d, dict(training, auto_batch=True), lora, gpu_sample(free=40 * GiB)) is None
    problem = preflight.gpu_memory_problem(d, dict(training, auto_batch=True), lora, gpu_sample(free=8 * GiB))
    assert "even at batch_size 1 (as far as training.auto_batch would go)" in problem


def test_several_processes_need_room_on_each_gpu_they_use(tmp_path):
    d = str(model_dir(tmp_path / "m", SHAPES["qwen2-0.5b"]))
    sample = gpu_sample(free=40 * GiB, devices=3)
    sample["devices"][1]["memory_free"] = 2 * GiB
    assert preflight.gpu_memory_problem(d, TRAINING, None, sample) is None  # one process: GPU 0 only
    problem = preflight.gpu_memory_problem(d, dict(TRAINING, processes=2), None, sample)
    assert ", GPU 1 has 2.0 GiB free" in problem


def test_cpu_mode_or_an_unknown_model_checks_nothing(tmp_path):
    d = str(model_dir(tmp_path / "m", LLAMA_7B))
    assert preflight.gpu_memory_problem(d, TRAINING, None, {"mode": "cpu", "reason": "no NVIDIA driver", "devices": []}) is None
    assert preflight.gpu_memory_problem(str(tmp_path / "nowhere"), TRAINING, None, gpu_sample(free=GiB)) is None
    assert preflight.gpu_memory_problem(None, TRAINING, None, gpu_sample(free=GiB)) is None
