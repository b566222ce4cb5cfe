"""The HTTP layer (FastAPI): LibreTranslate's API, plus routes and sub-network facts.

Thin on purpose: parse, validate, hand to the Service, answer. Bodies are parsed here rather than
by FastAPI's models because LibreTranslate takes the same fields as JSON or as a form
(urlencoded or multipart) and answers every problem as `{"error": "..."}` with 400 / 403 / 413 /
429 / 503; its own wording is kept where it has one (clients match on it, e.g. "zz is not
supported"), and a `hint` field says how to fix the request. Where LibreTranslate 1.9.6 answers
differently, research/compat_matrix.py lists it (docs/serving.md).

Endpoints: POST /translate, GET /languages, POST /detect, GET /frontend/settings
(LibreTranslate's), GET /health (= /health/ready: 503 when no pair can be served) and
/health/live, GET /metrics (Prometheus), GET /pairs/{src}-{tgt} (ours: the route and the experts
each sub-network of it holds), OpenAPI at /docs and /openapi.json, and the web page at /
(page.py). Every origin is allowed (CORS), as LibreTranslate does.
"""

import asyncio
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import List, Optional, Union
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .batcher import Closed, QueueFull
from .keys import KeyGuard
from .metrics import CONTENT_TYPE_LATEST
from .page import add_page
from .registry import Unavailable
from .service import LimitExceeded, RequestTimeout, Service
from .text import TooLong

access_log = logging.getLogger("taskmoe.serve.access")
FORMATS = ("text", "html")
FRONTEND_TIMEOUT_MS = 500  # LibreTranslate's default (--frontend-timeout), for web clients
CLIENT_GONE = 499  # nginx's "client closed request": logged and counted, never sent


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


DRAIN_CAP = 16 << 20  # bytes of an oversized body read (and dropped) before answering 413


def _too_large(size: str, limit: int) -> ApiError:
    return ApiError(413, f"Request body too large ({size}; the limit is {limit} bytes)",
                    "send fewer or shorter texts per request")


async def _read_raw(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes; ApiError 413 beyond. An oversized body is still read, up
    to max(4 x limit, 16 MB), and dropped before answering: a client that sends its whole body
    before reading (urllib, requests) would otherwise see the connection reset, not the 413."""
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() else None
    cap = max(4 * limit, DRAIN_CAP)
    if declared is not None and declared > limit and (
            declared > cap or request.headers.get("expect", "").lower() == "100-continue"):
        # far too large, or the client waits for "100 Continue" before sending: answer now
        raise _too_large(f"{declared} bytes", limit)
    data, seen = bytearray(), 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen <= limit:
            data += chunk
        elif seen > cap:
            break
    if seen > limit:
        raise _too_large(f"{declared} bytes" if declared is not None else f"over {limit} bytes",
                         limit)
    return bytes(data)


def _form_fields(raw: bytes, what: str) -> dict:
    """urlencoded fields (a query string or a form body); q repeated gives a list."""
    try:
        fields = parse_qs(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, f"Invalid request: the {what} is not valid UTF-8",
                       "encode it as UTF-8 and percent-encode non-ASCII bytes") from None
    return {k: (v if k == "q" and len(v) > 1 else v[0]) for k, v in fields.items()}


async def read_body(request: Request, limit: int) -> dict:
    """The request's fields as a dict, read as LibreTranslate reads them (Flask): a JSON body
    alone; otherwise the query string and the form body (urlencoded or multipart) together, the
    query string winning where both give a field (Flask's request.values looks at the query
    string first). A body of any other content type (text/plain, what fetch() sends with a
    string body) is not read, the query string alone is, as Flask's request.values does; its
    content type is kept in request.state.unread_body for missing_field's hint."""
    data = await _read_raw(request, limit)
    request._body = data  # starlette replays it for request.form()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = json.loads(data.decode("utf-8-sig"))  # a byte order mark is allowed
        except UnicodeDecodeError as err:
            raise ApiError(400, f"Invalid request: the body is not valid UTF-8 ({err.reason} at "
                           f"byte {err.start})", "encode the text as UTF-8") from None
        except ValueError as err:
            raise ApiError(400, f"Invalid JSON format: {err}",
                           'send a JSON object such as {"q": "Hello", "source": "en", '
                           '"target": "de"}') from None
        except RecursionError:
            raise ApiError(400, "Invalid JSON format: nested too deeply",
                           "send a flat JSON object of strings (q may be an array of "
                           "strings)") from None
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid JSON format", "send a JSON object, not an array or value")
        return body
    query = _form_fields(request.scope.get("query_string", b""), "query string")
    if ctype == "application/x-www-form-urlencoded" or not data:
        return {**_form_fields(data, "form body"), **query}
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
        return {**out, **query}
    request.state.unread_body = ctype or "(none)"
    return query


def missing_field(request: Request, name: str) -> ApiError:
    """LibreTranslate's "missing NAME parameter", with a hint; when the body was of a content
    type that is not read (read_body), the hint says so."""
    unread = getattr(request.state, "unread_body", None)
    if unread is not None:
        hint = (f"the body ({unread}) was not read: send application/json, a form "
                "(application/x-www-form-urlencoded or multipart/form-data) or the fields in "
                "the query string")
    else:
        hint = {"q": "give q, a non-empty string or array of strings"}.get(name)
    return ApiError(400, f"Invalid request: missing {name} parameter", hint)


def _alternatives(value, limit: int) -> int:
    """LibreTranslate's reading of `alternatives`: a whole number (a JSON number is truncated,
    2.0 is 2), negatives count as 0, above the limit is refused with its wording."""
    if value is None or value == "":
        n = 0
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(400, "Invalid request: alternatives parameter is not a number")
    else:
        try:
            n = max(0, int(value))
        except (ValueError, OverflowError):  # "abc", "2.5", NaN, Infinity
            raise ApiError(400, "Invalid request: alternatives parameter is not a number",
                           "give a whole number") from None
    if n > limit:
        raise ApiError(400, f"Invalid request: alternatives parameter must be <= {limit}",
                       f"ask for at most {limit} alternatives")
    return n


def unique_alternatives(translation: str, alternatives: List[str]) -> List[str]:
    """LibreTranslate's filter: alternatives without duplicates, the translation itself and
    empty strings, in order."""
    seen = {translation, ""}
    out = []
    for alt in alternatives:
        if alt not in seen:
            seen.add(alt)
            out.append(alt)
    return out


async def _finished_unless_gone(request: Request, work: "asyncio.Future",
                                poll: float = 0.1) -> bool:
    """Wait for `work`; True when it finished, False when the client disconnected first (the
    work is then cancelled, so its jobs that have not started are dropped by the batcher)."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=poll)
        if done:
            return True
        if await request.is_disconnected():
            work.cancel()
            return False


class AccessLog:
    """ASGI middleware: each HTTP request's deadline (its time limit runs from its arrival, not
    from when its texts reach the batcher), then one JSON access line and the request metrics.
    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which hides a client's disconnect from
    the endpoint (`Request.is_disconnected`)."""

    def __init__(self, app, metrics, timeout: float):
        self.app, self.metrics, self.timeout = app, metrics, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state.update(deadline=time.monotonic() + self.timeout, pair="-", chars=0)
        status = None

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except ClientDisconnect:  # gone while its body was read: nobody to answer, no traceback
            status = status or 499
        except Exception:
            access_log.exception("unhandled error on %s", scope.get("path"))
            if status is None:
                status = 500
                await JSONResponse({"error": "Internal server error"}, status_code=500)(
                    scope, receive, send)
        seconds = time.perf_counter() - t0
        endpoint = getattr(scope.get("route"), "path", "unmatched")
        pair, code = state.get("pair", "-"), str(status or 500)
        self.metrics.requests.labels(endpoint, code, pair).inc()
        self.metrics.latency.labels(endpoint, code, pair).observe(seconds)
        access_log.info(json.dumps({"method": scope.get("method"), "path": scope.get("path"),
                                    "status": status or 500, "pair": pair,
                                    "ms": round(seconds * 1000, 1),
                                    "chars": state.get("chars", 0)}))


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

    app.add_middleware(AccessLog, metrics=metrics, timeout=limits.timeout)

    # LibreTranslate answers every origin, preflights included (its after_request hook);
    # added last, so outermost: every answer carries it
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"],
                       allow_headers=["*"], expose_headers=["Authorization"],
                       max_age=60 * 60 * 24 * 20)

    def check_key(body: dict):
        denied = keys.check(body.get("api_key") if isinstance(body.get("api_key"), str)
                            else None)
        if denied:
            status, message = denied
            hint = ("pass a valid api_key" if status == 403 else "wait, or ask for a higher "
                    "limit")
            raise ApiError(status, message, hint, {"Retry-After": "60"} if status == 429 else None)

    by_lower = {lang.lower(): lang for lang in langs}

    def check_lang(request: Request, code, role: str) -> str:
        """The model's language code (or auto for a source) named by `code`; case-insensitive,
        as LibreTranslate, which lowercases codes."""
        if not code:
            raise missing_field(request, role)
        if not isinstance(code, str):
            raise ApiError(400, f"Invalid request: {role} must be a language code")
        if code in langs:
            return code
        if role == "source" and code.lower() == "auto":
            return "auto"
        if code.lower() in by_lower:
            return by_lower[code.lower()]
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
            raise missing_field(request, "q")
        batch = isinstance(q, list)
        texts = q if batch else [q]
        if not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "Invalid request: q must be a string or an array of strings")
        source = check_lang(request, body.get("source"), "source")
        target = check_lang(request, body.get("target"), "target")
        fmt = body.get("format") or "text"
        if fmt not in FORMATS:
            raise ApiError(400, f"{fmt} format is not supported", "use text or html")
        alternatives = _alternatives(body.get("alternatives"), limits.alternatives_limit)
        if batch and limits.batch_limit and len(texts) > limits.batch_limit:
            raise ApiError(400, f"Invalid request: request ({len(texts)}) exceeds text limit "
                           f"({limits.batch_limit})", "split the array into smaller requests")
        chars = sum(len(t) for t in texts)
        request.state.chars = chars
        char_limits = [c for c in (limits.char_limit, keys.char_limit(body.get("api_key"))) if c]
        if char_limits and chars > min(char_limits):
            raise ApiError(400, f"Invalid request: request ({chars}) exceeds character limit "
                           f"({min(char_limits)})", "send shorter texts or fewer of them")
        detected = None
        if source == "auto":
            found = await asyncio.to_thread(service.detect, " ".join(texts))
            if not found or (len(found) > 1 and found[1]["confidence"] == found[0]["confidence"]):
                raise ApiError(400, "Invalid request: could not detect the source language",
                               f"give source, one of {', '.join(langs)}")
            source, detected = found[0]["language"], found[0]
        request.state.pair = f"{source}-{target}"
        if source == target:
            translated, alts, route_json = list(texts), [[] for _ in texts], {
                "kind": "identity", "via": None}
        else:
            translated, alts, route_json = await _translate(request, texts, source, target, fmt,
                                                            alternatives)
        answer = {"translatedText": translated if batch else translated[0], "route": route_json}
        if detected is not None:
            answer["detectedLanguage"] = [detected] * len(texts) if batch else detected
        if alternatives:
            alts = [unique_alternatives(t, a) for t, a in zip(translated, alts)]
            answer["alternatives"] = alts if batch else alts[0]
        return answer

    async def _translate(request, texts, source, target, fmt, alternatives):
        pair = f"{source}-{target}"
        route = service.route(source, target)
        if not route.available:
            raise ApiError(400, f"{pair} is not available: {route.why}",
                           "see GET /languages for the pairs this server translates")
        work = asyncio.ensure_future(service.translate(
            texts, source, target, alternatives, fmt=fmt, deadline=request.state.deadline))
        try:
            if not await _finished_unless_gone(request, work):
                raise ApiError(CLIENT_GONE, "Client closed the request")
            translated, alts, route = work.result()
            return translated, alts, route.as_json()
        except (TooLong, LimitExceeded) as err:
            raise ApiError(400, f"Invalid request: {err}" if isinstance(err, TooLong)
                           else str(err)) from None
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

    # what /detect answers for text without evidence: LibreTranslate's guess of English (or
    # this model's first language) at confidence 0, never an empty list (clients read [0])
    no_evidence = [{"confidence": 0.0, "language": "en" if "en" in langs else langs[0]}]

    @app.post("/detect", openapi_extra=_form_schema(DetectBody))
    async def detect(request: Request):
        """Detect the language of a text, over this model's languages: candidates best first,
        confidence 0-100; text without evidence gives one candidate at confidence 0."""
        body = await read_body(request, limits.body_limit)
        check_key(body)
        q = body.get("q")
        if not q:
            raise missing_field(request, "q")
        if not isinstance(q, str):
            raise ApiError(400, "Invalid request: q must be a string")
        request.state.chars = len(q)
        return service.detect(q) or no_evidence

    def unservable() -> Optional[str]:
        """None when some served pair can be translated (none of its legs' sub-networks
        failed, and under Ray Serve some Translator replica answers), else why none can."""
        why = service.unready() if service.unready is not None else None
        if why is not None:
            return why
        reg, failed = service.registry, {}
        for route in service.routes.values():
            if not route.available:
                continue
            subs = [reg.subnetwork(reg.key_of(leg)) for leg in route.legs]
            errors = {s.key: s.error for s in subs if s.error is not None}
            if not errors:
                return None
            failed.update(errors)
        return "no pair can be served: " + ("; ".join(
            f"sub-network {key}: {error}" for key, error in sorted(failed.items()))
            or "no route is available")

    @app.get("/health")
    async def health():
        """Readiness: 200 {"status": "ok"} when at least one pair can be translated, else 503
        {"status": "unavailable", "why"} (every served pair's sub-network failed to build or
        load). The same as /health/ready."""
        await service.refreshed()
        why = unservable()
        if why is not None:
            return JSONResponse({"status": "unavailable", "why": why}, status_code=503)
        return {"status": "ok", "subnetworks_loaded": len(service.registry.loaded_keys()),
                "queue": service.batcher.pending()}

    app.get("/health/ready", summary="Health Ready")(health)

    @app.get("/health/live")
    async def health_live():
        """Liveness: 200 while the process answers, whatever the state of the models."""
        return {"status": "ok"}

    @app.get("/frontend/settings")
    async def frontend_settings():
        """LibreTranslate's settings endpoint, which its web clients read."""
        return {"charLimit": limits.char_limit or -1, "frontendTimeout": FRONTEND_TIMEOUT_MS,
                "apiKeys": keys.required,
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
