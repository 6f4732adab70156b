"""Merge an adapter into its base model, for `traind export --merged`.

    python -m engine.worker.export --adapter DIR --base PATH_OR_HUB_ID --out DIR

Run by engine/tools/export.py, which never imports torch or peft: it hands this
process a checked copy of the adapter and an empty folder inside its temp
folder, and owns the checks, the record and the rename afterwards.

The base is loaded in float32 whatever its own dtype, so W + scale * B A is
computed once at full precision (a QLoRA adapter merges into the unquantized
base, never into 4-bit weights); peft's PeftModel.from_pretrained applies the
adapter and merge_and_unload folds it in. The merged weights are then saved in
the base's own dtype (its config's `dtype`, or `torch_dtype` in older configs;
float32 when it names none), so the export replaces the base one for one, with
the same size. The merge holds the base in float32 in memory: 4 bytes a
parameter. The tokenizer is the adapter's (a version saves its own), else the
base's. On success one JSON line on stdout says what was saved; on failure one
line `error: ...` on stderr and exit 1.

It writes only into --out, and dies with its parent (an export killed leaves
no merge running on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")


def base_dtype(base: str) -> str:
    """The dtype the base declares, if it is one this can save in; float32 otherwise."""
    config = Path(base) / "config.json"
    try:
        declared = json.loads(config.read_text())
    except (OSError, ValueError):
        return "float32"  # a hub id: transformers resolves it; the merge stays in float32
    name = declared.get("dtype") or declared.get("torch_dtype") if isinstance(declared, dict) else None
    return name if name in DTYPES else "float32"


def merge(adapter: Path, base: str, out: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    saved_as = base_dtype(base)
    model = model.to(getattr(torch, saved_as))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer_from = adapter if (adapter / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    return {"merged_in": "float32", "saved_as": saved_as, "tokenizer_from": "adapter" if tokenizer_from == adapter
            else "base", "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker.export", description=__doc__.split("\n")[1])
    parser.add_argument("--adapter", required=True, type=Path)
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    from engine.worker.control import die_with_parent

    if not die_with_parent():
        return 1
    # stderr is what the user reads when the merge fails: reports and the error, no progress bars or advisories.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    warnings.simplefilter("ignore", FutureWarning)
    try:
        info = merge(args.adapter, args.base, args.out)
    except Exception as e:  # the process's one handler: whatever loading or merging raised, said in one line
        print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
