"""A pruned pair as an Argos Translate package: one `.argosmodel` that
`argostranslate.package.install_from_path` installs (Argos's `argospm install` takes names from
its online index only); LibreTranslate's Argos fork reads packages with the same code.

The package is a zip of one top folder (Argos 1.11's layout, argostranslate/package.py):

    taskmoe-en_de/
      metadata.json        from_code, to_code, names, package_version, argos_version, type,
                           target_prefix (the forced first target token, when the model has one)
      model/               the CTranslate2 model (export.to_ctranslate2), source token in its config
      sentencepiece.model  the SentencePiece model, target language token added as a control piece
      spacy/               a blank spaCy pipeline of the source language (sentence splitting)
      README.md            what the package is and the settings it needs
      taskmoe_export.json  what was exported (export.export_info), ignored by Argos

Three things Argos does not do the way our models need, and what the package does instead (read
in argostranslate 1.11.0 and argos-translate-lt 1.12.1, translate.py / tokenizer.py / sbd.py):

- The source language token (`--encoder-langtok`, e.g. `__de__` before the pieces): Argos passes
  the SentencePiece pieces as they are. CTranslate2 adds it itself: the model's config gets
  `add_source_bos: true`, `bos_token: "__de__"` (its decoder still starts with `</s>`).
- The target language token (`--decoder-langtok`): Argos forces `metadata.target_prefix` as the
  first target token, but decodes the output with `decode_pieces(...).replace("_", " ")` before
  stripping the prefix, so `__de__` would come back as ` de ` at the start of every sentence.
  The packaged SentencePiece model lists the token as a control piece, which SentencePiece
  decodes to nothing; encoding is unchanged (control pieces never match input text).
- Sentence splitting: Argos splits the source into sentences first. Its default (MiniSBD)
  downloads an ONNX model per language at the first translation unless the package has one in
  `minisbd/`, which cannot be made here without downloading; with `ARGOS_CHUNK_TYPE=SPACY` it
  loads the spaCy pipeline in the package's `spacy/` and adds spaCy's rule-based
  `sentencizer`. So the package ships a blank pipeline (a tokenizer only: a pipeline that
  already had a sentencizer would make Argos's `add_pipe` fail), made with spaCy when it is
  importable here, or copied from `spacy_pipeline`.
"""

import json
import os
import shutil
import tempfile
import zipfile
from typing import List, Optional

from ..atomic import atomic_file
from ..moe.pairs import LANGUAGE_NAMES
from .export import (CONVENTION_FILE, DenseExport, ExportError, ctranslate2_data_dir, export_info,
                     language_convention, to_ctranslate2)

ARGOS_VERSION = "1.11"  # the package layout written here is the one Argos Translate 1.11 installs
CHUNK_TYPE_SETTING = "ARGOS_CHUNK_TYPE=SPACY"  # the setting a package with spacy/ needs


def package_name(src: str, tgt: str) -> str:
    """The package's top folder (where Argos installs it) and file stem: `taskmoe-en_de`, apart
    from Argos's own `translate-en_de-*` packages, so installing one never mixes files into the
    other."""
    return f"taskmoe-{src}_{tgt}"


def _one_token(tokens: List[str], what: str) -> Optional[str]:
    if len(tokens) > 1:
        raise ExportError(f"the model needs {len(tokens)} {what} tokens {tokens}; Argos "
                          "packages take at most one")
    return tokens[0] if tokens else None


def argos_tokens(dense: DenseExport):
    """(source token or None, target prefix token or None) of the exported pair."""
    conv = language_convention(dense)
    return _one_token(conv["source_prefix"], "source"), _one_token(conv["target_prefix"], "target")


def metadata(dense: DenseExport, package_version: str) -> dict:
    """metadata.json: what argostranslate.package reads (`load_metadata_from_json`)."""
    src, tgt = dense.pair
    meta = {"package_version": package_version, "argos_version": ARGOS_VERSION, "type": "translate",
            "from_code": src, "from_name": LANGUAGE_NAMES.get(src, src),
            "to_code": tgt, "to_name": LANGUAGE_NAMES.get(tgt, tgt)}
    target = argos_tokens(dense)[1]
    if target is not None:
        meta["target_prefix"] = target
    return meta


def sentencepiece_with_controls(spm_model: str, controls: List[str]) -> bytes:
    """The SentencePiece model `spm_model` with `controls` as control pieces, which decode to
    nothing (a piece already there becomes one). Encoding text is unchanged."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    with open(spm_model, "rb") as f:
        proto.ParseFromString(f.read())
    control = model_pb2.ModelProto.SentencePiece.CONTROL
    known = {p.piece: p for p in proto.pieces}
    for token in controls:
        if token in known:
            known[token].type = control
        else:
            proto.pieces.append(model_pb2.ModelProto.SentencePiece(piece=token, score=0.0,
                                                                   type=control))
    return proto.SerializeToString()


def spacy_available() -> bool:
    try:
        import spacy  # noqa: F401
    except ImportError:
        return False
    return True


def check_spacy_pipeline(path: str) -> List[str]:
    """The pipes of a saved spaCy pipeline folder that Argos can load as the package's spacy/;
    ExportError if it is not one, or if it has a `sentencizer` already (Argos adds one itself
    with nlp.add_pipe("sentencizer"), which fails on a second)."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(os.path.join(path, "config.cfg")) or not os.path.isfile(meta_path):
        raise ExportError(f"--spacy-pipeline {path} is not a saved spaCy pipeline (no "
                          "config.cfg and meta.json; write one with nlp.to_disk(DIR))")
    with open(meta_path) as f:
        pipes = json.load(f).get("pipeline", [])
    if "sentencizer" in pipes:
        raise ExportError(f"--spacy-pipeline {path} has a `sentencizer` already; Argos adds "
                          "one itself (nlp.add_pipe('sentencizer')), which would fail: save the "
                          "pipeline without it")
    return pipes


def _spacy_pipeline(lang: str, out_dir: str, given: Optional[str]) -> str:
    """spacy/ of the package: `given` copied (check_spacy_pipeline), else a blank pipeline of
    `lang` ("xx", spaCy's multi-language one, when spaCy has no class for it). What was
    shipped, for the README."""
    if given is not None:
        pipes = check_spacy_pipeline(given)
        shutil.copytree(given, out_dir)
        return f"the spaCy pipeline given to the exporter (pipes: {', '.join(pipes) or 'none'})"
    import spacy

    try:
        nlp, code = spacy.blank(lang), lang
    except ImportError:  # spaCy has no language class for this code
        nlp, code = spacy.blank("xx"), "xx"
    nlp.to_disk(out_dir)
    return f"a blank spaCy {spacy.__version__} pipeline (`{code}`: its tokenizer only)"


def _readme(dense: DenseExport, meta: dict, source_bos: Optional[str], splitter: Optional[str],
            quantization: Optional[str]) -> str:
    src, tgt = dense.pair
    lines = [
        f"# {meta['from_name']} -> {meta['to_name']} ({src}-{tgt}), a task-MoE sub-network",
        "",
        f"One language pair of a task-level Mixture-of-Experts model, pruned to the experts "
        f"{src}-{tgt} uses and exported by `taskmoe-export --format argos` (fairseq-taskmoe). "
        f"It serves {', '.join(dense.served)}; this package is for {src}-{tgt}.",
        "",
        f"- model/: CTranslate2 ({quantization or 'float32'}), "
        f"{dense.num_updates or 0} training updates, FFN widths {dense.ffn_dims}.",
    ]
    if source_bos:
        lines.append(f"- Source language token: CTranslate2 adds `{source_bos}` before every "
                     "source itself (model/config.json: add_source_bos, bos_token).")
    if meta.get("target_prefix"):
        lines.append(f"- Target language token: `{meta['target_prefix']}`, forced by Argos "
                     "(metadata.json target_prefix); sentencepiece.model lists it as a control "
                     "piece, so it decodes to nothing.")
    if splitter:
        lines += [f"- spacy/: {splitter}, for sentence splitting. Run Argos Translate or "
                  f"LibreTranslate with `{CHUNK_TYPE_SETTING}` (Argos then adds spaCy's "
                  "rule-based sentencizer and needs spaCy installed); their default splitter, "
                  "MiniSBD, downloads a model at the first translation."]
    else:
        lines += ["- No sentence splitter inside: Argos's default (MiniSBD) downloads one at "
                  "the first translation, ARGOS_CHUNK_TYPE=SPACY downloads spaCy's "
                  "xx_sent_ud_sm. Offline, export again where spaCy is installed."]
    return "\n".join(lines) + "\n"


def write_argos_package(dense: DenseExport, output: str, spm_model: str,
                        data: Optional[str] = None, quantization: Optional[str] = None,
                        package_version: str = "1.0", spacy_pipeline: Optional[str] = None,
                        source: str = "") -> dict:
    """Write the `.argosmodel` of this pair to `output`: staged in a temporary folder next to it,
    zipped under a temporary name and renamed, so `output` appears complete or not at all (an
    existing file is replaced). spacy_pipeline: a saved spaCy pipeline folder to ship instead of
    a blank one. source: the input checkpoint's path, recorded. Returns metadata.json's dict
    plus `spacy` (what spacy/ holds, or None)."""
    try:
        import ctranslate2  # noqa: F401
        import sentencepiece  # noqa: F401
    except ImportError as err:
        raise ExportError(f"--format argos needs CTranslate2 and SentencePiece: pip install "
                          f"ctranslate2 sentencepiece ({err})") from err
    if not spm_model or not os.path.isfile(spm_model):
        raise ExportError("--format argos needs --spm-model FILE, the SentencePiece model of the "
                          "training data: Argos tokenizes with the package's sentencepiece.model")
    data = ctranslate2_data_dir(dense, data)
    source_bos, target = argos_tokens(dense)
    meta = metadata(dense, package_version)
    src, tgt = dense.pair
    name = package_name(src, tgt)
    parent = os.path.dirname(os.path.abspath(output))
    with tempfile.TemporaryDirectory(prefix=f".{os.path.basename(output)}.", dir=parent) as tmp:
        top = os.path.join(tmp, name)
        os.mkdir(top)
        to_ctranslate2(dense, os.path.join(top, "model"), data, quantization=quantization,
                       force=True, source_bos=source_bos)
        with open(os.path.join(top, "sentencepiece.model"), "wb") as f:
            f.write(sentencepiece_with_controls(spm_model, [target] if target else []))
        splitter = None
        if spacy_pipeline is not None or spacy_available():
            splitter = _spacy_pipeline(src, os.path.join(top, "spacy"), spacy_pipeline)
        with open(os.path.join(top, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=2)
        with open(os.path.join(top, "README.md"), "w") as f:
            f.write(_readme(dense, meta, source_bos, splitter, quantization))
        info = {"format": "taskmoe-export argos", "source_checkpoint": source,
                **export_info(dense), "quantization": quantization,
                "argos_source_bos": source_bos, "argos_target_prefix": target}
        with open(os.path.join(top, CONVENTION_FILE), "w") as f:
            json.dump(info, f, indent=2)
        with atomic_file(output, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for folder, dirs, files in os.walk(top):
                dirs.sort()
                for file in sorted(files):
                    path = os.path.join(folder, file)
                    z.write(path, os.path.relpath(path, tmp))
    return {**meta, "spacy": splitter}
