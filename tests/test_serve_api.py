"""taskmoe-serve's HTTP edges and LibreTranslate compatibility (issue 26): CORS, fields in the
query string (deep-translator's request), `alternatives` as LibreTranslate reads them, JSON with a
byte order mark or nested too deeply, an oversized body answered 413 to clients that send it
whole, readiness in /health, HTML kept byte for byte, malformed keys files.

HTTP tests talk to the real app under uvicorn on 127.0.0.1 (test_serve.py's `serving`), on the
tiny trained task-MoE of conftest.py (en, de, fr; trained en-de, de-en, en-fr)."""

import http.client
import json
import random
import urllib.error
import urllib.parse
import urllib.request

import pytest

from test_serve import base_args, post, serving

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

BODY_LIMIT = 64 << 10


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-api-cache")


@pytest.fixture(scope="module")
def server(trained_tiny, tiny_data, cache_dir):
    pytest.importorskip("ctranslate2")
    with serving(base_args(trained_tiny, tiny_data, cache_dir, "--quantization", "float32",
                           "--max-wait-ms", "5", "--body-limit", "64KB")) as (url, service):
        yield url, service


def translate_json(url, **fields):
    answer = post(url, "/translate", json=fields)
    assert answer.status_code == 200, answer.text
    return answer.json()


# --- item 11: HTML byte for byte, never an error (no model) -------------------------------------

HTML_ALPHABET = list("<>!/[]&;#x -=?\"'\n") + list("abcdefghijklmnopqrstuvwxyz") + [
    "<!--", "-->", "<![CDATA[", "]]>", "<![", "<script>", "</SCRIPT>", "<style>", "&amp;",
    "&#x41;", "&#65;", "&nbsp;", "&notit;", "<p>", "</P>", '<a href="', "<br/>", "<!DOCTYPE"]


def test_html_identity_rebuild_is_byte_for_byte_for_any_string():
    from fairseq_taskmoe.serve.text import html_fragments, html_rebuild, html_texts

    rng = random.Random(26)
    for _ in range(5000):
        doc = "".join(rng.choice(HTML_ALPHABET) for _ in range(rng.randint(0, 40)))
        parts = html_fragments(doc)
        assert html_rebuild(parts, html_texts(parts)) == doc, doc
    # the cases of the issue, each once
    for doc in ("<![CDATA[x]]>", "<P>Hi</P>", "<DIV CLASS=a>x</DIV >", "&nbsp;&amp;<b>x</b>",
                "<![ e1", "a < b &gt; c", "&#x41;BC <br/>"):
        parts = html_fragments(doc)
        assert html_rebuild(parts, html_texts(parts)) == doc


def test_html_translation_replaces_only_the_texts():
    from fairseq_taskmoe.serve.text import html_fragments, html_rebuild, html_texts

    doc = ('<!DOCTYPE html><P CLASS="a">Hi &amp; bye</P>&nbsp;<![CDATA[no]]>'
           '<B title=\'x>y\'> &nbsp;two&nbsp; </B><SCRIPT>if (a<b) x</SCRIPT><!-- c -->')
    parts = html_fragments(doc)
    assert html_texts(parts) == ["Hi & bye", "two"]
    assert html_rebuild(parts, ["A < B", "TWO"]) == (
        '<!DOCTYPE html><P CLASS="a">A &lt; B</P>&nbsp;<![CDATA[no]]>'
        "<B title='x>y'> &nbsp;TWO&nbsp; </B><SCRIPT>if (a<b) x</SCRIPT><!-- c -->")


def test_html_requests_never_fail_and_keep_the_markup(server):
    url, _ = server
    plain = translate_json(url, q="e1 e2", source="en", target="de")["translatedText"]
    for doc in ("<![ e1", "<![CDATA[x]]>", "&nbsp;&amp;"):
        answer = translate_json(url, q=doc, source="en", target="de", format="html")
        assert answer["translatedText"] == doc  # nothing to translate: kept as written
    answer = translate_json(url, q="<![CDATA[x]]><P>e1 e2</P>&nbsp;", source="en",
                            target="de", format="html")
    assert answer["translatedText"] == f"<![CDATA[x]]><P>{plain}</P>&nbsp;"


# --- item 10: LibreTranslate compatibility -------------------------------------------------------

def test_cors_headers_and_preflight(server):
    url, _ = server
    origin = {"Origin": "https://example.org"}
    answer = httpx.get(url + "/languages", headers=origin)
    assert answer.headers["access-control-allow-origin"] == "*"
    error = post(url, "/translate", json={"q": "e1"}, headers=origin)
    assert error.status_code == 400 and error.headers["access-control-allow-origin"] == "*"
    preflight = httpx.options(url + "/translate", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()


def test_fields_in_the_query_string_as_flask_reads_them(server):
    url, _ = server
    want = translate_json(url, q="e1 e2", source="en", target="de")
    fields = {"q": "e1 e2", "source": "en", "target": "de"}
    assert post(url, "/translate", params=fields).json() == want  # no body at all
    # query string and form body together; Flask's request.values gives the query string first
    both = post(url, "/translate", params={"target": "de"},
                data={"q": "e1 e2", "source": "en", "target": "fr"})
    assert both.json() == want
    multipart = post(url, "/translate", params={"source": "en", "target": "de"},
                     files={"q": (None, "e1 e2")})
    assert multipart.json() == want
    detect = post(url, "/detect", params={"q": "der Mann und die Frau"}).json()
    assert detect[0]["language"] == "de"
    # a JSON body is read alone, as LibreTranslate does
    only_json = post(url, "/translate", params={"target": "de"},
                     json={"q": "e1 e2", "source": "en", "target": "fr"})
    assert only_json.json() == translate_json(url, q="e1 e2", source="en", target="fr")
    bad = post(url, "/translate?q=%FF&source=en&target=de")
    assert bad.status_code == 400 and "query string is not valid UTF-8" in bad.json()["error"]


def test_deep_translators_request_with_an_api_key(trained_tiny, tiny_data, cache_dir, tmp_path):
    """deep_translator/libre.py: requests.post(base_url + "translate", params={q, source,
    target, format: text, api_key}): a POST with the fields in the query string and no body.
    Sent here byte for byte as requests sends it (its default headers, Content-Length: 0)."""
    pytest.importorskip("ctranslate2")
    (tmp_path / "keys.txt").write_text("secret 100\n")
    with serving(base_args(trained_tiny, tiny_data, cache_dir, "--quantization", "float32",
                           "--api-keys", tmp_path / "keys.txt")) as (url, _):
        params = {"q": "e1 e2", "source": "en", "target": "de", "format": "text",
                  "api_key": "secret"}
        want = translate_json(url, **params)
        host, port = url.removeprefix("http://").split(":")

        def deep_translator(params):
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.putrequest("POST", "/translate?" + urllib.parse.urlencode(params),
                            skip_accept_encoding=True)
            for name, value in (("User-Agent", "python-requests/2.32.3"),
                                ("Accept-Encoding", "gzip, deflate"), ("Accept", "*/*"),
                                ("Connection", "keep-alive"), ("Content-Length", "0")):
                conn.putheader(name, value)
            conn.endheaders()
            answer = conn.getresponse()
            status, body = answer.status, json.loads(answer.read())
            conn.close()
            return status, body

        assert deep_translator(params) == (200, want)
        assert deep_translator({**params, "api_key": "wrong"})[0] == 403
        status, body = deep_translator({k: v for k, v in params.items() if k != "api_key"})
        assert status == 403 and "api_key" in body["error"]


def test_alternatives_as_libretranslate_reads_them(server, monkeypatch):
    url, service = server
    base = {"q": "e1 e2", "source": "en", "target": "de"}
    negative = translate_json(url, **base, alternatives=-1)
    assert "alternatives" not in negative  # clamped to 0
    two = translate_json(url, **base, alternatives=2.0)
    assert isinstance(two["alternatives"], list) and len(two["alternatives"]) <= 2
    over = post(url, "/translate", json={**base, "alternatives": 4})
    assert over.status_code == 400
    assert over.json()["error"] == "Invalid request: alternatives parameter must be <= 3"
    for value in ("abc", "2.5"):  # a form field is int()ed as LibreTranslate does
        bad = post(url, "/translate", data={**base, "alternatives": value})
        assert bad.json()["error"] == "Invalid request: alternatives parameter is not a number"
    # duplicates, empties and the translation itself are removed from what the service returns
    route = service.route("en", "de")

    async def repeating(texts, *args, **kwargs):
        return ["a" for _ in texts], [["a", "b", "", "b", "c"] for _ in texts], route

    monkeypatch.setattr(service, "translate", repeating)
    assert translate_json(url, **base, alternatives=3)["alternatives"] == ["b", "c"]
    batch = translate_json(url, **{**base, "q": ["x", "y"]}, alternatives=3)
    assert batch["alternatives"] == [["b", "c"], ["b", "c"]]


def test_unique_alternatives():
    from fairseq_taskmoe.serve.app import unique_alternatives

    assert unique_alternatives("a", ["a", "b", "", "b", "c", "a"]) == ["b", "c"]
    assert unique_alternatives("a", []) == []


def test_json_with_a_byte_order_mark_is_read(server):
    url, _ = server
    want = translate_json(url, q="e1 e2", source="en", target="de")
    body = b"\xef\xbb\xbf" + json.dumps({"q": "e1 e2", "source": "en", "target": "de"}).encode()
    answer = post(url, "/translate", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == want


def test_frontend_settings_and_detect_offer_only_what_is_served(server):
    url, _ = server
    settings = httpx.get(url + "/frontend/settings").json()
    assert settings["frontendTimeout"] == 500  # LibreTranslate's default
    czech = post(url, "/detect", data={"q": "Muž a žena před domem, malý pes"}).json()
    assert czech and all(d["language"] in ("en", "de", "fr") for d in czech), czech


# --- issue 29: what the compatibility matrix with LibreTranslate 1.9.6 fixed ---------------------
# (research/compat_matrix.py sends the same requests to the real LibreTranslate; docs/serving.md)

def test_language_codes_are_case_insensitive_as_libretranslate_lowercases_them(server):
    url, _ = server
    want = translate_json(url, q="e1 e2", source="en", target="de")
    assert translate_json(url, q="e1 e2", source="EN", target="De") == want
    auto = translate_json(url, q="the man and the dog", source="AUTO", target="DE")
    assert auto["detectedLanguage"]["language"] == "en"
    assert post(url, "/translate", data={"q": "e1 e2", "source": "En", "target": "dE"}).json() \
        == want
    unknown = post(url, "/translate", json={"q": "e1", "source": "ZZ", "target": "de"})
    assert unknown.status_code == 400 and unknown.json()["error"] == "ZZ is not supported"


def test_a_body_of_another_content_type_is_not_read_the_query_string_is(server):
    """Flask's request.values (LibreTranslate) reads the query string and a form, nothing else:
    a text/plain body (what fetch() sends with a string body) is ignored, not refused."""
    url, _ = server
    want = translate_json(url, q="e1 e2", source="en", target="de")
    fields = {"q": "e1 e2", "source": "en", "target": "de"}
    for ctype in ("text/plain;charset=UTF-8", "application/xml", ""):
        answer = post(url, "/translate", params=fields, content=b"ignored",
                      headers={"Content-Type": ctype})
        assert answer.status_code == 200 and answer.json() == want, (ctype, answer.text)
    body = json.dumps(fields).encode()  # JSON sent as text/plain: not read
    answer = post(url, "/translate", content=body, headers={"Content-Type": "text/plain"})
    assert answer.status_code == 400
    assert answer.json()["error"] == "Invalid request: missing q parameter"
    assert "the body (text/plain) was not read" in answer.json()["hint"]
    detect = post(url, "/detect", params={"q": "der Mann und die Frau"}, content=b"x",
                  headers={"Content-Type": "text/plain"})
    assert detect.json()[0]["language"] == "de"


def test_detect_without_evidence_answers_one_candidate_at_confidence_0(server):
    """LibreTranslate answers [{"confidence": 0.0, "language": "en"}] for text it cannot
    detect; clients read detections[0] (libretranslatepy's users do)."""
    url, _ = server
    for q in ("12345 67890", "😀"):
        answer = post(url, "/detect", json={"q": q})
        assert answer.status_code == 200 and answer.json() == \
            [{"confidence": 0.0, "language": "en"}]
    # source=auto still refuses to translate from a guess
    auto = post(url, "/translate", json={"q": "12345", "source": "auto", "target": "de"})
    assert auto.status_code == 400 and "could not detect" in auto.json()["error"]


def test_limit_messages_use_libretranslates_wording(server):
    url, service = server
    texts = ["e1"] * (service.limits.batch_limit + 1)
    over = post(url, "/translate", json={"q": texts, "source": "en", "target": "de"})
    assert over.status_code == 400 and over.json()["error"] == \
        f"Invalid request: request ({len(texts)}) exceeds text limit " \
        f"({service.limits.batch_limit})"


# --- item 13: readiness -------------------------------------------------------------------------

def test_health_says_whether_any_pair_can_be_served(server):
    url, service = server
    reg = service.registry
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert httpx.get(url + "/health/ready").status_code == 200
    subs = {reg.key_of(leg): reg.subnetwork(reg.key_of(leg))
            for route in service.routes.values() if route.available for leg in route.legs}
    saved = {key: sub.error for key, sub in subs.items()}
    try:
        subs["*-de"].error = "OSError: disk full (simulated)"
        assert httpx.get(url + "/health").status_code == 200  # other pairs still work
        for sub in subs.values():
            sub.error = sub.error or "OSError: disk full (simulated)"
        for path in ("/health", "/health/ready"):
            answer = httpx.get(url + path)
            assert answer.status_code == 503, answer.text
            assert answer.json()["status"] == "unavailable"
            assert "sub-network *-de: OSError: disk full (simulated)" in answer.json()["why"]
        live = httpx.get(url + "/health/live")
        assert live.status_code == 200 and live.json() == {"status": "ok"}
    finally:
        for key, error in saved.items():
            subs[key].error = error
    assert httpx.get(url + "/health").status_code == 200


# --- item 14: an oversized body gets the 413, not a reset -----------------------------------------

def test_an_oversized_body_is_answered_413_to_clients_that_send_it_whole(server):
    """urllib writes the whole body before reading: answered before the body was read, a body
    of some MB met a closed connection (broken pipe or reset) instead of the 413. httpx reads
    an early answer, and is checked too."""
    url, _ = server
    body = json.dumps({"q": "e1 " * (4 << 20), "source": "en", "target": "de"}).encode()
    assert BODY_LIMIT < len(body) < 16 << 20  # drained up to max(4 x limit, 16 MB)
    for _ in range(2):
        request = urllib.request.Request(url + "/translate", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413
        assert "Request body too large" in json.loads(refused.value.read())["error"]
    with httpx.Client(timeout=60) as client:
        for _ in range(2):
            answer = client.post(url + "/translate", content=body,
                                 headers={"Content-Type": "application/json"})
            assert answer.status_code == 413
            assert "Request body too large" in answer.json()["error"]
        chunked = client.post(url + "/translate", content=iter([body[:1 << 20], body[1 << 20:]]),
                              headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413  # no Content-Length: counted while read
        assert client.post(url + "/translate", json={"q": "e1", "source": "en",
                                                     "target": "de"}).status_code == 200


# --- item 21: JSON nested too deeply ------------------------------------------------------------

def test_json_nested_too_deeply_is_a_400(server):
    url, _ = server
    for body in (b"[" * 20000, b'{"q": ' + b"[" * 20000 + b"]" * 20000 + b"}"):
        answer = post(url, "/translate", content=body,
                      headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, answer.text
        assert "nested too deeply" in answer.json()["error"]


# --- item 20: malformed keys files --------------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ('{"k": 60}', "the value of key 'k' is 60, not an object"),
    ('{"k": [1, 2]}', "the value of key 'k' is [1, 2], not an object"),
    ('["k", 5]', "a JSON list of keys must hold only strings"),
    ('"k"', "a JSON str is not a keys file"),
    ('{"k": {"req_per_min": 1,}}', "not valid JSON"),
    ('{"k": {"rpm": 5}}', "unknown field(s) rpm"),
    ("[" * 5000, "nested too deeply"),
])
def test_a_malformed_keys_file_names_the_file_and_the_shape(tmp_path, text, problem):
    from fairseq_taskmoe.serve.keys import JSON_SHAPE, load_keys

    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_keys(str(path))
    assert str(path) in str(err.value) and problem in str(err.value)
    assert JSON_SHAPE in str(err.value)
    assert '{"KEY": {"req_per_min": N, "char_limit": M}' in JSON_SHAPE


def test_taskmoe_serve_refuses_a_malformed_keys_file_with_exit_2(tmp_path, capsys):
    from fairseq_taskmoe.cli.serve import build_parser, make_service

    (tmp_path / "keys.json").write_text('{"k": 60}')
    args = build_parser().parse_args([str(tmp_path / "ckpt.pt"), "--data", str(tmp_path),
                                      "--api-keys", str(tmp_path / "keys.json")])
    with pytest.raises(SystemExit) as exit_:
        make_service(args)
    assert exit_.value.code == 2
    assert "--api-keys: " in capsys.readouterr().err


def test_a_client_gone_while_its_body_is_read_is_logged_499_without_a_traceback(caplog):
    """Starlette raises ClientDisconnect when the body is read after the client went away: the
    access middleware counts it as 499 and sends nothing (no 500, no traceback)."""
    import asyncio

    from starlette.requests import ClientDisconnect

    from fairseq_taskmoe.serve.app import AccessLog
    from fairseq_taskmoe.serve.metrics import Metrics

    async def app(scope, receive, send):
        raise ClientDisconnect()

    sent, metrics = [], Metrics()

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/translate"}
    with caplog.at_level("INFO", logger="taskmoe.serve.access"):
        asyncio.run(AccessLog(app, metrics, timeout=5.0)(scope, receive, send))
    assert sent == []
    assert 'unhandled' not in caplog.text and '"status": 499' in caplog.text
    assert metrics.requests.labels("unmatched", "499", "-")._value.get() == 1
