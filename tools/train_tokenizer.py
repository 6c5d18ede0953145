"""Train a SentencePiece BPE tokenizer for megads.

    python tools/train_tokenizer.py --input corpus.txt --output-prefix out/tok --vocab-size 512
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

from megads.data.tokenizer import SentencePieceTokenizer, train_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True, help="upper bound on the vocabulary size")
    args = parser.parse_args(argv)

    start = time.time()
    model_path = train_tokenizer(args.input, args.output_prefix, args.vocab_size)
    tok = SentencePieceTokenizer(model_path)
    print(f"wrote {model_path}: vocab_size={tok.vocab_size} pad={tok.pad_id} bos={tok.bos_id} "
          f"eos={tok.eos_id} ({time.time() - start:.1f}s)")


if __name__ == "__main__":
    main()
