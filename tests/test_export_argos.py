"""taskmoe-export --format argos: one pair as an Argos Translate package (.argosmodel).

The tiny task-MoE of conftest (target/target, trained 120 updates) is packaged for en-fr. Argos
tokenizes with SentencePiece, so the tiny corpus gets a SentencePiece model (word pieces, `▁e7`)
and a copy of its dictionaries naming the same symbols (`e7` -> `▁e7`, same order, same ids): the
model computes the same function on those pieces. Checked here: the layout and metadata, that
CTranslate2 adding the source token itself (add_source_bos) gives exactly what our CTranslate2
export gives with the token prefixed, that the target token decodes to nothing, the refusals,
and, with Argos Translate's own virtualenv (`make argos-venv`), the package installed by
unchanged argostranslate 1.11 and translating offline as our CTranslate2 engine does."""

import importlib.util
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from test_export import export
from tiny_data import LANGS, PAIRS

PAIR = "en-fr"
TOP = "taskmoe-en_fr"  # the package's top folder
ARGOS_PYTHON = Path(__file__).parents[1] / ".venv-argos" / "bin" / "python"
# what argostranslate 1.11 passes to CTranslate2 (translate.apply_packaged_translation) with its
# default settings (ARGOS_BEAM_SIZE 4), for our engine to decode the same way
ARGOS_OPTIONS = dict(beam=4, length_penalty=0.2, replace_unknowns=True)

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("ctranslate2", "sentencepiece")),
    reason="needs ctranslate2 and sentencepiece (make venv installs both)")


@pytest.fixture(scope="module")
def spm_data(tiny_data, tmp_path_factory):
    """(SentencePiece model trained on the tiny corpus, data folder with matching
    dictionaries)."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("argos-spm")
    text = tiny_data.parent / "text"
    spm.SentencePieceTrainer.train(
        input=",".join(str(text / f"train.{lang}") for lang in LANGS),
        model_prefix=str(root / "spm"), model_type="word", vocab_size=64,
        hard_vocab_limit=False, minloglevel=2)
    data = root / "bin"
    data.mkdir()
    for lang in LANGS:
        lines = (tiny_data / f"dict.{lang}.txt").read_text().splitlines(keepends=True)
        (data / f"dict.{lang}.txt").write_text("".join("\u2581" + line for line in lines))
    model = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    assert model.encode("e7 e3", out_type=str) == ["\u2581e7", "\u2581e3"]
    return root / "spm.model", data


@pytest.fixture(scope="module")
def package(trained_tiny, spm_data, tmp_path_factory):
    """en-fr as an .argosmodel (float32, so that it compares exactly with a CT2 export)."""
    spm_model, data = spm_data
    out = tmp_path_factory.mktemp("argos-package") / "en-fr.argosmodel"
    code, err = export(trained_tiny, "--lang-pair", PAIR, "--format", "argos", "--output", out,
                       "--data", data, "--spm-model", spm_model, "--quantization", "float32")
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def unpacked(package, tmp_path_factory):
    where = tmp_path_factory.mktemp("argos-unpacked")
    with zipfile.ZipFile(package) as z:
        z.extractall(where)
    return where / TOP


@pytest.fixture(scope="module")
def ct2_export(trained_tiny, spm_data, tmp_path_factory):
    """The same pair through `--format ctranslate2`: our own engine's model."""
    from fairseq_taskmoe.ct2 import load_ct2_translator

    spm_model, data = spm_data
    out = tmp_path_factory.mktemp("argos-ct2") / "en-fr.ct2"
    code, err = export(trained_tiny, "--lang-pair", PAIR, "--format", "ctranslate2", "--output",
                       out, "--data", data, "--spm-model", spm_model, "--quantization", "float32")
    assert code == 0, err
    return load_ct2_translator(out, intra_threads=1)


def held_out(tiny_data):
    return (tiny_data.parent / "text" / "test.en").read_text().splitlines()


def test_package_layout_and_metadata(package, unpacked, spm_data):
    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())
    assert {f"{TOP}/{f}" for f in ("metadata.json", "sentencepiece.model", "README.md",
                                   "model/model.bin", "model/config.json")} <= names
    assert all(n.startswith(TOP + "/") for n in names), "one top folder, as Argos installs it"
    meta = json.loads((unpacked / "metadata.json").read_text())
    assert meta == {"package_version": "1.0", "argos_version": "1.11", "type": "translate",
                    "from_code": "en", "from_name": "English", "to_code": "fr",
                    "to_name": "French", "target_prefix": "__fr__"}
    # the source token (--encoder-langtok tgt) is added by CTranslate2 itself
    config = json.loads((unpacked / "model" / "config.json").read_text())
    assert config["add_source_bos"] is True and config["bos_token"] == "__fr__"
    assert config["decoder_start_token"] == config["eos_token"] == "</s>"
    assert config["add_source_eos"] is True
    info = json.loads((unpacked / "taskmoe_export.json").read_text())
    assert info["lang_pair"] == PAIR and info["serves"] == ["*-fr"]
    assert info["argos_source_bos"] == info["argos_target_prefix"] == "__fr__"
    readme = (unpacked / "README.md").read_text()
    assert "__fr__" in readme and "(en-fr)" in readme
    if (unpacked / "spacy").exists():  # spaCy importable here: a blank pipeline, no splitter
        assert json.loads((unpacked / "spacy" / "meta.json").read_text())["pipeline"] == []
        assert "ARGOS_CHUNK_TYPE=SPACY" in readme


def test_target_token_is_a_control_piece_that_decodes_to_nothing(unpacked, spm_data, tiny_data):
    """Argos decodes `decode_pieces(tokens).replace("_", " ")` with the forced prefix still in
    the tokens; with the plain model `__fr__` would come back as text."""
    import sentencepiece as spm

    plain = spm.SentencePieceProcessor(model_file=str(spm_data[0]))
    packaged = spm.SentencePieceProcessor(model_file=str(unpacked / "sentencepiece.model"))
    texts = [line for lang in LANGS
             for line in (tiny_data.parent / "text" / f"test.{lang}").read_text().splitlines()]
    assert [packaged.encode(t, out_type=str) for t in texts] == \
        [plain.encode(t, out_type=str) for t in texts]
    tokens = ["__fr__", "\u2581f3", "\u2581f7", "__fr__", "\u2581f1"]  # two sentences, as Argos
    assert plain.decode_pieces(tokens) == "__fr__ f3 f7__fr__ f1"  # what Argos 1.11 would show
    assert packaged.decode_pieces(tokens) == "f3 f7 f1"
    assert packaged.is_control(packaged.piece_to_id("__fr__"))


def test_model_adds_the_source_token_as_our_export_prefixes_it(unpacked, ct2_export, tiny_data):
    """CTranslate2 with add_source_bos (the package) = our CTranslate2 export with `__fr__`
    before the pieces: the same hypotheses and scores, every sentence."""
    import ctranslate2

    pieces = [ct2_export.encode(s) for s in held_out(tiny_data)]
    assert ct2_export.source_prefix() == ["__fr__"]
    ours = ct2_export.translator.translate_batch(
        [["__fr__"] + p for p in pieces], target_prefix=[["__fr__"]] * len(pieces),
        beam_size=4, return_scores=True)
    packaged = ctranslate2.Translator(str(unpacked / "model"), intra_threads=1).translate_batch(
        pieces, target_prefix=[["__fr__"]] * len(pieces), beam_size=4, return_scores=True)
    assert [r.hypotheses[0] for r in packaged] == [r.hypotheses[0] for r in ours]
    assert [r.scores[0] for r in packaged] == pytest.approx([r.scores[0] for r in ours],
                                                            abs=1e-6)
    assert sum(1 for r in ours if len(r.hypotheses[0]) > 2) >= 20, "the model really translates"
    # without the token the model translates differently: the config is what adds it
    bare = ct2_export.translator.translate_batch(pieces, target_prefix=[["__fr__"]] * len(pieces),
                                                 beam_size=4, return_scores=True)
    assert [r.scores[0] for r in bare] != pytest.approx([r.scores[0] for r in ours], abs=1e-6)


def _fails(args, message):
    code, err = export(*args)
    assert code == 2, err
    assert message in err, err


def test_refusals_write_nothing_and_keep_files(trained_tiny, spm_data, tmp_path):
    spm_model, data = spm_data
    out = tmp_path / "en-fr.argosmodel"
    base = [trained_tiny, "--format", "argos", "--data", data]
    _fails([*base, "--lang-pair", PAIR, "-o", out], "needs --spm-model")
    _fails([*base, "--spm-model", spm_model, "-o", out], "--lang-pair SRC-TGT and --output are "
           "required (or --all-pairs DIR)")
    _fails([*base, "--spm-model", spm_model, "--lang-pair", PAIR, "-o", out, "--all-pairs",
            tmp_path], "give it instead of --lang-pair and --output")
    _fails([*base, "--spm-model", spm_model, "--lang-pair", PAIR, "-o", tmp_path, "--force"],
           "is a directory; --format argos writes one .argosmodel file")
    _fails([trained_tiny, "--format", "ctranslate2", "--lang-pair", PAIR, "-o", out,
            "--package-version", "2.0"], "--package-version applies to --format argos only")
    _fails([trained_tiny, "--format", "fairseq", "--lang-pair", PAIR, "-o", out,
            "--all-pairs", tmp_path], "--all-pairs applies to --format argos only")
    # a spaCy pipeline that already splits sentences would make Argos's add_pipe fail
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "config.cfg").write_text("[nlp]\n")
    (pipeline / "meta.json").write_text(json.dumps({"pipeline": ["sentencizer"]}))
    _fails([*base, "--spm-model", spm_model, "--lang-pair", PAIR, "-o", out,
            "--spacy-pipeline", pipeline], "has a `sentencizer` already")
    _fails([*base, "--spm-model", spm_model, "--lang-pair", PAIR, "-o", out,
            "--spacy-pipeline", tmp_path / "nothing"], "is not a folder")
    assert not out.exists()
    # an existing file is kept without --force, replaced with it
    out.write_bytes(b"keep me")
    _fails([*base, "--spm-model", spm_model, "--lang-pair", PAIR, "-o", out], "pass --force")
    assert out.read_bytes() == b"keep me"
    code, err = export(*base, "--spm-model", spm_model, "--lang-pair", PAIR, "-o", out, "--force",
                       "--quantization", "int8")
    assert code == 0, err
    assert zipfile.is_zipfile(out)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "no temporary file or folder left behind"


def test_all_pairs_writes_one_package_per_trained_pair(trained_tiny, spm_data, tmp_path):
    spm_model, data = spm_data
    out = tmp_path / "packages"
    code, err = export(trained_tiny, "--all-pairs", out, "--format", "argos", "--data", data,
                       "--spm-model", spm_model, "--quantization", "int8")
    assert code == 0, err
    want = {f"taskmoe-{p.replace('-', '_')}.argosmodel": p for p in PAIRS}
    assert set(os.listdir(out)) == set(want)
    for name, pair in want.items():
        with zipfile.ZipFile(out / name) as z:
            meta = json.loads(z.read(f"{name[:-len('.argosmodel')]}/metadata.json"))
        src, tgt = pair.split("-")
        assert (meta["from_code"], meta["to_code"], meta["target_prefix"]) == \
            (src, tgt, f"__{tgt}__")
    _fails([trained_tiny, "--all-pairs", out, "--format", "argos", "--data", data,
            "--spm-model", spm_model], "exists; pass --force")


@pytest.mark.slow
@pytest.mark.skipif(not ARGOS_PYTHON.exists(),
                    reason="needs Argos Translate's own virtualenv: make argos-venv")
def test_argostranslate_installs_the_package_and_translates_offline(
        trained_tiny, spm_data, ct2_export, tiny_data, tmp_path):
    """Unchanged argostranslate 1.11 (its own virtualenv) installs the package with
    package.install_from_path into fresh folders and translates the held-out sentences, every
    network connection refused: the same text as our CTranslate2 engine with Argos's decoding
    options and the package's weight type, one sentence per call as Argos translates them."""
    spm_model, data = spm_data

    def argos(*args, stdin=None, env=None):
        proc = subprocess.run([str(ARGOS_PYTHON), str(Path(__file__).parent / "argos_offline.py"),
                               *map(str, args)], input=stdin, capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    # the blank spaCy pipeline, made by the Argos environment's spaCy when ours has none
    argos("blank-spacy", "en", tmp_path / "spacy-en")
    out = tmp_path / "en-fr.argosmodel"
    code, err = export(trained_tiny, "--lang-pair", PAIR, "--format", "argos", "--output", out,
                       "--data", data, "--spm-model", spm_model, "--quantization", "float32",
                       "--spacy-pipeline", tmp_path / "spacy-en")
    assert code == 0, err

    home = tmp_path / "home"
    # Argos 1.11 under ARGOS_CHUNK_TYPE=SPACY tries to download spaCy's xx_sent_ud_sm when it
    # starts unless this folder exists; the package's own spacy/ is what it then loads
    (home / "cache" / "argos-translate" / "spacy" / "senter" / "model").mkdir(parents=True)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home),
           "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_CACHE_HOME": str(home / "cache"), "ARGOS_PACKAGES_DIR": str(home / "packages"),
           "ARGOS_CHUNK_TYPE": "SPACY", "ARGOS_INTRA_THREADS": "1", "ARGOS_DEVICE_TYPE": "cpu",
           # Argos 1.11's default, "auto", is CTranslate2's fastest type: int8 on a CPU, also
           # for this float32 package; "default" keeps the type the package was exported in
           "ARGOS_COMPUTE_TYPE": "default"}
    sentences = held_out(tiny_data)
    paragraph = f"{sentences[0]}\n{sentences[1]}"  # Argos translates paragraphs apart
    got = argos("translate", out, "en", "fr", stdin=json.dumps(sentences + [paragraph]),
                env=env)
    assert got["connections"] == [], "the package must work with no network"
    assert [p[:2] for p in got["installed"]] == [["en", "fr"]]
    assert got["installed"][0][2] == str(home / "packages" / TOP)

    ours = [ct2_export.translate(s, **ARGOS_OPTIONS) for s in sentences]
    assert got["translations"][:-1] == ours
    assert got["translations"][-1] == f"{ours[0]}\n{ours[1]}"
    assert not any("fr" in t.split() or "__" in t for t in got["translations"])
    assert sum(1 for t in ours if t) >= 20, "the model really translates"
