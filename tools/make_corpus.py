"""Build qdq_compiler/data/sentences.txt: real English sentences from the documentation CPython ships.

Sources (PSF license): the language reference topics in `pydoc_data.topics` and
the docstrings of the standard library's modules, classes and functions. The
result is committed, so every machine calibrates and evaluates on the same text:

    python tools/make_corpus.py -o qdq_compiler/data/sentences.txt
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
import sys
import warnings
from pathlib import Path

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
        "venv", "pydoc", "__main__"}
SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-\"]+[.!?]")


def documents():
    import pydoc_data.topics

    yield from pydoc_data.topics.topics.values()
    for name in sorted(sys.stdlib_module_names):
        if name in SKIP or name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # platform-specific or optional modules
            continue
        yield module.__doc__ if isinstance(module.__doc__, str) else ""
        for _, member in inspect.getmembers(module):
            if (inspect.isclass(member) or inspect.isfunction(member)) and \
                    getattr(member, "__module__", None) == name:
                yield member.__doc__ if isinstance(member.__doc__, str) else ""


def sentences() -> list[str]:
    found = set()
    for text in documents():
        for paragraph in re.split(r"\n\s*\n", text):
            flat = re.sub(r"\s+", " ", paragraph).strip()
            for sentence in re.split(r"(?<=[.!?])\s+", flat):
                if 8 <= len(sentence.split()) <= 40 and SENTENCE.fullmatch(sentence):
                    found.add(sentence)
    ordered = sorted(found)
    random.Random(0).shuffle(ordered)
    return ordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("qdq_compiler/data/sentences.txt"))
    parser.add_argument("--limit", type=int, default=2400)
    args = parser.parse_args()
    found = sentences()[: args.limit]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(found) + "\n")
    print(f"wrote {len(found)} sentences to {args.output}")


if __name__ == "__main__":
    main()
