"""Who may talk to the server: the Host allow-list, same-origin POSTs and the optional API key.

`retriever serve` binds loopback, yet a browser on the same machine is a client too: any page
it visits can post to 127.0.0.1 (blind CSRF), and a DNS-rebinding page can even read the
answers under its own name. So every request is checked, in this order, before it reaches a
route:

1. its Host header must be one the operator named (400 otherwise): this defeats rebinding;
2. a POST from a browser must come from the server's own origin (403 otherwise);
3. when an API key is set, every route but the page and the schema needs it (401 otherwise),
   as `Authorization: Bearer KEY` or `X-API-Key: KEY`.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from retriever.errors import RetrieverError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
KEY_ENV = "RETRIEVER_API_KEY"
# The page is static and holds nothing secret; it asks for the key itself. The schema pages
# stay readable so /docs keeps working with a key set.
PUBLIC_PATHS = frozenset({"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def allowed_hosts(bind: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The Host names to accept: loopback names, the bound address (unless a wildcard) and `extra`."""
    names = [*LOOPBACK_NAMES]
    if bind not in ("0.0.0.0", "::", ""):
        names.append(bind)
    names += list(extra)
    return tuple(dict.fromkeys(name.strip("[]").lower() for name in names))


def exposure_warning(bind: str, api_key: str | None) -> str | None:
    """A warning for the operator when `bind` reaches beyond this machine with no API key."""
    if api_key or is_loopback(bind):
        return None
    return (
        f"serving on {bind} without an API key: anyone on the network can query it. Set "
        f"{KEY_ENV} or --api-key-file, and put a TLS proxy in front (README: Serving on a network)"
    )


def read_api_key(file: Path | None, environ: dict[str, str] | None = None) -> str | None:
    """The API key from `file` (its first line), else from RETRIEVER_API_KEY, else None.

    Raises:
        RetrieverError: the file cannot be read, or holds no key.
    """
    if file is not None:
        try:
            key = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise RetrieverError(f"cannot read the API key file {file}: {getattr(e, 'strerror', None) or e}") from None
        if not key:
            raise RetrieverError(f"the API key file {file} is empty")
        if "\n" in key:
            raise RetrieverError(f"the API key file {file} holds several lines; put the key alone on one line")
        return key
    key = (os.environ if environ is None else environ).get(KEY_ENV, "").strip()
    return key or None


def host_of(header: str) -> str:
    """The host name of a Host header, without its port (`[::1]:8000` -> `::1`)."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0].lower()
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


def host_problem(host: str | None, allowed: tuple[str, ...]) -> str | None:
    """Why a request's Host header is refused, or None."""
    if "*" in allowed:
        return None
    if not host:
        return "the request has no Host header"
    name = host_of(host)
    if name in allowed:
        return None
    return (
        f"Host {name!r} is not served here; start the server with --allowed-host {name} if that is this machine's name"
    )


def _netloc(url: str) -> str | None:
    try:
        return urlsplit(url).netloc.lower() or None
    except ValueError:
        return None


def cross_site_problem(method: str, headers: dict[str, str]) -> str | None:
    """Why a state-changing request looks sent by another site's page, or None.

    Browsers send Origin on every POST; Sec-Fetch-Site and Referer cover the rare one that does
    not. A client with none of them (curl, a script) is not a browser, so it cannot be tricked.
    """
    if method in SAFE_METHODS:
        return None
    own = (headers.get("host") or "").lower()
    origin = headers.get("origin")
    if origin is not None:
        if origin != "null" and _netloc(origin) == own:
            return None
        return f"cross-site request refused: it comes from {origin!r}, not from this server's page"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site})"
    referer = headers.get("referer")
    if referer and _netloc(referer) != own:
        return "cross-site request refused: its Referer is another site"
    return None


def sent_key(headers: dict[str, str]) -> str | None:
    """The key a request carries, from `Authorization: Bearer` or `X-API-Key`."""
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key")


def key_matches(sent: str | None, key: str) -> bool:
    """Compare in constant time, so the answer's timing does not reveal how much of a guess is right."""
    if sent is None:
        return False
    # Header values arrive latin-1 decoded; utf-8 bytes of both sides keep any key comparable.
    return hmac.compare_digest(sent.encode("latin-1", "replace"), key.encode("utf-8"))


class SecurityMiddleware:
    """ASGI middleware refusing, with a JSON 4xx, requests that fail `host_problem`,
    `cross_site_problem` or the API key."""

    def __init__(self, app, hosts: tuple[str, ...], api_key: str | None):
        self.app, self.hosts, self.api_key = app, hosts, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope["method"], scope["path"], headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        status, message, extra = refusal
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        await JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=extra)(
            scope, receive, send
        )

    def refusal(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str, dict] | None:
        """(status, message, headers) for a refused request, or None to let it through."""
        problem = host_problem(headers.get("host"), self.hosts)
        if problem:
            return 400, problem, {}
        problem = cross_site_problem(method, headers)
        if problem:
            return 403, problem, {}
        if self.api_key is None or (method in SAFE_METHODS and path in PUBLIC_PATHS):
            return None
        sent = sent_key(headers)
        if key_matches(sent, self.api_key):
            return None
        message = (
            "this server needs an API key: send Authorization: Bearer KEY or X-API-Key: KEY"
            if sent is None
            else "wrong API key"
        )
        return 401, message, {"WWW-Authenticate": "Bearer"}
