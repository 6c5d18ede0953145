"""Convert megads checkpoints: to and from the HuggingFace DeepseekV3 layout, or re-cut for a layout.

    python tools/convert_checkpoint.py to-hf   runs/tiny/checkpoints out/hf [--dtype bf16|fp32] [--fp8] [--tokenizer T]
    python tools/convert_checkpoint.py from-hf deepseek-v3/ out/megads    [--dequant-dtype bf16|fp32]
    python tools/convert_checkpoint.py reshard runs/tiny/checkpoints out/tp2ep4 --tp 2 --ep 4

A checkpoint argument is a checkpoint directory or a checkpoint root (its `latest` is used).
Conversions stream tensor by tensor; outputs appear only when complete. See docs/checkpoint.md.

The tokenizer travels with the weights. from-hf copies tokenizer.json, tokenizer_config.json,
special_tokens_map.json and tokenizer.model, those the HF directory holds, into the checkpoint's
tokenizer/ directory (train with data.tokenizer=out/megads/tokenizer). They sit inside the
checkpoint so that they are renamed into place with it and listed in its index.json with their
sha256 like every other file; loading verifies only the files holding tensors and trainer.pt, so
they change nothing there, while to-hf and reshard check them before copying them on. to-hf
writes them into the HF directory, or, with --tokenizer, the files of the tokenizer named (a
tokenizer.json or .model with the tokenizer_config.json and special_tokens_map.json beside it, or
a directory holding them): checkpoints saved by training carry none.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megads.checkpoint.convert import from_hf, reshard, to_hf  # noqa: E402
from megads.checkpoint.format import CheckpointError  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def progress(items, total: int, desc: str):
    return tqdm(items, total=total, desc=desc, unit="tensor", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    hf = sub.add_parser("to-hf", help="megads checkpoint -> HuggingFace DeepseekV3 (safetensors + config.json)")
    hf.add_argument("checkpoint")
    hf.add_argument("output")
    hf.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the written weights (default bf16)")
    hf.add_argument("--fp8", action="store_true", help="write projections as e4m3 with 128x128 weight_scale_inv")
    hf.add_argument("--max-shard-gb", type=float, default=5.0)
    hf.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, .model or a directory to copy into the output "
                                                        "(default: the tokenizer files the checkpoint carries)")
    back = sub.add_parser("from-hf", help="HuggingFace DeepseekV3 (bf16 or the released FP8) -> megads checkpoint")
    back.add_argument("hf_dir")
    back.add_argument("output")
    back.add_argument("--dequant-dtype", choices=DTYPES, default="bf16", help="dtype of dequantised FP8 weights")
    back.add_argument("--max-file-gb", type=float, default=5.0)
    cut = sub.add_parser("reshard", help="re-cut a checkpoint's pieces for a TP x EP layout (loading stays layout-free)")
    cut.add_argument("checkpoint")
    cut.add_argument("output")
    cut.add_argument("--tp", type=int, default=1)
    cut.add_argument("--ep", type=int, default=1)
    cut.add_argument("--max-file-gb", type=float, default=5.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        if args.command == "to-hf":
            summary = to_hf(args.checkpoint, args.output, DTYPES[args.dtype], args.fp8,
                            int(args.max_shard_gb * 2**30), progress, args.tokenizer)
        elif args.command == "from-hf":
            summary = from_hf(args.hf_dir, args.output, DTYPES[args.dequant_dtype], int(args.max_file_gb * 2**30),
                              progress)
        else:
            if args.tp < 1 or args.ep < 1:
                raise ValueError(f"--tp and --ep must be >= 1, got {args.tp} and {args.ep}")
            summary = reshard(args.checkpoint, args.output, args.tp, args.ep, int(args.max_file_gb * 2**30), progress)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"convert_checkpoint {args.command}: error: {err}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{args.command}: wrote " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
