"""A tiny synthetic multilingual corpus, binarized with the real fairseq-preprocess.

Languages en, de, fr share one dictionary. A sentence is a few random "concepts"; each language
writes concept i as its own word (en: e7, de: d7, fr: f7) and fr also reverses the word order, so
the directions really differ and a model can learn them in a few hundred updates.
"""

import random
import subprocess
import sys
from pathlib import Path

LANGS = ["en", "de", "fr"]
PAIRS = ["en-de", "de-en", "en-fr"]
CONCEPTS = 12


def _sentence(rng):
    return [rng.randrange(CONCEPTS) for _ in range(rng.randint(2, 6))]


def _write(concepts, lang):
    words = [f"{lang[0]}{c}" for c in concepts]
    return " ".join(reversed(words) if lang == "fr" else words)


def make_tiny_data(root: Path, train_size=400, valid_size=24, seed=0) -> Path:
    """Writes text under root/text and fairseq binaries under root/bin; returns root/bin."""
    rng = random.Random(seed)
    text, binary = root / "text", root / "bin"
    text.mkdir(parents=True, exist_ok=True)
    sizes = {"train": train_size, "valid": valid_size, "test": valid_size}
    for split, size in sizes.items():
        sentences = [_sentence(rng) for _ in range(size)]
        for lang in LANGS:
            lines = [_write(s, lang) for s in sentences]
            (text / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    vocab = [f"{lang[0]}{c}" for lang in LANGS for c in range(CONCEPTS)]
    (root / "dict.txt").write_text("".join(f"{w} 100\n" for w in vocab))
    for pair in PAIRS:
        src, tgt = pair.split("-")
        subprocess.run(
            [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", src,
             "--target-lang", tgt, "--trainpref", str(text / "train"), "--validpref",
             str(text / "valid"), "--testpref", str(text / "test"), "--destdir", str(binary),
             "--srcdict", str(root / "dict.txt"), "--tgtdict", str(root / "dict.txt"),
             "--workers", "1"],
            check=True, capture_output=True,
        )
    return binary
