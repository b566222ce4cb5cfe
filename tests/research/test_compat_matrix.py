"""research/compat_matrix.py's pure parts: the one list of requests (what it covers, every
listed or fixed difference naming a case of it), the placeholders, the summaries of answers, the
verdicts, the table and the docs markers. Both servers are run on the tiny model in
tests/test_libretranslate.py (slow, with .venv-lt)."""

import json

import pytest

from research import compat_matrix as cm

PAIRS = [("en", "de"), ("de", "en"), ("en", "fr")]
SENTENCES = {lang: [f"{lang[0]}{i} {lang[0]}{i + 1}" for i in range(10)]
             for lang in ("en", "de", "fr")}


@pytest.fixture
def ctx():
    return cm.context(["de", "en", "fr"], PAIRS, SENTENCES)


def test_the_list_covers_what_the_issue_asks():
    ids = [c.id for c in cm.CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    assert any(c.json is not None for c in cm.CASES) and any(c.form for c in cm.CASES)
    assert any(c.multipart for c in cm.CASES) and any(c.params and c.json is None and
                                                      c.form is None and c.raw is None
                                                      for c in cm.CASES)
    bodies = json.dumps([c.json for c in cm.CASES if c.json is not None])
    for needle in ('"auto"', '"html"', '"alternatives"', '"zz"', '"{texts2}"', '"{long}"',
                   '"{over_batch}"', '"api_key"'):
        assert needle in bodies, needle
    paths = {(c.method, c.path) for c in cm.CASES}
    assert {("GET", "/languages"), ("POST", "/detect"), ("GET", "/frontend/settings"),
            ("GET", "/v2/translate"), ("GET", "/translate"), ("POST", "/languages")} <= paths
    assert any(c.raw and "source" in c.raw and c.content_type == "application/json"
               for c in cm.CASES), "bad JSON"
    assert sum(1 for c in cm.CASES if c.config == "keys") >= 8
    # every fixed or kept difference is one of the cases, and none is both
    assert set(cm.FIXED) <= set(ids) and set(cm.DIFFERENCES) <= set(ids)
    assert not set(cm.FIXED) & set(cm.DIFFERENCES)


def test_context_fills_pairs_texts_and_limits(ctx):
    assert (ctx["src"], ctx["tgt"], ctx["SRC"]) == ("en", "de", "EN")
    assert (ctx["pivot_src"], ctx["pivot_tgt"]) == ("de", "fr")  # de-en + en-fr
    assert ctx["nosrc"] == "fr"  # no package from fr
    assert len(ctx["long"]) > cm.CHAR_LIMIT
    assert all(len(t) <= cm.CHAR_LIMIT for t in ctx["two_thirds2"])
    assert sum(len(t) for t in ctx["two_thirds2"]) > cm.CHAR_LIMIT
    assert len(ctx["over_batch"]) == cm.BATCH_LIMIT + 1
    assert len(ctx["huge"]) > 1 << 20
    every_source = cm.context(["de", "en"], [("en", "de"), ("de", "en")], SENTENCES)
    assert "nosrc" not in every_source and "pivot_src" not in every_source


def test_fill_and_the_http_request(ctx):
    assert cm.fill({"q": "{texts2}", "x": ["{src}-{tgt}", 5]}, ctx) == \
        {"q": ["e1 e2", "e2 e3"], "x": ["en-de", 5]}
    case = cm.Case("t", "t", params={"api_key": "k"}, form={"q": "{text}", "source": "{SRC}"})
    req = cm.http_request(case, ctx)
    assert req == {"method": "POST", "url": "/translate", "headers": {},
                   "params": {"api_key": "k"}, "data": {"q": "e0 e1", "source": "EN"}}
    raw = cm.http_request(cm.Case("r", "r", raw="\ufeff{json_body}",
                                  content_type="application/json"), ctx)
    assert raw["content"].startswith(b"\xef\xbb\xbf{") and \
        json.loads(raw["content"].decode("utf-8-sig"))["q"] == "e0 e1"
    assert raw["headers"]["Content-Type"] == "application/json"
    multipart = cm.http_request(cm.Case("m", "m", multipart={"q": "{text}"}), ctx)
    assert multipart["files"] == [("q", (None, "e0 e1"))]
    assert len(cm.shown(cm.Case("j", "j", json={"q": "{huge}"}), ctx)) <= 90


def test_summaries_leave_out_our_fields_and_keep_types():
    def answer(doc, status=200, ctype="application/json", value=None):
        return cm.summarize(status, {"content-type": ctype}, json.dumps(doc).encode(), value)

    ours = answer({"translatedText": ["a"], "route": {"kind": "direct"}})
    assert ours["keys"] == ["translatedText:list"] and ours["text"] == ["a"]
    err = answer({"error": "zz is not supported", "hint": "..."}, 400)
    assert err["keys"] == ["error:str"] and err["error"] == "zz is not supported"
    langs = answer([{"code": "en", "name": "English", "targets": ["de"], "routes": {}}],
                   value="targets")
    assert langs["keys"] == ["[code:str,name:str,targets:list]"]
    assert langs["value"] == {"en": ["de"]}
    assert answer([])["keys"] == ["[]"]
    html = cm.summarize(404, {"content-type": "text/html; charset=utf-8"}, b"<html>", None)
    assert html["keys"] == "(text/html)" and html["error"] is None
    cors = cm.summarize(200, {"content-type": "text/plain", "access-control-allow-origin": "*"},
                        b"", "cors")
    assert cors["keys"] == "(no body)" and cors["value"] == {"access-control-allow-origin": "*"}


def test_verdicts():
    assert cm.differences({"status": 400, "keys": 1, "error": "a", "value": None},
                          {"status": 403, "keys": 1, "error": "b", "value": None}) == \
        ["status", "error"]
    assert cm.verdict("json", []) == ("same", "")
    assert cm.verdict("uppercase-codes", [])[0] == "fixed"
    assert cm.verdict("q-number", ["status"])[0] == "listed"
    assert cm.verdict("q-number", [])[0] == "STALE"
    assert cm.verdict("json", ["keys"]) == ("UNLISTED", "differs (keys) and is listed nowhere")


def test_table_notes_and_docs_markers(tmp_path):
    same = {"status": 200, "keys": ["translatedText:str"], "error": None, "value": None}
    other = {**same, "status": 500, "keys": ["error:str"], "error": "a|b"}
    rows = [{"id": "json", "what": "JSON body", "config": "open", "request": "POST /translate",
             "libretranslate": same, "taskmoe_serve": same, "verdict": "same", "note": ""},
            {"id": "q-number", "what": "q a number", "config": "keys", "request": "POST x",
             "libretranslate": other, "taskmoe_serve": same, "verdict": "listed",
             "note": cm.DIFFERENCES["q-number"]}]
    text = cm.table(rows)
    assert text.count("\n") == 3 and "differs, kept" in text and "a\\|b" in text
    assert "(keys)" in text.splitlines()[3]
    assert "Kept, with the reason" in cm.notes(rows) and "`q-number`" in cm.notes(rows)
    doc = tmp_path / "serving.md"
    doc.write_text(f"# x\n\n{cm.DOCS_BEGIN}\nold\n{cm.DOCS_END}\n\nafter\n")
    cm.replace_in_docs(doc, "new table\n")
    assert doc.read_text() == f"# x\n\n{cm.DOCS_BEGIN}\nnew table\n{cm.DOCS_END}\n\nafter\n"
    doc.write_text("no markers")
    with pytest.raises(SystemExit, match="has no"):
        cm.replace_in_docs(doc, "t")
