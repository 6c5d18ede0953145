"""Tokenize a corpus into a megads indexed dataset (PREFIX.bin + PREFIX.idx + PREFIX.meta.json).

Input: .jsonl (one JSON object per line, text under --json-key) or plain text (one document per
blank-line separated paragraph; newlines inside a paragraph are kept). Both are read as UTF-8.
--tokenizer is a HuggingFace tokenizer.json (or a directory holding one) or a sentencepiece .model.
PREFIX.meta.json records the tokenizer (sha256 of its file) so training refuses another one.

Bad input (a missing file, malformed JSON, non-UTF-8 bytes, a record without a text string, no
documents at all) stops the tool with one line naming the file and line, exit status 2, and no
output files.

    python tools/preprocess_data.py --input corpus.txt --tokenizer tok.model --output-prefix data/train
    python tools/preprocess_data.py --input corpus.jsonl --tokenizer hf/tokenizer.json --output-prefix data/train
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
from megads.data.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

_CHUNK = 1024  # documents encoded per encode_batch call


class InputError(Exception):
    """Bad input: reported as one line naming the file (and line), exit status 2."""


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded one line at a time so that bad UTF-8 names its line;
    CRLF reads as LF, as in text mode."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                 f"of the line); convert the file to UTF-8") from None
            yield lineno, (line[:-2] + "\n" if line.endswith("\r\n") else line)


def _text(record: object, key: str, where: str) -> str:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {json.dumps(record)[:40]}; fix or remove the line")
    if key not in record:
        raise InputError(f"{where}: no field {key!r}; choose another with --json-key or fix the line")
    if not isinstance(record[key], str):
        raise InputError(f"{where}: field {key!r} is {json.dumps(record[key])[:40]}, not a string; "
                         f"fix or remove the line")
    return record[key]


def iter_jsonl(path: str, key: str) -> Iterator[str]:
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                             f"fix or remove the line") from None
        yield _text(record, key, f"{path}:{lineno}")


def iter_paragraphs(path: str) -> Iterator[str]:
    lines: list[str] = []
    for _, line in itertools.chain(iter_lines(path), [(0, "")]):  # "" flushes the last paragraph
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).removesuffix("\n")
            lines = []


def open_tokenizer(path: str) -> Tokenizer:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file; check --tokenizer")
    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:  # not a tokenizer, one without eos, a directory without one
        raise InputError(f"{' '.join(str(e).split())}; check --tokenizer") from None


def write_dataset(docs: Iterator[str], tok: Tokenizer, args: argparse.Namespace, start: float) -> tuple[int, int]:
    """Encode and write every document; returns (documents, tokens). Nothing is left on disk if the
    input turns out bad midway."""
    n_docs = n_tokens = 0
    with IndexedDatasetWriter(args.output_prefix, tok.vocab_size, tokenizer_sha256=tok.identity,
                              tokenizer_name=os.path.basename(tok.path)) as writer:
        while chunk := list(itertools.islice(docs, _CHUNK)):
            for ids in tok.encode_batch(chunk):
                if args.append_eos:
                    ids.append(tok.eos_id)
                writer.add_document(ids)
                n_docs += 1
                n_tokens += len(ids)
                if n_docs % args.log_interval == 0:
                    print(f"processed {n_docs} documents, {n_tokens} tokens ({time.time() - start:.1f}s)", flush=True)
        if n_docs == 0:
            raise InputError(f"{args.input}: no documents (the file is empty or holds only blank lines); "
                             f"give a file with at least one document")
        writer.finalize()
    return n_docs, n_tokens


def preprocess(args: argparse.Namespace) -> None:
    if not os.path.isfile(args.input):
        raise InputError(f"{args.input}: no such file; check --input")
    tok = open_tokenizer(args.tokenizer)
    is_jsonl = args.input.endswith((".jsonl", ".json"))
    docs = iter_jsonl(args.input, args.json_key) if is_jsonl else iter_paragraphs(args.input)
    start = time.time()
    n_docs, n_tokens = write_dataset(docs, tok, args, start)
    print(f"wrote {args.output_prefix}.bin/.idx/.meta.json: {n_docs} documents, {n_tokens} tokens, "
          f"{n_tokens / n_docs:.1f} tokens/doc ({time.time() - start:.1f}s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help=".jsonl or text file")
    parser.add_argument("--tokenizer", required=True,
                        help="HuggingFace tokenizer.json (or its directory) or sentencepiece .model")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl input")
    parser.add_argument("--append-eos", action="store_true",
                        help="store eos after each document (megads' PackedSequences already adds one)")
    parser.add_argument("--log-interval", type=int, default=10000, help="print progress every N documents")
    args = parser.parse_args(argv)
    if args.log_interval < 1:
        parser.error(f"--log-interval must be >= 1, got {args.log_interval}")
    try:
        preprocess(args)
    except InputError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except OSError as e:  # e.g. an output directory that cannot be created
        where = f"{e.filename}: {e.strerror}" if e.filename else str(e)
        parser.exit(2, f"{parser.prog}: error: {where}\n")


if __name__ == "__main__":
    main()
