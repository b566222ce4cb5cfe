#!/usr/bin/env python3
"""The same requests sent to LibreTranslate 1.9.6 and to taskmoe-serve, side by side (issue 29).

    make compat-matrix        # the demo model (after `make demo` and `make lt-venv`)
    .venv/bin/python -m research.compat_matrix --checkpoint CKPT --data DIR --spm-model FILE \\
        --text-dir DIR

CASES is the one list of requests: valid and invalid, JSON, form, multipart and query-string
bodies, arrays, source=auto, format=html, alternatives, limits, unknown languages, missing
fields, bad JSON, the other endpoints, unknown routes and wrong methods, and API keys. Each is
sent, in order, to two pairs of servers configured alike (research/libretranslate.py starts the
unchanged LibreTranslate on the checkpoint's Argos packages, exported by taskmoe-export;
research/bench/load.py starts taskmoe-serve on the checkpoint itself), all on 127.0.0.1:

  open  both with a character limit of CHAR_LIMIT, BATCH_LIMIT texts per request, at most
        ALTERNATIVES alternatives (LibreTranslate: --char-limit, --batch-limit,
        --alternatives-limit; taskmoe-serve: the same flags)
  keys  the same, and every translate / detect request needs a key: `slow` (2 requests a
        minute) or `fast` (taskmoe-serve: --api-keys FILE; LibreTranslate: its own key database,
        --api-keys --api-keys-db-path DB --under-attack, "requests must be made with an API
        key")

For each answer: the status, the JSON keys with their types (of the items, for a list), the
error text, and for some requests a value (GET /languages' targets, CORS, the settings' key
flags). A case is the same when all of these agree, ignoring the fields taskmoe-serve adds
(`route`, `hint`, and /languages' `routes`: OUR_FIELDS). Every difference is either fixed in
taskmoe-serve (FIXED says how; the case is then the same) or listed in DIFFERENCES with the
reason; the command exits 1 on a difference listed nowhere, or a listed one that no longer
differs.

Writes --out-json and --out-md (headed by the command, date and versions) and, with --docs,
the table between the markers of that markdown file (docs/serving.md's compatibility section).
"""

import argparse
import json
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from research import libretranslate as lt
from research.bench.load import REPO, read_sentences, running
from research.common import logger

CHAR_LIMIT = 200
BATCH_LIMIT = 4
ALTERNATIVES = 3
BEAM = 4
BODY_BYTES = 2 << 20  # the oversized request: past taskmoe-serve's default --body-limit (1MB)
KEYS = {"slow": (2, None), "fast": (1000, None)}  # key: (requests per minute, char limit)
OUR_FIELDS = {"route", "routes", "hint"}  # taskmoe-serve's additions (answers, /languages)
# natural sentences for language detection, whatever the model (detection needs no model)
DETECT = {"en": "The man and the woman are walking the dog in the park.",
          "de": "Der Mann und die Frau gehen mit dem Hund im Park spazieren."}
DOCS_BEGIN = "<!-- compat-matrix: begin (written by python -m research.compat_matrix --docs) -->"
DOCS_END = "<!-- compat-matrix: end -->"


@dataclass(frozen=True)
class Case:
    """One request. String values "{name}" are filled from the context (fill): the pair,
    sample sentences, limits; where the whole value is one placeholder its object is used
    (a list stays a list)."""

    id: str
    what: str
    method: str = "POST"
    path: str = "/translate"
    json: Any = None
    form: Optional[dict] = None  # urlencoded; a list value repeats the field
    multipart: Optional[dict] = None
    params: Optional[dict] = None  # the query string
    raw: Optional[str] = None  # a body as it is, sent with content_type
    content_type: Optional[str] = None
    headers: Dict[str, str] = field(default_factory=dict)
    config: str = "open"  # open or keys
    value: Optional[str] = None  # also compare: targets, cors, key_flags
    needs: Optional[str] = None  # a context entry without which the case is not applicable


T = {"q": "{text}", "source": "{src}", "target": "{tgt}"}
CASES = [
    # the endpoints a client reads first
    Case("languages", "GET /languages", "GET", "/languages", value="targets"),
    Case("settings", "GET /frontend/settings", "GET", "/frontend/settings"),
    Case("health", "GET /health", "GET", "/health"),
    Case("preflight", "OPTIONS /translate, a browser's CORS preflight", "OPTIONS",
         headers={"Origin": "https://example.org", "Access-Control-Request-Method": "POST",
                  "Access-Control-Request-Headers": "content-type"}, value="cors"),
    # the same translation, every way a body can come
    Case("json", "JSON body", json=T),
    Case("form", "urlencoded form", form=T),
    Case("multipart", "multipart form", multipart=T),
    Case("query", "fields in the query string, no body (deep-translator)", params=T),
    Case("query-over-form", "query string target + form body target: the query string wins",
         params={"target": "{tgt}"}, form={**T, "target": "{src}"}),
    Case("json-ignores-query", "JSON body + query string: the JSON is read alone",
         params={"target": "{src}"}, json=T),
    Case("json-bom", "JSON with a UTF-8 byte order mark", raw="\ufeff{json_body}",
         content_type="application/json"),
    Case("json-array", "q an array of 2 (JSON)", json={**T, "q": "{texts2}"}),
    Case("form-array", "q repeated in a form", form={**T, "q": "{texts2}"}),
    Case("emoji", "q only emoji", json={**T, "q": "\U0001F600\U0001F601"}),
    Case("same-language", "source = target", json={**T, "target": "{src}"}),
    Case("pivot", "a pair through English ({pivot_src}-{pivot_tgt})",
         json={**T, "source": "{pivot_src}", "target": "{pivot_tgt}"}, needs="pivot_src"),
    Case("uppercase-codes", "language codes in capitals (EN, DE)",
         json={**T, "source": "{SRC}", "target": "{TGT}"}),
    # source=auto and /detect
    Case("auto", "source=auto", json={**T, "q": "{detect_en}", "source": "auto"}),
    Case("auto-array", "source=auto, q an array",
         json={**T, "q": ["{detect_en}", "{detect_en}"], "source": "auto"}),
    Case("auto-undetectable", "source=auto, text with no language (digits)",
         json={**T, "q": "12345 67890", "source": "auto"}),
    Case("detect-json", "POST /detect, JSON", path="/detect", json={"q": "{detect_de}"}),
    Case("detect-form", "POST /detect, form", path="/detect", form={"q": "{detect_de}"}),
    Case("detect-missing-q", "POST /detect without q", path="/detect", json={}),
    Case("detect-undetectable", "POST /detect, text with no language (digits)", path="/detect",
         json={"q": "12345 67890"}),
    # format and alternatives
    Case("html", "format=html", json={**T, "q": "<p class=\"x\">{text}</p>", "format": "html"}),
    Case("format-empty", "format empty: text", json={**T, "format": ""}),
    Case("format-xml", "format=xml", json={**T, "format": "xml"}),
    Case("alternatives", "alternatives=2", json={**T, "alternatives": 2}),
    Case("alternatives-array", "alternatives=2, q an array",
         json={**T, "q": "{texts2}", "alternatives": 2}),
    Case("alternatives-html", "alternatives=2 with format=html",
         json={**T, "q": "<b>{text}</b>", "format": "html", "alternatives": 2}),
    Case("alternatives-over", "alternatives above the limit",
         json={**T, "alternatives": ALTERNATIVES + 1}),
    Case("alternatives-negative", "alternatives=-1", json={**T, "alternatives": -1}),
    Case("alternatives-float", "alternatives=2.0 (JSON number)", json={**T, "alternatives": 2.0}),
    Case("alternatives-form-abc", "alternatives=abc in a form", form={**T, "alternatives": "abc"}),
    Case("alternatives-json-abc", "alternatives=\"abc\" in JSON",
         json={**T, "alternatives": "abc"}),
    # missing and wrong fields
    Case("missing-q", "no q", json={"source": "{src}", "target": "{tgt}"}),
    Case("empty-q", "q empty", json={**T, "q": ""}),
    Case("empty-array", "q an empty array", json={**T, "q": []}),
    Case("missing-source", "no source", json={"q": "{text}", "target": "{tgt}"}),
    Case("missing-target", "no target", json={"q": "{text}", "source": "{src}"}),
    Case("null-source", "source null", json={**T, "source": None}),
    Case("unknown-source", "source zz", json={**T, "source": "zz"}),
    Case("unknown-target", "target zz", json={**T, "target": "zz"}),
    Case("no-route", "a pair no package or training covers ({nosrc}-{tgt})",
         json={**T, "source": "{nosrc}"}, needs="nosrc"),
    Case("q-number", "q a number", json={**T, "q": 5}),
    Case("q-array-mixed", "q an array holding a number", json={**T, "q": ["{text}", 2]}),
    # limits
    Case("char-limit", "one text over the character limit", json={**T, "q": "{long}"}),
    Case("char-limit-sum", "two texts, each under the character limit, together over it",
         json={**T, "q": "{two_thirds2}"}),
    Case("batch-limit", "more texts than the batch limit", json={**T, "q": "{over_batch}"}),
    Case("body-too-large", "a 2 MB body", json={**T, "q": "{huge}"}),
    # bodies that are not what they say
    Case("bad-json", "broken JSON", raw='{"q": "x", "source": ', content_type="application/json"),
    Case("json-not-object", "a JSON array as the body", json=["{text}"]),
    Case("text-plain-body", "fields as a text/plain body", raw="q={text}&source={src}&target={tgt}",
         content_type="text/plain"),
    Case("text-plain-query", "fields in the query string, a text/plain body", params=T,
         raw="hello", content_type="text/plain"),
    # what one server has and the other has not; wrong routes and methods
    Case("translate-file", "POST /translate_file without a file", path="/translate_file",
         multipart={"source": "{src}", "target": "{tgt}"}),
    Case("suggest", "POST /suggest", path="/suggest",
         json={"q": "{text}", "s": "x", "source": "{src}", "target": "{tgt}"}),
    Case("spec", "GET /spec (LibreTranslate's API description)", "GET", "/spec"),
    Case("unknown-route", "GET /v2/translate", "GET", "/v2/translate"),
    Case("get-translate", "GET /translate", "GET", "/translate"),
    Case("post-languages", "POST /languages", "POST", "/languages"),
    # API keys: both servers require one for every translate / detect request
    Case("keys-languages", "GET /languages without a key", "GET", "/languages", config="keys"),
    Case("keys-settings", "GET /frontend/settings", "GET", "/frontend/settings", config="keys",
         value="key_flags"),
    Case("keys-missing", "translate without a key", json=T, config="keys"),
    Case("keys-unknown", "translate with an unknown key", json={**T, "api_key": "nope"},
         config="keys"),
    Case("keys-json", "a valid key in JSON", json={**T, "api_key": "fast"}, config="keys"),
    Case("keys-form", "a valid key in a form", form={**T, "api_key": "fast"}, config="keys"),
    Case("keys-query", "a valid key in the query string, fields in the form",
         params={"api_key": "fast"}, form=T, config="keys"),
    Case("keys-detect-missing", "POST /detect without a key", path="/detect",
         json={"q": "{detect_de}"}, config="keys"),
    Case("keys-slow-1", "key of 2 requests a minute: 1st", json={**T, "api_key": "slow"},
         config="keys"),
    Case("keys-slow-2", "key of 2 requests a minute: 2nd", json={**T, "api_key": "slow"},
         config="keys"),
    Case("keys-slow-3", "key of 2 requests a minute: 3rd", json={**T, "api_key": "slow"},
         config="keys"),
]

# Differences fixed in taskmoe-serve (issue 29): these cases are now the same.
FIXED = {
    "uppercase-codes": "language codes are case-insensitive, as LibreTranslate's (it lowercases "
                       "them); they were refused as not supported",
    "detect-undetectable": "/detect always answers at least one candidate, as LibreTranslate "
                           "does: en (or the model's first language, without en) at confidence "
                           "0; it answered [], and clients that read detections[0] failed",
    "text-plain-query": "a body of another content type is ignored and the query string read, as "
                        "Flask's request.values does; it was refused 415",
    "text-plain-body": "(the same fix) the fields of a text/plain body are not read: 400 missing "
                       "q, as LibreTranslate, with a hint naming the content type; it was 415",
    "batch-limit": "LibreTranslate's wording, \"Invalid request: request (N) exceeds text limit "
                   "(M)\" (a lowercase \"request\")",
}

# Differences kept, with the reason.
DIFFERENCES = {
    "languages": "LibreTranslate lists every language reachable through its packages as a "
                 "target, the source itself and pivots through English included (fr, never a "
                 "source, lists only fr); taskmoe-serve lists the languages it translates into "
                 "and says how in `routes` (a source = target request is still answered, the "
                 "text unchanged)",
    "preflight": "both 200 with Access-Control-Allow-Origin: *; taskmoe-serve's (Starlette's "
                 "CORS middleware) answer has the body OK (text/plain), LibreTranslate's (Flask) "
                 "none: browsers read only the headers",
    "health": "taskmoe-serve's /health is a readiness probe: it adds `subnetworks_loaded` and "
              "`queue`, and answers 503 when no pair can be served",
    "auto-undetectable": "LibreTranslate translates text it cannot detect as English, with "
                         "confidence 0; taskmoe-serve refuses it (400 could not detect the "
                         "source language): a translation from a guessed language is noise",
    "alternatives-json-abc": "LibreTranslate fails with 500 (int(\"abc\") outside its check for "
                             "JSON bodies); taskmoe-serve answers 400 with the message "
                             "LibreTranslate gives for a form",
    "no-route": "both 400; LibreTranslate names the languages (\"German (de) is not available "
                "as a target language from French (fr)\"), taskmoe-serve the pair and why "
                "(no trained leg, no pivot)",
    "q-number": "LibreTranslate fails with 500 (a TypeError); taskmoe-serve answers 400 "
                "\"q must be a string or an array of strings\"",
    "q-array-mixed": "the same: LibreTranslate 500, taskmoe-serve 400",
    "char-limit": "both 400 \"Invalid request: request (N) exceeds ...\"; LibreTranslate "
                  "words a character limit \"text limit (M)\", as its batch limit, "
                  "taskmoe-serve \"character limit (M)\", so that the two can be told apart",
    "char-limit-sum": "LibreTranslate limits each text's characters, taskmoe-serve a request's "
                      "(all texts together): the limit bounds the engine time one request "
                      "takes, which an array of texts each under it would not",
    "body-too-large": "taskmoe-serve refuses a body over --body-limit (413) before reading it "
                      "whole; LibreTranslate has no body limit and reads it all, then refuses "
                      "the text by its character limit (400)",
    "bad-json": "both 400; LibreTranslate gives Werkzeug's generic \"The browser (or proxy) "
                "sent a request that this server could not understand.\", taskmoe-serve "
                "\"Invalid JSON format: \" and where the JSON broke",
    "form-array": "LibreTranslate reads the first q of a form and answers one text; "
                  "taskmoe-serve reads every q, as the JSON array, and answers an array",
    "translate-file": "taskmoe-serve does not translate files (/frontend/settings says "
                      "filesTranslation false): 404",
    "suggest": "taskmoe-serve takes no suggestions (/frontend/settings says suggestions false): "
               "404; LibreTranslate answers 403 when they are off",
    "spec": "taskmoe-serve describes its API as OpenAPI 3 at /openapi.json (and /docs); "
            "LibreTranslate as Swagger 2 at /spec",
    "unknown-route": "both 404; taskmoe-serve answers JSON ({\"error\": \"Not Found\"}), "
                     "LibreTranslate an HTML page",
    "get-translate": "both 405; taskmoe-serve answers JSON, LibreTranslate an HTML page",
    "post-languages": "both 405; taskmoe-serve answers JSON, LibreTranslate an HTML page",
    "keys-settings": "both say apiKeys true; LibreTranslate's keyRequired is true only with "
                     "--require-api-key-origin (its web page then asks for a key), "
                     "taskmoe-serve's whenever keys are required",
    "keys-missing": "a request without a key: LibreTranslate 400 \"Please contact the server "
                    "operator to get an API key\", taskmoe-serve 403 \"Invalid API key: this "
                    "server requires an api_key\" (403, as both answer an unknown key)",
    "keys-detect-missing": "the same as keys-missing, on /detect",
}


# ---------------------------------------------------------------- requests


def context(langs: List[str], pairs: List[tuple], sentences: Dict[str, List[str]]) -> dict:
    """What the placeholders of CASES stand for, on a model serving `pairs` (trained,
    packaged) of `langs`: the first pair from English (else the first pair), a pivot pair
    through English where one exists, a language that is no package's source, sample
    sentences, and texts sized to the limits."""
    src, tgt = next((p for p in pairs if p[0] == "en"), pairs[0])
    text = sentences[src][0]
    ctx = {"src": src, "tgt": tgt, "SRC": src.upper(), "TGT": tgt.upper(), "text": text,
           "texts2": sentences[src][1:3], "detect_en": DETECT["en"], "detect_de": DETECT["de"],
           "json_body": json.dumps({"q": text, "source": src, "target": tgt})}
    ctx["long"] = _sized(text, CHAR_LIMIT + 20)
    ctx["two_thirds2"] = [_sized(text, 2 * CHAR_LIMIT // 3)] * 2
    ctx["over_batch"] = sentences[src][:BATCH_LIMIT + 1]
    while len(ctx["over_batch"]) <= BATCH_LIMIT:
        ctx["over_batch"].append(text)
    ctx["huge"] = _sized(text, BODY_BYTES)
    pivots = [(a, b) for a, x in pairs for y, b in pairs
              if x == y == "en" and a != b and (a, b) not in pairs]
    if pivots:
        ctx["pivot_src"], ctx["pivot_tgt"] = pivots[0]
    sources = {a for a, _ in pairs}
    nosrc = [lang for lang in langs if lang not in sources and lang != tgt]
    if nosrc:
        ctx["nosrc"] = nosrc[0]
    return ctx


def _sized(text: str, chars: int) -> str:
    """`text` repeated (space-separated) to at least `chars` characters."""
    return " ".join([text] * (chars // (len(text) + 1) + 1))


def fill(value, ctx: dict):
    """A case's field with its placeholders filled in (strings, lists and dicts within)."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\{(\w+)\}", value)
        if whole and whole.group(1) in ctx:
            return ctx[whole.group(1)]
        return re.sub(r"\{(\w+)\}", lambda m: str(ctx[m.group(1)]), value)
    if isinstance(value, list):
        return [fill(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, ctx) for k, v in value.items()}
    return value


def http_request(case: Case, ctx: dict) -> dict:
    """httpx keyword arguments of the case: method, url path, params, body, headers."""
    out = {"method": case.method, "url": case.path, "headers": dict(case.headers)}
    if case.params is not None:
        out["params"] = fill(case.params, ctx)
    if case.json is not None:
        out["json"] = fill(case.json, ctx)
    elif case.form is not None:
        out["data"] = fill(case.form, ctx)
    elif case.multipart is not None:
        out["files"] = [(k, (None, v)) for k, v in fill(case.multipart, ctx).items()]
    elif case.raw is not None:
        out["content"] = fill(case.raw, ctx).encode("utf-8")
        out["headers"]["Content-Type"] = case.content_type
    return out


def shown(case: Case, ctx: dict, limit: int = 90) -> str:
    """The request in one line, long texts cut."""
    req = http_request(case, ctx)
    body = next((f"{k}={json.dumps(req[k], ensure_ascii=False)}" for k in
                 ("json", "data", "files") if k in req), "")
    if "content" in req:
        body = f"{case.content_type} {req['content'][:40]!r}"
    query = f"?{json.dumps(req['params'], ensure_ascii=False)}" if "params" in req else ""
    line = f"{case.method} {case.path}{query} {body}".strip()
    return line if len(line) <= limit else line[:limit - 3] + "..."


# ---------------------------------------------------------------- answers


def _type(value) -> str:
    return {str: "str", list: "list", dict: "dict", bool: "bool", int: "num", float: "num",
            type(None): "null"}[type(value)]


def summarize(status: int, headers, body: bytes, value: Optional[str]) -> dict:
    """One answer: status, its JSON's keys with their types (an item's, for a list; OUR_FIELDS
    left out), the error text, and the value the case compares."""
    out = {"status": status, "keys": None, "error": None, "value": None}
    ctype = headers.get("content-type", "")
    try:
        doc = json.loads(body) if "json" in ctype else None
    except ValueError:
        doc = None
    if doc is None:
        out["keys"] = f"({ctype.split(';')[0] or 'no body'})" if body else "(no body)"
    elif isinstance(doc, dict):
        out["keys"] = sorted(f"{k}:{_type(v)}" for k, v in doc.items() if k not in OUR_FIELDS)
        if isinstance(doc.get("error"), str):
            out["error"] = doc["error"]
    elif isinstance(doc, list):
        item = doc[0] if doc else None
        out["keys"] = ["[" + ",".join(sorted(f"{k}:{_type(v)}" for k, v in item.items()
                                             if k not in OUR_FIELDS)) + "]"] \
            if isinstance(item, dict) else ["[]" if not doc else f"[{_type(item)}]"]
    else:
        out["keys"] = [_type(doc)]
    if value == "targets" and isinstance(doc, list):
        out["value"] = {x["code"]: x["targets"] for x in doc}
    elif value == "key_flags" and isinstance(doc, dict):
        out["value"] = {k: doc.get(k) for k in ("apiKeys", "keyRequired")}
    elif value == "cors":
        out["value"] = {k: headers.get(k) for k in ("access-control-allow-origin",)}
    if isinstance(doc, dict) and "translatedText" in doc:
        out["text"] = doc["translatedText"]
    return out


def differences(a: dict, b: dict) -> List[str]:
    """What differs between two summaries: status, keys, error, value."""
    return [what for what in ("status", "keys", "error", "value") if a[what] != b[what]]


def verdict(case_id: str, diff: List[str]) -> tuple:
    """(kind, note): same, fixed (same after a fix of ours), listed (a difference with its
    reason), UNLISTED (a difference listed nowhere) or STALE (listed but now the same)."""
    if diff:
        if case_id in DIFFERENCES:
            return "listed", DIFFERENCES[case_id]
        return "UNLISTED", "differs (" + ", ".join(diff) + ") and is listed nowhere"
    if case_id in DIFFERENCES:
        return "STALE", "listed as a difference but the same now: " + DIFFERENCES[case_id]
    if case_id in FIXED:
        return "fixed", FIXED[case_id]
    return "same", ""


def send_all(url: str, cases: List[Case], ctx: dict, timeout: float = 120.0) -> List[dict]:
    """Each case's request to one server, in order; each answer summarized."""
    import httpx

    out = []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for case in cases:
            r = client.request(**http_request(case, ctx))
            out.append(summarize(r.status_code, r.headers, r.content, case.value))
    return out


# ---------------------------------------------------------------- servers


def our_flags(cache_dir: Path, spm_model: Path, quantization: str, keys_file: Optional[Path]):
    flags = ["--spm-model", spm_model, "--cache-dir", cache_dir, "--quantization", quantization,
             "--char-limit", CHAR_LIMIT, "--batch-limit", BATCH_LIMIT, "--alternatives-limit",
             ALTERNATIVES, "--beam", BEAM, "--log-level", "warning"]
    return flags + (["--api-keys", keys_file] if keys_file else [])


LT_FLAGS = ["--char-limit", CHAR_LIMIT, "--batch-limit", BATCH_LIMIT, "--alternatives-limit",
            ALTERNATIVES]
LT_KEY_FLAGS = ["--under-attack"]  # with the key database: every request needs a key


def run_matrix(checkpoint: Path, data: Path, spm_model: Path, text_dir: Path, packages: Path,
               work: Path, quantization: str = "int8", log=print) -> dict:
    """Every applicable case of CASES to LibreTranslate (on `packages`) and to taskmoe-serve (on
    `checkpoint`), one configuration after the other; the answers side by side."""
    work = Path(work)
    files = lt.package_files(packages)
    pairs = lt.package_languages(files)
    langs = sorted({c for p in pairs for c in p})
    ctx = context(langs, pairs, read_sentences(text_dir, langs, limit=10))
    keys_file = work / "keys.txt"
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    keys_file.write_text("".join(f"{k} {rpm}\n" for k, (rpm, _) in KEYS.items()))
    rows, servers = [], {}
    for config in ("open", "keys"):
        cases = [c for c in CASES if c.config == config and (not c.needs or c.needs in ctx)]
        home = Path(tempfile.mkdtemp(prefix=f"lt-{config}-", dir=work))
        try:
            with lt.running_libretranslate(
                    packages, home, args=LT_FLAGS + (LT_KEY_FLAGS if config == "keys" else []),
                    api_keys=KEYS if config == "keys" else None) as server:
                log(f"{config}: LibreTranslate on {server.url} (started in {server.startup_s} s)")
                theirs = send_all(server.url, cases, ctx)
                servers[f"libretranslate-{config}"] = {
                    "argv": [str(a) for a in server.argv[1:]], "startup_s": server.startup_s,
                    "connections": server.connections()}
        finally:
            shutil.rmtree(home, ignore_errors=True)
        flags = our_flags(work / "serve-cache", spm_model, quantization,
                          keys_file if config == "keys" else None)
        with running(checkpoint, data, flags, work / "logs" / f"taskmoe-{config}.log",
                     600) as server:
            log(f"{config}: taskmoe-serve on {server.url}")
            ours = send_all(server.url, cases, ctx)
            servers[f"taskmoe-serve-{config}"] = {"argv": [str(a) for a in server.argv[1:]]}
        for case, a, b in zip(cases, theirs, ours):
            diff = differences(a, b)
            kind, note = verdict(case.id, diff)
            rows.append({"id": case.id, "what": fill(case.what, ctx), "config": config,
                         "request": shown(case, ctx), "libretranslate": a, "taskmoe_serve": b,
                         "differences": diff, "verdict": kind, "note": note})
    skipped = [c.id for c in CASES if c.needs and c.needs not in ctx]
    return {"pairs": ["-".join(p) for p in pairs], "context": {
        k: v for k, v in ctx.items() if isinstance(v, str) and len(v) < 200},
        "limits": {"char_limit": CHAR_LIMIT, "batch_limit": BATCH_LIMIT,
                   "alternatives": ALTERNATIVES, "keys": {k: v[0] for k, v in KEYS.items()}},
        "servers": servers, "rows": rows, "not_applicable": skipped}


# ---------------------------------------------------------------- report


def _cell(s: dict) -> str:
    keys = s["keys"] if isinstance(s["keys"], str) else " ".join(s["keys"])
    out = f"**{s['status']}** `{keys}`" if keys else f"**{s['status']}**"
    if s["error"]:
        error = s["error"] if len(s["error"]) <= 70 else s["error"][:67] + "..."
        out += f" {json.dumps(error, ensure_ascii=False)}"
    if s["value"] is not None:
        out += f" {json.dumps(s['value'], ensure_ascii=False)}"
    return out.replace("|", "\\|")


def table(rows: List[dict]) -> str:
    """Markdown: one line per case, LibreTranslate and taskmoe-serve side by side."""
    lines = ["| # | request | LibreTranslate 1.9.6 | taskmoe-serve | |",
             "|---:|---|---|---|---|"]
    for n, r in enumerate(rows, 1):
        mark = {"same": "same", "fixed": "same: fixed", "listed": "differs, kept",
                "UNLISTED": "**UNLISTED**", "STALE": "**STALE**"}[r["verdict"]]
        what = f"{r['what']}" + (" (keys)" if r["config"] == "keys" else "")
        lines.append(f"| {n} | {what}: `{r['request']}` | {_cell(r['libretranslate'])} | "
                     f"{_cell(r['taskmoe_serve'])} | {mark} |".replace("\n", " "))
    return "\n".join(lines)


def notes(rows: List[dict]) -> str:
    """Each fixed or kept difference with its reason, one bullet per case."""
    out = []
    for kind, title in (("fixed", "Fixed in taskmoe-serve"),
                        ("listed", "Kept, with the reason")):
        items = [r for r in rows if r["verdict"] == kind]
        if items:
            out += [f"{title}:", ""] + [f"- `{r['id']}`: {r['note']}" for r in items] + [""]
    bad = [r for r in rows if r["verdict"] in ("UNLISTED", "STALE")]
    if bad:
        out += ["To resolve:", ""] + [f"- `{r['id']}`: {r['note']}" for r in bad] + [""]
    return "\n".join(out)


def markdown(result: dict) -> str:
    env = result["environment"]
    counts = {k: sum(1 for r in result["rows"] if r["verdict"] == k)
              for k in ("same", "fixed", "listed", "UNLISTED", "STALE")}
    head = [f"`{result['command']}`", "",
            f"{env['date']}; LibreTranslate {lt.LT_VERSION} (unchanged, .venv-lt) on the "
            f"Argos packages of {result['checkpoint']} ({', '.join(result['pairs'])}), "
            f"taskmoe-serve on the checkpoint itself. Limits alike: {CHAR_LIMIT} characters, "
            f"{BATCH_LIMIT} texts, {ALTERNATIVES} alternatives; (keys): both require a key "
            f"(`slow`: {KEYS['slow'][0]} a minute). Cells: status, JSON keys with their types "
            "(an item's for a list; `route`, `hint` and /languages' `routes`, taskmoe-serve's "
            "additions, left out), "
            "error text, and a compared value where one is shown.", "",
            f"{len(result['rows'])} requests: {counts['same']} the same, {counts['fixed']} the "
            f"same after a fix, {counts['listed']} different with the reason below"
            + (f", {counts['UNLISTED']} UNLISTED" if counts["UNLISTED"] else "")
            + (f", {counts['STALE']} STALE" if counts["STALE"] else "") + "."
            + (f" Not applicable to this model: {', '.join(result['not_applicable'])}."
               if result["not_applicable"] else ""), ""]
    return "\n".join(head + [table(result["rows"]), "", notes(result["rows"])])


def replace_in_docs(path: Path, text: str):
    """`text` between DOCS_BEGIN and DOCS_END of the markdown file `path`."""
    doc = Path(path).read_text()
    start, end = doc.find(DOCS_BEGIN), doc.find(DOCS_END)
    if start < 0 or end < start:
        raise SystemExit(f"compat_matrix: {path} has no {DOCS_BEGIN!r} ... {DOCS_END!r} markers")
    Path(path).write_text(doc[:start + len(DOCS_BEGIN)] + "\n" + text.strip() + "\n" + doc[end:])


# ---------------------------------------------------------------- command


def parse_args(argv=None):
    demo = REPO / "work" / "demo"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(demo / "checkpoints" / "checkpoint_last.pt"))
    p.add_argument("--data", default=str(demo / "multi30k" / "bin"),
                   help="the data folder with the dictionaries")
    p.add_argument("--spm-model", default=str(demo / "multi30k" / "spm.model"))
    p.add_argument("--text-dir", default=str(demo / "multi30k" / "text"),
                   help="sample sentences from TEXT_DIR/test.LANG")
    p.add_argument("--packages", help="a folder of the checkpoint's .argosmodel packages "
                   "(default: exported into WORK/packages by taskmoe-export --all-pairs)")
    p.add_argument("--quantization", default="int8",
                   help="weight type of the packages and of taskmoe-serve (default: int8)")
    p.add_argument("--work", default=str(REPO / "work" / "compat_matrix"),
                   help="packages, the sub-network cache, keys and server logs")
    p.add_argument("--out-json", default=str(REPO / "results" / "compat_matrix.json"))
    p.add_argument("--out-md", default=str(REPO / "results" / "compat_matrix.md"))
    p.add_argument("--docs", help="also write the table between the compat-matrix markers of "
                   "this markdown file (docs/serving.md)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from fairseq_taskmoe.atomic import write_text_atomically

    why = lt.unavailable()
    if why:
        raise SystemExit(f"compat_matrix: {why}")
    if not Path(args.checkpoint).exists():
        raise SystemExit(f"compat_matrix: {args.checkpoint} is missing: run `make demo` first, "
                         "or give --checkpoint, --data, --spm-model and --text-dir")
    log = logger("compat_matrix", clock=True)

    work = Path(args.work)
    packages = Path(args.packages) if args.packages else lt.export_packages(
        args.checkpoint, args.data, args.spm_model, work / "packages", args.quantization)
    result = {"command": "python -m research.compat_matrix " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "environment": {"date": time.strftime("%Y-%m-%d %H:%M"),
                        "libretranslate": lt.LT_VERSION},
        "checkpoint": str(Path(args.checkpoint)).replace(f"{REPO}/", "")}
    result.update(run_matrix(args.checkpoint, args.data, args.spm_model, args.text_dir,
                             packages, work, args.quantization, log))
    text = markdown(result)
    for path, content in ((args.out_json, json.dumps(result, indent=1, ensure_ascii=False)),
                          (args.out_md, "# LibreTranslate compatibility matrix\n\n" + text)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, content + "\n")
    if args.docs:
        replace_in_docs(Path(args.docs), text)
    print(text)
    bad = [r["id"] for r in result["rows"] if r["verdict"] in ("UNLISTED", "STALE")]
    log(f"wrote {args.out_json} and {args.out_md}" + (f" and {args.docs}" if args.docs else ""))
    if bad:
        log(f"differences to resolve: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
