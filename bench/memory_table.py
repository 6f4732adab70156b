"""Per-rank GPU memory of Llama-shaped models, from engine/ops/memory.py's estimate: the table in
docs/distributed.md ("Sharding: when, and how much memory").

Each cell is what a rank needs free (the estimate's total plus the CUDA context), in GiB, and the smallest of
the common cards (24, 48, 80 GB) that holds it. Every job: bf16, AdamW (adamw_torch), micro-batch 1 of 2048
tokens, gradient checkpointing on, sdpa; LoRA and QLoRA with traind's [adapter] defaults (r 16, all-linear,
dropout 0.05). "replica" is data parallel on two or more GPUs (DDP keeps a bucket beside each gradient); the
last column is fsdp on 8 ranks with cpu_offload: the GPU's share, and the host memory each rank pins.
Computed, not measured: no GPU needed.

    .venv/bin/python bench/memory_table.py            # the markdown table, and what 70B takes beyond it
"""

from __future__ import annotations

from engine.core.config import AdapterConfig
from engine.ops import memory

GiB = 2**30
CARDS = (24, 48, 80)  # GB, as sold; taken as GiB, near enough for what a card holds
RANKS = (2, 4, 8)
MODELS = {  # the shapes of their config.json files
    "Llama-2-7B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                       vocab_size=32000, num_attention_heads=32, num_key_value_heads=32),
    "Llama-3-8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                       vocab_size=128256, num_attention_heads=32, num_key_value_heads=8),
    "Llama-3-70B": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                        vocab_size=128256, num_attention_heads=64, num_key_value_heads=8),
}
FSDP = {"method": "fsdp", "reshard_after_forward": True, "cpu_offload": False, "wrap_modules": []}


def need(e: memory.MemoryEstimate) -> float:
    return (e.total + memory.CUDA_OVERHEAD) / GiB


def cell(gib: float) -> str:
    card = next((f"{c} GB" for c in CARDS if gib <= c), "none")
    return f"{gib:.1f} ({card})"


def rows() -> list[list[str]]:
    adapter = AdapterConfig()
    job = dict(precision="bf16", optim="adamw_torch", batch_size=1, seq_length=2048, gradient_checkpointing=True,
               attn_implementation="sdpa", lora_r=adapter.r, target_modules=adapter.target_modules,
               lora_dropout=adapter.dropout)
    out = []
    for name, config in MODELS.items():
        shape = memory.shape_from_config(config)
        for method, label in (("full", "full"), ("lora", f"LoRA r={adapter.r}"), ("qlora", f"QLoRA r={adapter.r}")):
            replica = memory.estimate(shape, method=method, processes=2, ranks=2, **job)
            sharded = [memory.estimate(shape, method=method, processes=n, ranks=n, sharding=FSDP, **job)
                       for n in RANKS]
            offload = memory.estimate(shape, method=method, processes=8, ranks=8,
                                      sharding=dict(FSDP, cpu_offload=True), **job)
            out.append([name, label, cell(need(replica)), *(cell(need(e)) for e in sharded),
                        f"{need(offload):.1f} + host {offload.host / GiB:.1f}"])
    return out


def beyond_eight() -> str:
    """The one model the table leaves without a card: how many ranks its full fine-tune takes."""
    shape = memory.shape_from_config(MODELS["Llama-3-70B"])
    job = dict(precision="bf16", optim="adamw_torch", batch_size=1, seq_length=2048, gradient_checkpointing=True)
    figures = ", ".join(f"fsdp x{n} {cell(need(memory.estimate(shape, processes=n, ranks=n, sharding=FSDP, **job)))}"
                        for n in (16, 32))
    offload = memory.estimate(shape, processes=8, ranks=8, sharding=dict(FSDP, cpu_offload=True), **job)
    return f"Llama-3-70B full: {figures}; cpu_offload on 8 ranks pins {8 * offload.host / 2**40:.2f} TiB of host memory"


def main() -> None:
    header = ["model", "method", "replica", *(f"fsdp x{n}" for n in RANKS), "fsdp x8, cpu_offload"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows():
        print("| " + " | ".join(row) + " |")
    print()
    print(beyond_eight())


if __name__ == "__main__":
    main()
