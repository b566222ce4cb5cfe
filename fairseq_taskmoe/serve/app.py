"""The HTTP layer (FastAPI): LibreTranslate's API, plus routes and sub-network facts.

Thin on purpose: parse, validate, hand to the Service, answer. Bodies are parsed here rather than
by FastAPI's models because LibreTranslate takes the same fields as JSON or as a form
(urlencoded or multipart) and answers every problem as `{"error": "..."}` with 400 / 403 / 413 /
415 / 429 / 503; its own wording is kept where it has one (clients match on it, e.g. "zz is not
supported"), and a `hint` field says how to fix the request.

Endpoints: POST /translate, GET /languages, POST /detect, GET /health, GET /frontend/settings
(LibreTranslate's), GET /metrics (Prometheus), GET /pairs/{src}-{tgt} (ours: the route and the
experts each sub-network of it holds), OpenAPI at /docs and /openapi.json, and the web page
at / (page.py).
"""

import json
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import List, Optional, Union
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Closed, QueueFull
from .keys import KeyGuard
from .metrics import CONTENT_TYPE_LATEST
from .page import add_page
from .registry import Unavailable
from .service import RequestTimeout, Service
from .text import TooLong, html_fragments, html_rebuild, html_texts
from .. import langid

access_log = logging.getLogger("taskmoe.serve.access")
FORMATS = ("text", "html")


class ApiError(Exception):
    def __init__(self, status: int, error: str, hint: Optional[str] = None, headers=None):
        super().__init__(error)
        self.status, self.error, self.hint, self.headers = status, error, hint, headers


class TranslateBody(BaseModel):
    """POST /translate, as JSON or form fields (LibreTranslate's)."""

    q: Union[str, List[str]] = Field(description="text, or an array of texts")
    source: str = Field(description="language code, or auto")
    target: str = Field(description="language code")
    format: str = Field("text", description="text or html (markup kept, text nodes translated)")
    alternatives: int = Field(0, description="alternative translations per text (n-best)")
    api_key: Optional[str] = Field(None, description="required when the server has API keys")


class DetectBody(BaseModel):
    """POST /detect, as JSON or form fields."""

    q: str = Field(description="text")
    api_key: Optional[str] = None


class Route(BaseModel):
    kind: str = Field(description="direct, pivot, zero-shot (or identity: source = target)")
    via: Optional[str] = Field(None, description="the pivot language")


class TranslateAnswer(BaseModel):
    translatedText: Union[str, List[str]]
    detectedLanguage: Optional[Union[dict, List[dict]]] = None
    alternatives: Optional[Union[List[str], List[List[str]]]] = None
    route: Route


def _form_schema(model) -> dict:
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "application/x-www-form-urlencoded": {"schema": schema},
        "multipart/form-data": {"schema": schema}}}}


async def read_body(request: Request, limit: int) -> dict:
    """The request's fields as a dict, from JSON, urlencoded or multipart; ApiError otherwise."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"Request body too large ({int(length)} bytes; the limit is "
                       f"{limit} bytes)", "send fewer or shorter texts per request")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"Request body too large (over {limit} bytes)",
                           "send fewer or shorter texts per request")
    request._body = bytes(data)  # starlette replays it for request.form()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = json.loads(bytes(data).decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ApiError(400, f"Invalid request: the body is not valid UTF-8 ({err.reason} at "
                           f"byte {err.start})", "encode the text as UTF-8") from None
        except ValueError as err:
            raise ApiError(400, f"Invalid JSON format: {err}",
                           'send a JSON object such as {"q": "Hello", "source": "en", '
                           '"target": "de"}') from None
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid JSON format", "send a JSON object, not an array or value")
        return body
    if ctype == "application/x-www-form-urlencoded" or (not ctype and not data):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ApiError(400, f"Invalid request: the body is not valid UTF-8 ({err.reason} at "
                           f"byte {err.start})", "encode the form as UTF-8") from None
        try:
            fields = parse_qs(text, keep_blank_values=True, strict_parsing=False,
                              errors="strict")
        except UnicodeDecodeError:
            raise ApiError(400, "Invalid request: a form field is not valid UTF-8",
                           "percent-encode UTF-8 bytes") from None
        return {k: (v if k == "q" and len(v) > 1 else v[0]) for k, v in fields.items()}
    if ctype == "multipart/form-data":
        try:
            form = await request.form()
        except Exception as err:
            raise ApiError(400, f"Invalid request: bad multipart body ({err})") from None
        out = {}
        for key in form.keys():
            values = [v for v in form.getlist(key) if isinstance(v, str)]
            if values:
                out[key] = values if key == "q" and len(values) > 1 else values[0]
        return out
    raise ApiError(415, f"Unsupported content type {ctype or '(none)'}",
                   "send application/json, application/x-www-form-urlencoded or "
                   "multipart/form-data")


def _int_field(value, name: str, default: int = 0) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ApiError(400, f"Invalid request: {name} parameter is not a number")
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"Invalid request: {name} parameter is not a number") from None


def create_app(service: Service, keys: Optional[KeyGuard] = None) -> FastAPI:
    keys = keys or KeyGuard()
    limits = service.limits
    metrics = service.registry.metrics
    langs = service.langs

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting and finished the requests in flight: drain and stop
        service.batcher.close()

    app = FastAPI(title="taskmoe-serve", lifespan=lifespan,
                  description="Translation with a task-level mixture of experts: each pair runs "
                  "only its own sub-network. LibreTranslate-compatible API; every response and "
                  "/languages say whether a pair is direct (trained), pivot or zero-shot.")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        content = {"error": err.error}
        if err.hint:
            content["hint"] = err.hint
        return JSONResponse(content, status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return JSONResponse({"error": f"Invalid request: {err.errors()}"}, status_code=400)

    @app.middleware("http")
    async def access(request: Request, call_next):
        t0 = time.perf_counter()
        request.state.pair, request.state.chars = "-", 0
        try:
            response = await call_next(request)
            status = response.status_code
        except Exception:
            status = 500
            access_log.exception("unhandled error on %s", request.url.path)
            response = JSONResponse({"error": "Internal server error"}, status_code=500)
        seconds = time.perf_counter() - t0
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        pair = getattr(request.state, "pair", "-")
        metrics.requests.labels(endpoint, str(status), pair).inc()
        metrics.latency.labels(endpoint, str(status), pair).observe(seconds)
        access_log.info(json.dumps({"method": request.method, "path": request.url.path,
                                    "status": status, "pair": pair,
                                    "ms": round(seconds * 1000, 1),
                                    "chars": getattr(request.state, "chars", 0)}))
        return response

    def check_key(body: dict):
        denied = keys.check(body.get("api_key") if isinstance(body.get("api_key"), str)
                            else None)
        if denied:
            status, message = denied
            hint = ("pass a valid api_key" if status == 403 else "wait, or ask for a higher "
                    "limit")
            raise ApiError(status, message, hint, {"Retry-After": "60"} if status == 429 else None)

    def check_lang(code, role: str):
        if not code:
            raise ApiError(400, f"Invalid request: missing {role} parameter")
        if not isinstance(code, str):
            raise ApiError(400, f"Invalid request: {role} must be a language code")
        if code not in langs and not (role == "source" and code == "auto"):
            raise ApiError(400, f"{code} is not supported",
                           f"languages of this model: {', '.join(langs)} (GET /languages)")

    @app.post("/translate", responses={200: {"model": TranslateAnswer}},
              openapi_extra=_form_schema(TranslateBody))
    async def translate(request: Request):
        """Translate text(s) from one language to another (LibreTranslate's /translate)."""
        body = await read_body(request, limits.body_limit)
        check_key(body)
        q = body.get("q")
        if q is None or q == "" or q == []:
            raise ApiError(400, "Invalid request: missing q parameter",
                           "give q, a non-empty string or array of strings")
        batch = isinstance(q, list)
        texts = q if batch else [q]
        if not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "Invalid request: q must be a string or an array of strings")
        source, target = body.get("source"), body.get("target")
        check_lang(source, "source")
        check_lang(target, "target")
        fmt = body.get("format") or "text"
        if fmt not in FORMATS:
            raise ApiError(400, f"{fmt} format is not supported", "use text or html")
        alternatives = _int_field(body.get("alternatives"), "alternatives")
        if alternatives < 0 or alternatives > limits.alternatives_limit:
            raise ApiError(400, f"Invalid request: alternatives ({alternatives}) must be between "
                           f"0 and {limits.alternatives_limit}",
                           f"ask for at most {limits.alternatives_limit} alternatives")
        if batch and limits.batch_limit and len(texts) > limits.batch_limit:
            raise ApiError(400, f"Invalid request: Request ({len(texts)}) exceeds text limit "
                           f"({limits.batch_limit})", "split the array into smaller requests")
        chars = sum(len(t) for t in texts)
        request.state.chars = chars
        char_limits = [c for c in (limits.char_limit, keys.char_limit(body.get("api_key"))) if c]
        if char_limits and chars > min(char_limits):
            raise ApiError(400, f"Invalid request: Request ({chars}) exceeds character limit "
                           f"({min(char_limits)})", "send shorter texts or fewer of them")
        detected = None
        if source == "auto":
            found = service.detect(" ".join(texts))
            if not found or langid.detect(" ".join(texts)) is None:
                raise ApiError(400, "Invalid request: could not detect the source language",
                               f"give source, one of {', '.join(langs)}")
            source = found[0]["language"]
            if source not in langs:
                raise ApiError(400, f"{source} is not supported",
                               f"detected {source}, which this model does not translate")
            detected = found[0]
        request.state.pair = f"{source}-{target}"
        if source == target:
            translated, alts, route_json = list(texts), [[] for _ in texts], {
                "kind": "identity", "via": None}
        else:
            translated, alts, route_json = await _translate(texts, source, target, fmt,
                                                            alternatives)
        answer = {"translatedText": translated if batch else translated[0], "route": route_json}
        if detected is not None:
            answer["detectedLanguage"] = [detected] * len(texts) if batch else detected
        if alternatives:
            answer["alternatives"] = alts if batch else alts[0]
        return answer

    async def _translate(texts, source, target, fmt, alternatives):
        pair = f"{source}-{target}"
        route = service.route(source, target)
        if not route.available:
            raise ApiError(400, f"{pair} is not available: {route.why}",
                           "see GET /languages for the pairs this server translates")
        try:
            if fmt == "html":
                parts = [html_fragments(t) for t in texts]
                nodes = [html_texts(p) for p in parts]
                flat = [n for ns in nodes for n in ns]
                out, _, route = await service.translate(flat, source, target, 0)
                translated, i = [], 0
                for p, ns in zip(parts, nodes):
                    translated.append(html_rebuild(p, out[i:i + len(ns)]))
                    i += len(ns)
                return translated, [[] for _ in texts], route.as_json()
            translated, alts, route = await service.translate(texts, source, target,
                                                              alternatives)
            return translated, alts, route.as_json()
        except TooLong as err:
            raise ApiError(400, f"Invalid request: {err}") from None
        except QueueFull as err:
            raise ApiError(503, str(err), "retry after the Retry-After seconds",
                           {"Retry-After": str(err.retry_after)}) from None
        except Closed as err:
            raise ApiError(503, str(err), "retry on another server",
                           {"Retry-After": "5"}) from None
        except RequestTimeout as err:
            raise ApiError(503, str(err), "retry with fewer or shorter texts",
                           {"Retry-After": "5"}) from None
        except Unavailable as err:
            raise ApiError(503, f"{pair} is unavailable: {err}",
                           "other pairs still work; see the server log") from None

    @app.get("/languages")
    async def languages():
        """Languages, each with the targets it translates into and, per target, the route:
        direct (trained), pivot (via) or zero-shot."""
        return service.languages()

    @app.post("/detect", openapi_extra=_form_schema(DetectBody))
    async def detect(request: Request):
        """Detect the language of a text (only en, de, fr, cs can be told apart)."""
        body = await read_body(request, limits.body_limit)
        check_key(body)
        q = body.get("q")
        if not q:
            raise ApiError(400, "Invalid request: missing q parameter")
        if not isinstance(q, str):
            raise ApiError(400, "Invalid request: q must be a string")
        request.state.chars = len(q)
        return service.detect(q)

    @app.get("/health")
    async def health():
        await service.refreshed()
        return {"status": "ok", "subnetworks_loaded": len(service.registry.loaded_keys()),
                "queue": service.batcher.pending()}

    @app.get("/frontend/settings")
    async def frontend_settings():
        """LibreTranslate's settings endpoint, which its web clients read."""
        return {"charLimit": limits.char_limit or -1, "apiKeys": keys.required,
                "keyRequired": keys.required, "suggestions": False, "filesTranslation": False,
                "supportedFilesFormat": [],
                "language": {"source": {"code": "auto", "name": "Auto Detect"},
                             "target": {"code": langs[0], "name": langs[0]}}}

    @app.get("/metrics")
    async def metrics_endpoint():
        await service.refreshed()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/pairs/{pair}")
    async def pair_info(pair: str, request: Request):
        """The route of SRC-TGT and, for each sub-network it uses, which experts of each MoE
        layer it keeps (with gate weights), its size, and the full model's."""
        m = re.fullmatch(r"([^-]+)-([^-]+)", pair)
        if not m or m.group(1) not in langs or m.group(2) not in langs or \
                m.group(1) == m.group(2):
            raise ApiError(404, f"no pair {pair}", f"write SRC-TGT with two different languages "
                           f"of {', '.join(langs)}")
        request.state.pair = pair
        await service.refreshed()
        return service.pair_info(m.group(1), m.group(2))

    add_page(app)  # GET /: the web page (page.py)
    return app
