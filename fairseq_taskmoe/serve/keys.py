"""API keys and per-key limits (requests per minute through the `limits` library, characters).

The keys file (`--api-keys FILE`) is either JSON, `{"KEY": {"req_per_min": 60, "char_limit":
5000}, ...}` (or a list of key strings), or lines `KEY [REQ_PER_MIN] [CHAR_LIMIT]` (`#` starts a
comment, `-` leaves a limit unset). A file starting with `{`, `[` or `"` is read as JSON, and
any other JSON shape is refused with a ValueError naming the file and the shape expected. When a
file is given, every translate/detect request needs a known key (LibreTranslate's `api_key`
field): missing or unknown is 403.
"""

import json
from dataclasses import dataclass
from typing import Dict, Optional

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


@dataclass(frozen=True)
class KeyLimits:
    req_per_min: Optional[int] = None
    char_limit: Optional[int] = None


def _limit(value, what: str, where: str) -> Optional[int]:
    if value in (None, "-", ""):
        return None
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: {what} must be a whole number, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{where}: {what} must be >= 1, got {n}")
    return n


JSON_SHAPE = ('{"KEY": {"req_per_min": N, "char_limit": M}, ...} (either limit may be left '
              'out) or ["KEY", ...]')
_FIELDS = ("req_per_min", "char_limit")


def _json_keys(path: str, text: str) -> Dict[str, KeyLimits]:
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}; write {JSON_SHAPE}")

    try:
        data = json.loads(text)
    except ValueError as err:
        raise bad(f"not valid JSON ({err})") from None
    except RecursionError:
        raise bad("not valid JSON (nested too deeply)") from None
    if isinstance(data, list):
        if not all(isinstance(k, str) for k in data):
            raise bad("a JSON list of keys must hold only strings")
        data = {k: None for k in data}
    elif not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__} is not a keys file")
    keys: Dict[str, KeyLimits] = {}
    for key, spec in data.items():
        if not key.strip():
            raise bad("an API key is empty")
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise bad(f"the value of key {key!r} is {json.dumps(spec)}, not an object")
        unknown = sorted(set(spec) - set(_FIELDS))
        if unknown:
            raise bad(f"key {key!r} has unknown field(s) {', '.join(unknown)} (known: "
                      f"{', '.join(_FIELDS)})")
        where = f"{path}: key {key!r}"
        keys[key] = KeyLimits(_limit(spec.get("req_per_min"), "req_per_min", where),
                              _limit(spec.get("char_limit"), "char_limit", where))
    return keys


def load_keys(path: str) -> Dict[str, KeyLimits]:
    """The keys of a keys file (JSON or lines); ValueError naming the file, the problem and the
    shape expected for anything malformed."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    keys: Dict[str, KeyLimits] = {}
    if text.lstrip().startswith(("{", "[", '"')):
        keys = _json_keys(path, text)
    else:
        for n, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) > 3:
                raise ValueError(f"{path}:{n}: write KEY [REQ_PER_MIN] [CHAR_LIMIT]")
            where = f"{path}:{n}"
            keys[fields[0]] = KeyLimits(
                _limit(fields[1] if len(fields) > 1 else None, "REQ_PER_MIN", where),
                _limit(fields[2] if len(fields) > 2 else None, "CHAR_LIMIT", where))
    if not keys:
        raise ValueError(f"{path} holds no API key")
    return keys


class KeyGuard:
    """Checks a request's key; counts its requests in a moving one-minute window."""

    def __init__(self, keys: Optional[Dict[str, KeyLimits]] = None):
        self.keys = keys
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    @property
    def required(self) -> bool:
        return self.keys is not None

    def check(self, api_key: Optional[str]) -> Optional[tuple]:
        """None if allowed, else (status, message)."""
        if self.keys is None:
            return None
        if not api_key:
            return 403, "Invalid API key: this server requires an api_key"
        limits = self.keys.get(api_key)
        if limits is None:
            return 403, "Invalid API key"
        if limits.req_per_min and not self.limiter.hit(
                RateLimitItemPerMinute(limits.req_per_min), "key", api_key):
            return 429, f"Slowdown: {limits.req_per_min} per 1 minute"
        return None

    def char_limit(self, api_key: Optional[str]) -> Optional[int]:
        if self.keys is None or not api_key or api_key not in self.keys:
            return None
        return self.keys[api_key].char_limit
