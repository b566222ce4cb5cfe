"""The real LibreTranslate 1.9.6, unchanged, serving our Argos packages offline (issue 29).

research/libretranslate.py installs the tiny task-MoE's three packages (en-de, de-en, en-fr, as
tests/test_export_argos.py exports them: its SentencePiece model and dictionaries) with Argos's
own install_from_path into a private folder, starts `libretranslate` on 127.0.0.1 from .venv-lt
(`make lt-venv`; the slow test is skipped without it), and this test translates through its HTTP
API: the same text as our CTranslate2 engine with Argos's decoding options, nothing reached over
the network, the process group gone after stop(). The package checks need no LibreTranslate."""

import importlib.util
import os
import zipfile

import pytest

from research import libretranslate as lt
from test_export import export
from test_export_argos import ARGOS_OPTIONS, ct2_export, held_out, spm_data  # noqa: F401
from tiny_data import PAIRS

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("ctranslate2", "sentencepiece", "spacy")),
    reason="needs ctranslate2, sentencepiece and spacy (make venv installs them)")


@pytest.fixture(scope="module")
def packages(trained_tiny, spm_data, tmp_path_factory):  # noqa: F811 (spm_data: a fixture)
    """The tiny model's trained pairs as .argosmodel files (float32, a blank spaCy pipeline
    each: .venv has spaCy), in one folder."""
    spm_model, data = spm_data
    out = tmp_path_factory.mktemp("lt-packages") / "argos"
    code, err = export(trained_tiny, "--all-pairs", out, "--format", "argos", "--data", data,
                       "--spm-model", spm_model, "--quantization", "float32")
    assert code == 0, err
    return out


def test_package_folder_checks(packages, tmp_path):
    files = lt.package_files(packages)
    assert sorted(lt.package_languages(files)) == sorted(tuple(p.split("-")) for p in PAIRS)
    one = tmp_path / "one"
    one.mkdir()
    os.link(files[0], one / files[0].name)
    with pytest.raises(ValueError, match="needs at least 2 installed packages, else it "
                                         "downloads"):
        lt.package_files(one)
    # a package without spacy/: refused, its default splitter would download
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in files:
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(bare / path.name, "w") as dst:
            for item in src.infolist():
                if item.filename.split("/")[1:2] != ["spacy"]:
                    dst.writestr(item, src.read(item))
    with pytest.raises(ValueError, match="has no spacy/ pipeline"):
        lt.package_files(bare)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "old").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        lt.prepare_home(tmp_path / "home", True)


def test_environment_is_private_and_offline(tmp_path):
    env = lt.environment(tmp_path, {"ARGOS_INTRA_THREADS": 1})
    assert env["ARGOS_PACKAGES_DIR"] == str(tmp_path / "packages")
    assert env["ARGOS_CHUNK_TYPE"] == "SPACY" and env["ARGOS_INTRA_THREADS"] == "1"
    assert all(env[k].startswith(str(tmp_path)) for k in
               ("HOME", "TMPDIR", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"))
    assert not any(k.startswith("LT_") for k in env), "no LT_* variable may turn updates on"


@pytest.mark.slow
@pytest.mark.skipif(lt.unavailable() is not None, reason=lt.unavailable() or "")
def test_libretranslate_serves_our_packages_offline(packages, ct2_export, tiny_data,  # noqa: F811
                                                    tmp_path):
    """Unchanged LibreTranslate 1.9.6 on the three packages: /languages lists them, /translate
    en-fr gives our CTranslate2 engine's text with Argos's options for every held-out
    sentence (one request, q an array; LibreTranslate returns the source where a translation
    is empty, its improve_translation_formatting), the pivot de-fr (through en, its own) is
    served, no connection left the machine, and stop() ends the process group."""
    sentences = held_out(tiny_data)
    with lt.running_libretranslate(packages, tmp_path / "lt") as server:
        assert 0 < server.startup_s < 180 and server.install_s is not None
        print(f"LibreTranslate started in {server.startup_s} s (packages installed in "
              f"{server.install_s} s): {server.argv}")
        assert sorted((p["from"], p["to"]) for p in server.installed) == \
            sorted(tuple(p.split("-")) for p in PAIRS)
        assert all(p["path"].startswith(str(tmp_path / "lt" / "packages"))
                   for p in server.installed)
        languages = {x["code"]: x for x in httpx.get(server.url + "/languages").json()}
        # its targets: every language reached through installed packages, pivots through en
        # and the language itself included (fr was never a source: only itself)
        assert {code: x["targets"] for code, x in languages.items()} == {
            "en": ["de", "en", "fr"], "de": ["de", "en", "fr"], "fr": ["fr"]}
        answer = httpx.post(server.url + "/translate", timeout=120,
                            json={"q": sentences, "source": "en", "target": "fr"})
        assert answer.status_code == 200, answer.text
        got = answer.json()["translatedText"]
        ours = [ct2_export.translate(s, **ARGOS_OPTIONS) for s in sentences]
        assert got == [t if t else s for s, t in zip(sentences, ours)]
        assert sum(1 for t in ours if t) >= 20, "the model really translates"
        one = httpx.post(server.url + "/translate", timeout=60,
                         data={"q": sentences[0], "source": "en", "target": "fr"}).json()
        assert one == {"translatedText": got[0]}
        pivot = httpx.post(server.url + "/translate", timeout=60,
                           json={"q": "d1 d2 d3", "source": "de", "target": "fr"})
        assert pivot.status_code == 200 and isinstance(pivot.json()["translatedText"], str)
        assert server.connections() == [], "LibreTranslate must work with no network"
        pid = server.proc.pid
    assert server.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole group it was started in is gone
    log = server.log_tail()
    assert "Updating language models" not in log and "Downloading" not in log, log


@pytest.mark.slow
@pytest.mark.skipif(lt.unavailable() is not None, reason=lt.unavailable() or "")
def test_compatibility_matrix_on_the_tiny_model(trained_tiny, spm_data, packages,  # noqa: F811
                                                tiny_data, tmp_path):
    """research/compat_matrix.py's run: every case sent to LibreTranslate and to taskmoe-serve
    (both configurations, open and with keys); each difference fixed or listed with its reason,
    none listed that is the same now."""
    from research import compat_matrix as cm

    spm_model, data = spm_data
    result = cm.run_matrix(trained_tiny, data, spm_model, tiny_data.parent / "text", packages,
                           tmp_path / "work", quantization="float32", log=lambda msg: None)
    rows = {r["id"]: r for r in result["rows"]}
    assert len(rows) == len(cm.CASES) >= 40 and not result["not_applicable"]
    bad = {i: r["note"] for i, r in rows.items() if r["verdict"] in ("UNLISTED", "STALE")}
    assert not bad, bad
    assert {i for i, r in rows.items() if r["verdict"] == "fixed"} == set(cm.FIXED)
    assert rows["keys-slow-3"]["taskmoe_serve"]["status"] == 429
    assert rows["json"]["libretranslate"]["status"] == 200
    assert all(s.get("connections") == [] for name, s in result["servers"].items()
               if name.startswith("libretranslate"))
