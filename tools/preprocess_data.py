"""Tokenize a corpus into a megads indexed dataset (PREFIX.bin + PREFIX.idx).

Input: .jsonl (one JSON object per line, text under --json-key) or plain text (one document per
blank-line separated paragraph; newlines inside a paragraph are kept).

    python tools/preprocess_data.py --input corpus.txt --tokenizer tok.model --output-prefix data/train
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

from megads.data.indexed import IndexedDatasetWriter  # noqa: E402
from megads.data.tokenizer import Tokenizer  # noqa: E402

_CHUNK = 1024  # documents encoded per sentencepiece batch call


def iter_jsonl(path: str, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if key not in record:
                raise KeyError(f"{path}:{lineno}: no field {key!r} (choose another with --json-key)")
            yield record[key]


def iter_paragraphs(path: str) -> Iterator[str]:
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in itertools.chain(f, [""]):  # "" flushes the last paragraph
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).removesuffix("\n")
                lines = []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help=".jsonl or text file")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl input")
    parser.add_argument("--append-eos", action="store_true",
                        help="store eos after each document (megads' PackedSequences already adds one)")
    parser.add_argument("--log-interval", type=int, default=10000, help="print progress every N documents")
    args = parser.parse_args(argv)

    tok = Tokenizer(args.tokenizer)
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"input not found: {args.input}")
    is_jsonl = args.input.endswith((".jsonl", ".json"))
    docs = iter_jsonl(args.input, args.json_key) if is_jsonl else iter_paragraphs(args.input)

    start = time.time()
    writer = IndexedDatasetWriter(args.output_prefix, tok.vocab_size)
    n_docs = n_tokens = 0
    while chunk := list(itertools.islice(docs, _CHUNK)):
        for ids in tok.encode_batch(chunk):
            if args.append_eos:
                ids.append(tok.eos_id)
            writer.add_document(ids)
            n_docs += 1
            n_tokens += len(ids)
            if n_docs % args.log_interval == 0:
                print(f"processed {n_docs} documents, {n_tokens} tokens ({time.time() - start:.1f}s)", flush=True)
    writer.finalize()
    print(f"wrote {args.output_prefix}.bin/.idx: {n_docs} documents, {n_tokens} tokens, "
          f"{n_tokens / max(n_docs, 1):.1f} tokens/doc ({time.time() - start:.1f}s)")


if __name__ == "__main__":
    main()
