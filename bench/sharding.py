"""FSDP2 against data parallel on two ranks (gloo on this CPU): memory a rank, tokens/s, checkpoint save time.

Each case runs under PyTorch's elastic launcher, two ranks, on a Llama-shaped
model built here (random weights, ~25M parameters: big enough that state, not
overhead, dominates), AdamW in fp32:

- `ddp`: every rank holds the whole model (torch's DistributedDataParallel,
  what the Trainer wraps a replica in); a checkpoint is rank 0 saving the whole
  model and optimizer state (the Trainer's own files).
- `fsdp`: traind's sharding (engine/worker/sharding.py: `fully_shard` on each
  decoder layer, then the model); a checkpoint is `sharding.save_checkpoint`
  (DCP, each rank its shard), timed beside a gathered save of the same state
  (full state dicts to rank 0, then torch.save).

Measured on each rank and reported for rank 0 (the ranks are alike): the bytes
of parameters, gradients and optimizer state it holds (its local tensors), its
peak resident memory (VmHWM), tokens/s over the timed steps, and the save
times (median of the repeats). The ratios are fsdp / ddp.

    .venv/bin/python bench/sharding.py [--steps 20] [--saves 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
BATCH, SEQ = 4, 256  # a rank's micro-batch


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def held_bytes(model, optimizer) -> int:
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = [local(p) for p in model.parameters()] + [local(p.grad) for p in model.parameters() if p.grad is not None]
    tensors += [local(v) for state in optimizer.state.values() for v in state.values() if hasattr(v, "numel")]
    return sum(t.numel() * t.element_size() for t in tensors)


def rank_main(mode: str, steps: int, saves: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.worker import sharding

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    params = sum(p.numel() for p in model.parameters())
    if mode == "fsdp":
        sharding.shard(model, {"method": "fsdp"}, "fp32")
        trained = model
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(rank)

    def step() -> None:
        ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=generator)
        trained(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between the Trainer's steps

    step()  # warm-up: optimizer state allocated
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    result = {"mode": mode, "params": params, "held_bytes": held_bytes(model, optimizer), "peak_rss": vm_hwm(),
              "tokens_per_s": 2 * steps * BATCH * SEQ / elapsed}

    def timed(save) -> float:
        times = []
        for i in range(saves):
            folder = out.parent / f"{mode}-{save.__name__}-{i}"
            dist.barrier()
            begin = time.perf_counter()
            save(folder)
            dist.barrier()
            times.append(time.perf_counter() - begin)
        return statistics.median(times)

    def sharded(folder: Path) -> None:
        sharding.save_checkpoint(folder, model, optimizer)

    def gathered(folder: Path) -> None:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=full)
        if rank == 0:
            folder.mkdir(parents=True)
            torch.save(model_state, folder / "model.pt")
            torch.save(optim_state, folder / "optimizer.pt")

    def replica(folder: Path) -> None:
        if rank == 0:
            folder.mkdir(parents=True)
            torch.save(model.state_dict(), folder / "model.pt")
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    if mode == "fsdp":
        result.update(save_sharded_s=timed(sharded), save_gathered_s=timed(gathered))
    else:
        result.update(save_gathered_s=timed(replica))
    if rank == 0:
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


def run_case(mode: str, steps: int, saves: int, tmp: Path) -> dict:
    out = tmp / mode / "result.json"
    out.parent.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    __file__, "--rank", mode, "--steps", str(steps), "--saves", str(saves), "--out", str(out)],
                   check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rank", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)  # one case, under the launcher
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args.rank, args.steps, args.saves, args.out)
        return 0
    with tempfile.TemporaryDirectory(prefix="traind-bench-sharding-") as tmp:
        ddp, fsdp = (run_case(mode, args.steps, args.saves, Path(tmp)) for mode in ("ddp", "fsdp"))
    ratios = {"held_bytes": fsdp["held_bytes"] / ddp["held_bytes"], "peak_rss": fsdp["peak_rss"] / ddp["peak_rss"],
              "tokens_per_s": fsdp["tokens_per_s"] / ddp["tokens_per_s"],
              "save_sharded_vs_gathered": fsdp["save_sharded_s"] / fsdp["save_gathered_s"],
              "save_sharded_vs_replica": fsdp["save_sharded_s"] / ddp["save_gathered_s"]}
    if args.json:
        print(json.dumps({"ddp": ddp, "fsdp": fsdp, "ratios": ratios}, indent=2))
        return 0
    print(f"two ranks, gloo, {ddp['params']:,} parameters, fp32 AdamW, micro-batch {BATCH} x {SEQ} tokens a rank")
    print(f"{'':26}{'ddp':>14}{'fsdp':>14}{'fsdp/ddp':>10}")
    print(f"{'state held a rank':26}{mib(ddp['held_bytes']):>14}{mib(fsdp['held_bytes']):>14}"
          f"{ratios['held_bytes']:>10.2f}")
    print(f"{'peak RSS a rank':26}{mib(ddp['peak_rss']):>14}{mib(fsdp['peak_rss']):>14}{ratios['peak_rss']:>10.2f}")
    print(f"{'tokens/s (both ranks)':26}{ddp['tokens_per_s']:>14,.0f}{fsdp['tokens_per_s']:>14,.0f}"
          f"{ratios['tokens_per_s']:>10.2f}")
    print(f"{'checkpoint save':26}{ddp['save_gathered_s']:>13.2f}s{fsdp['save_sharded_s']:>13.2f}s"
          f"{ratios['save_sharded_vs_replica']:>10.2f}   (ddp: rank 0 saves the replica; fsdp: each rank its shard)")
    print(f"{'fsdp save, gathered':26}{'':>14}{fsdp['save_gathered_s']:>13.2f}s"
          f"   sharded/gathered {ratios['save_sharded_vs_gathered']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
