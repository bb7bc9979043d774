"""Rebuild the stdlib-* evaluation data from the running Python's standard library.

    python configs/tasks/build_data.py [--out DIR]

Reads the source files under ``os.path.dirname(os.__file__)`` and takes
docstrings with ``ast``; no stdlib module is imported or executed. The output
depends only on those files: sorted file lists, fixed seeds, no set or hash
order. The same Python build gives byte-identical files; another Python version
(or a distribution that splits the stdlib into packages) gives different data.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import sys
import warnings
from pathlib import Path

SEED = 20240601

# Whole trees that are not library modules: tests, the IDE, demos, generated
# codec tables, the pydoc topic dump, third-party packages.
SKIP_DIRS = {
    "site-packages", "lib-dynload", "test", "tests", "idle_test", "idlelib",
    "turtledemo", "pydoc_data", "encodings", "ensurepip", "__pycache__",
}
SKIP_MODULES = {"this", "antigravity"}  # rot13 text, a browser easter egg

# Caps per module and per top-level package keep tkinter (a quarter of all
# documented methods) and distutils from filling the sets.
MC_TEST, MC_TRAIN, MC_PER_MODULE = 200, 40, 2
COMPLETE_N, COMPLETE_WORDS = 150, 3
PER_PACKAGE = 12
BPB_N, BPB_MIN, BPB_MAX, BPB_PER_PACKAGE = 40, 300, 2000, 2


def stdlib_modules(root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every public stdlib source file, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        # Private packages (__phello__) and config-3.X-* are skipped along
        # with SKIP_DIRS; private files (_pydecimal, concurrent.futures._base)
        # below.
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in SKIP_DIRS and not d.startswith(("_", "config-"))
        )
        for name in sorted(filenames):
            if not name.endswith(".py") or name == "__main__.py":
                continue
            if name.startswith("_") and name != "__init__.py":
                continue
            parts = list(rel.parts)  # () for the top directory
            if name != "__init__.py":
                parts.append(name[:-3])
            if parts[-1] in SKIP_MODULES:
                continue
            found.append((".".join(parts), Path(dirpath) / name))
    return sorted(found)


def parse(path: Path) -> ast.Module | None:
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid-escape warnings in old code
            return ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError):
        return None


def clean(text: str) -> str:
    return " ".join(text.split())


def first_sentence(doc: str) -> str:
    para = clean(doc.strip().split("\n\n", 1)[0])
    # A sentence ends at . ! or ? before a capital, but not at "e.g." or "i.e.".
    m = re.search(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s(?=[A-Z])", para)
    return para[: m.start()] if m else para


def plain(text: str) -> bool:
    """Printable prose: no doctest prompts, reST blocks or signature lines."""
    return (
        text.isprintable() and text[:1].isupper()
        and not any(s in text for s in (">>>", "::", "->"))
    )


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def near_duplicate(a: set, b: set, threshold: float = 0.3) -> bool:
    return len(a & b) / max(1, len(a | b)) > threshold


def loose_key(sentence: str) -> str:
    """Lower case, words only, a plural or third-person "s" dropped:
    "Converts raw node information" and "Convert raw node information" meet."""
    return " ".join(w.rstrip("s") for w in re.findall(r"\w+", sentence.lower()))


def build_mc(trees: list[tuple[str, ast.Module]]) -> tuple[list[dict], list[dict]]:
    """Docstring first sentence of a public module-level function -> its module."""
    by_sentence: dict[str, set[str]] = {}
    defines: dict[str, set[str]] = {}  # function name -> modules defining it
    candidates = []
    for module, tree in trees:
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            defines.setdefault(node.name, set()).add(module)
            doc = ast.get_docstring(node)
            if node.name.startswith("_") or not doc:
                continue
            sentence = first_sentence(doc)
            by_sentence.setdefault(loose_key(sentence), set()).add(module)
            if 25 <= len(sentence) <= 200 and sentence.endswith(".") and plain(sentence):
                candidates.append((module, node.name, sentence))
    modules = sorted({m for m, _, _ in candidates})

    questions, seen = [], set()
    for module, name, sentence in candidates:
        # A sentence two modules share (posixpath/ntpath) has no single
        # answer; one module's repeats would be the same question twice.
        key = loose_key(sentence)
        if len(by_sentence[key]) > 1 or key in seen:
            continue
        seen.add(key)
        questions.append((module, name, sentence))
    rng = random.Random(SEED)
    rng.shuffle(questions)

    per_module: dict[str, int] = {}
    per_package: dict[str, int] = {}
    picked, kept = [], []
    for module, name, sentence in questions:
        package = module.split(".")[0]
        sh = shingles(sentence, 3)
        if (
            per_module.get(module, 0) >= MC_PER_MODULE
            or per_package.get(package, 0) >= PER_PACKAGE
            or any(near_duplicate(sh, other, 0.5) for other in kept)
        ):
            continue
        kept.append(sh)
        # A distractor must not also define a function of this name, nor be
        # named in the sentence (which would make it look right).
        pool = [
            m for m in modules
            if m != module and m not in defines[name]
            and not re.search(rf"\b{re.escape(m)}\b", sentence)
        ]
        choices = rng.sample(pool, 3) + [module]
        rng.shuffle(choices)
        picked.append({
            "doc": sentence,
            "choices": choices,
            "label": choices.index(module),
            "function": f"{module}.{name}",
        })
        per_module[module] = per_module.get(module, 0) + 1
        per_package[package] = per_package.get(package, 0) + 1
        if len(picked) == MC_TEST + MC_TRAIN:
            break
    return picked[:MC_TEST], picked[MC_TEST:]


def build_complete(trees: list[tuple[str, ast.Module]]) -> list[dict]:
    """Beginning of a class or method docstring -> its next few words."""
    seen: set[str] = set()
    candidates = []
    for module, tree in trees:
        for cls in tree.body:
            if not isinstance(cls, ast.ClassDef) or cls.name.startswith("_"):
                continue
            nodes = [cls] + [
                f for f in cls.body
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                and not f.name.startswith("_")
            ]
            for node in nodes:
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                # The first sentence, so that the continuation never runs
                # across a sentence break.
                sentence = first_sentence(doc)
                words = sentence.split()
                # Inherited boilerplate ("Return a string representation...")
                # repeats across classes: keep the first occurrence only.
                key = " ".join(words[:8]).lower()
                if len(words) < 10 or key in seen or not plain(sentence):
                    continue
                seen.add(key)
                qualname = f"{module}.{cls.name}"
                if node is not cls:
                    qualname += f".{node.name}"
                candidates.append((qualname, words))
    rng = random.Random(SEED + 1)
    rng.shuffle(candidates)
    items, kept, per_package = [], [], {}
    for qualname, words in candidates:
        if len(items) == COMPLETE_N:
            break
        # tkinter's "Return the number of pixels of the width/height of the
        # screen of this widget" pairs are near-duplicates: keep one.
        package = qualname.split(".")[0]
        sh = shingles(" ".join(words), 3)
        if per_package.get(package, 0) >= PER_PACKAGE or any(
            near_duplicate(sh, other, 0.4) for other in kept
        ):
            continue
        kept.append(sh)
        per_package[package] = per_package.get(package, 0) + 1
        cut = rng.randint(5, len(words) - COMPLETE_WORDS)
        items.append({
            "context": " ".join(words[:cut]),
            "continuation": " ".join(words[cut : cut + COMPLETE_WORDS]),
            "source": qualname,
        })
    return items


def build_bpb(trees: list[tuple[str, ast.Module]]) -> list[dict]:
    """Module docstrings of 300-2000 characters, near-duplicates dropped."""
    candidates = []
    for module, tree in trees:
        doc = ast.get_docstring(tree)
        if not doc or not doc.isascii():
            continue
        text = "\n".join(line.rstrip() for line in doc.strip().splitlines())
        if len(text) > BPB_MAX:  # cut at the last paragraph break that fits
            cut = text.rfind("\n\n", 0, BPB_MAX)
            text = text[:cut] if cut > 0 else ""
        if len(text) >= BPB_MIN:
            candidates.append((module, text))
    rng = random.Random(SEED + 2)
    rng.shuffle(candidates)
    docs, kept, per_package = [], [], {}
    for module, text in candidates:
        # lib2to3.fixes.* and distutils.command.* docstrings follow one
        # template each: a cap per top-level package keeps the set varied.
        package = module.split(".")[0]
        sh = shingles(text)
        if per_package.get(package, 0) >= BPB_PER_PACKAGE or any(
            near_duplicate(sh, other) for other in kept
        ):
            continue
        kept.append(sh)
        per_package[package] = per_package.get(package, 0) + 1
        docs.append({"text": text, "module": module})
        if len(docs) == BPB_N:
            break
    return docs


def write_jsonl(path: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf-8"))
    os.replace(tmp, path)
    print(f"{path}: {len(records)} records, {len(data.encode('utf-8'))} bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory for the .jsonl files (default: beside this script)")
    args = parser.parse_args(argv)

    root = Path(os.path.dirname(os.__file__))
    trees = [(m, t) for m, p in stdlib_modules(root) if (t := parse(p)) is not None]
    print(f"Python {sys.version.split()[0]}: {len(trees)} modules under {root}")

    mc_test, mc_train = build_mc(trees)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "stdlib-mc.jsonl", mc_test)
    write_jsonl(args.out / "stdlib-mc-train.jsonl", mc_train)
    write_jsonl(args.out / "stdlib-complete.jsonl", build_complete(trees))
    write_jsonl(args.out / "stdlib-bpb.jsonl", build_bpb(trees))


if __name__ == "__main__":
    main()
