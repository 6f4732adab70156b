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

LLAMA_3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                  vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
FSDP = {"method": "fsdp", "reshard_after_forward": True, "cpu_offload": False, "wrap_modules": []}


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


# -- sharded (FSDP2) -------------------------------------------------------------------------------------

LONG = dict(batch_size=1, seq_length=2048, gradient_checkpointing=True)  # bf16, AdamW: the defaults


def test_an_8b_full_fine_tune_does_not_fit_80gb_as_a_replica_and_fits_a_rank_of_eight_with_fsdp():
    shape = memory.shape_from_config(LLAMA_3_8B)
    replica = memory.estimate(shape, **LONG, processes=8, ranks=8)
    sharded = memory.estimate(shape, **LONG, processes=8, ranks=8, sharding=FSDP)
    assert replica.total > 80 * GiB and sharded.total + memory.CUDA_OVERHEAD < 80 * GiB / 4
    # weights, gradients and optimizer state: 16 bytes a parameter, an eighth of them on each rank
    state = sharded.weights + sharded.gradients + sharded.optimizer + sharded.step_temporaries
    assert state == pytest.approx(20 * shape.parameters / 8, rel=1e-6)  # 4 more: foreach AdamW's temporaries
    # gathered whole in bf16: the root unit (embeddings, head, final norm) and two decoder layers
    layer = (shape.parameters - shape.embedding - shape.head - shape.hidden) / shape.layers
    assert sharded.gathered == pytest.approx(2 * (shape.embedding + shape.head + shape.hidden + 2 * layer), rel=1e-6)
    assert sharded.weight_copies == 0  # the gather is already bf16: autocast caches nothing
    assert sharded.total == pytest.approx(replica.weights / 8 + sharded.optimizer
                                          + max(sharded.forward_peak, sharded.step_peak), rel=1e-6)
    assert sharded.total < (replica.weights + replica.optimizer + replica.gradients) / 8 + sharded.gathered \
        + sharded.activations + sharded.logits
    assert sharded.activations < replica.activations  # bf16 activations per rank, not divided: a micro-batch's own
    assert (sharded.sharding, sharded.ranks, sharded.host) == ("fsdp", 8, 0)
    assert sharded.to_dict()["sharding"] == "fsdp" and sharded.to_dict()["ranks"] == 8
    assert "a rank:" in sharded.describe() and "fsdp on 8 ranks" in sharded.describe()
    assert "gathered" in sharded.describe() and "fsdp" not in replica.describe()


def test_cpu_offload_moves_the_sharded_state_to_the_host():
    shape = memory.shape_from_config(LLAMA_3_8B)
    sharded = memory.estimate(shape, **LONG, ranks=8, sharding=FSDP)
    offloaded = memory.estimate(shape, **LONG, ranks=8, sharding=dict(FSDP, cpu_offload=True))
    assert offloaded.weights == offloaded.optimizer == offloaded.gradients == offloaded.step_temporaries == 0
    assert offloaded.host == pytest.approx(sharded.weights + sharded.optimizer + sharded.gradients
                                           + sharded.step_temporaries, abs=4)
    assert offloaded.total == offloaded.gathered + offloaded.activations + offloaded.logits < 8 * GiB
    assert offloaded.to_dict()["host"] == offloaded.host and offloaded.to_dict()["cpu_offload"] is True
    assert "on the host" in offloaded.describe()
    one = memory.estimate(shape, **LONG, ranks=1, sharding=dict(FSDP, cpu_offload=True))  # a single GPU
    assert one.total == offloaded.total and one.host == pytest.approx(8 * offloaded.host, rel=1e-6)


def test_fsdp_divides_a_frozen_base_and_more_ranks_need_less():
    shape = memory.shape_from_config(LLAMA_3_8B)
    lora = memory.estimate(shape, method="lora", **LONG)
    sharded = memory.estimate(shape, method="lora", **LONG, ranks=4, sharding=FSDP)
    assert sharded.weights == pytest.approx(lora.weights / 4, rel=1e-6)  # the bf16 base too, not trained
    assert sharded.optimizer == pytest.approx(lora.optimizer / 4, rel=1e-6)
    totals = [memory.estimate(shape, **LONG, ranks=n, sharding=FSDP).total for n in (2, 4, 8)]
    assert totals == sorted(totals, reverse=True)
    # without reshard_after_forward every layer stays gathered until its backward: the whole model in bf16
    kept = memory.estimate(shape, **LONG, ranks=8, sharding=dict(FSDP, reshard_after_forward=False))
    assert kept.gathered == pytest.approx(2 * shape.parameters, rel=1e-6)
    qlora = memory.estimate(shape, method="qlora", **LONG, ranks=8, sharding=FSDP)
    assert qlora.weight_copies > 0 and qlora.gathered < sharded.gathered  # 4-bit layers gathered, one dequantised


def test_a_job_estimate_takes_the_sharding_plan_and_the_ranks(tmp_path):
    d = str(model_dir(tmp_path / "m", LLAMA_3_8B))
    training = {"batch_size": 1, "max_seq_length": 2048, "gradient_checkpointing": True, "processes": 4}
    replica = memory.estimate_job(d, training, None, "bf16")
    assert replica.sharding is None and replica.ranks == 1
    by_processes = memory.estimate_job(d, training, None, "bf16", sharding=FSDP)  # one machine: the processes
    assert by_processes.ranks == 4
    two_nodes = memory.estimate_job(d, training, None, "bf16", sharding=FSDP, ranks=8)
    assert two_nodes.ranks == 8 and two_nodes.total < by_processes.total < replica.total


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
    assert ", GPU 0 has 70.0 GiB free: try adapter.method = lora, training.gradient_checkpointing = true, " \
           "distributed.sharding = 'fsdp' across more GPUs (training.processes, distributed.nodes), " \
           "distributed.cpu_offload = true with fsdp or a smaller training.batch_size (estimate about " in problem
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
    assert "try adapter.method = qlora, distributed.sharding = 'fsdp' across more GPUs (training.processes, " \
           "distributed.nodes), distributed.cpu_offload = true with fsdp or a smaller training.max_seq_length (" \
           in problem


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


def test_a_replica_that_does_not_fit_is_told_the_ranks_fsdp_fits_on(tmp_path):
    d = str(model_dir(tmp_path / "m", LLAMA_3_8B))
    training = dict(TRAINING, batch_size=1, max_seq_length=2048, gradient_checkpointing=True, processes=8)
    sample = gpu_sample(free=79 * GiB, devices=8)
    problem = preflight.gpu_memory_problem(d, training, None, sample)
    assert problem.startswith("GPU memory: needs about 1") and ", GPU 0 has 79.0 GiB free: it fits with " \
        "distributed.sharding = 'fsdp' on 8 ranks: about " in problem and "GiB a rank (estimate about" in problem
    # one process, eight GPUs: the machine's GPUs are the ranks to shard across
    problem = preflight.gpu_memory_problem(d, dict(training, processes=1), None, sample)
    assert "it fits with distributed.sharding = 'fsdp' on 8 ranks (training.processes = 8, the GPUs this " \
           "machine has): about " in problem
    # four processes on each of two machines
    problem = preflight.gpu_memory_problem(d, dict(training, processes=4), None, sample, nodes=2)
    assert "it fits with distributed.sharding = 'fsdp' on 8 ranks: about " in problem


def test_with_fsdp_the_preflight_checks_a_rank_and_names_the_knobs_when_nothing_fits(tmp_path):
    d = str(model_dir(tmp_path / "m", LLAMA_3_8B))
    training = dict(TRAINING, batch_size=1, max_seq_length=2048, gradient_checkpointing=True, processes=8)
    sample = gpu_sample(free=47 * GiB, devices=8)  # 48 GB cards
    assert preflight.gpu_memory_problem(d, training, None, sample, FSDP) is None
    problem = preflight.gpu_memory_problem(d, dict(training, processes=2), None, sample, FSDP)
    assert problem.startswith("GPU memory: needs about ") and " a rank, GPU 0 has 47.0 GiB free: try " \
        "adapter.method = lora, fsdp across more GPUs (training.processes, distributed.nodes), " \
        "distributed.cpu_offload = true or a smaller training.max_seq_length (estimate about " in problem
    assert "fsdp on 2 ranks" in problem
    offload = dict(FSDP, cpu_offload=True)
    assert preflight.gpu_memory_problem(d, dict(training, processes=2), None, sample, offload) is None
    # a replica on 24 GB cards that fsdp on the machine's two does not save either: every knob, none that fits
    small = gpu_sample(free=23 * GiB, devices=2)
    problem = preflight.gpu_memory_problem(d, dict(training, processes=1), None, small)
    assert "it fits" not in problem and "distributed.sharding = 'fsdp' across more GPUs" in problem
    assert "distributed.cpu_offload = true with fsdp" in problem
    cpu = {"mode": "cpu", "reason": "no NVIDIA driver", "devices": []}
    assert preflight.gpu_memory_problem(d, training, None, cpu, FSDP, nodes=2) is None
