"""Job-finished notifications: a JSON POST to the URL a job was submitted with.

Backend teams would otherwise poll. A job submitted with ``notify_url`` (``deblur
submit --notify URL``, the HTTP API's ``notify_url``) gets one POST each time it
finishes: done, failed or cancelled (and again after a retry finishes it anew).
Whoever makes the transition (the worker that records the last image, the
producer when a job finishes while it is still being submitted, or a cancel)
enqueues a ``deblur.notify_job`` task; a worker delivers it, retrying with
back-off while the receiver is down or answers with an error, so a receiver that
restarts does not lose the message. Deliveries are at least once: the body's
``delivery`` id is the same on every attempt, so a receiver can drop repeats.

With ``DEBLUR_NOTIFY_SECRET`` set, each POST carries
``X-Deblur-Signature: sha256=<hex HMAC-SHA256 of the body with that secret>``.

Whoever may submit a job chooses the URL, so the workers do not send into the operator's own network: a URL whose
host is, or resolves to, a loopback, private, link-local (the cloud metadata service), shared (100.64.0.0/10),
unspecified, multicast or reserved address is refused, unless ``DEBLUR_NOTIFY_ALLOW_NETWORKS`` names a network
holding it. It is checked at submission and again before each delivery, where the worker connects only to the
addresses it has just checked: a name that resolved to a public address at submission and resolves to
127.0.0.1 now (DNS rebinding) reaches nothing. An IPv4 address written as IPv6 (``::ffff:127.0.0.1``) is judged
as the IPv4 address it is.
"""

from __future__ import annotations

import hashlib
import http.client
import hmac
import ipaddress
import json
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from jobs.errors import InputError, TransientError
from jobs.settings import HELP, Settings, load_settings

NOTIFY_TASK = "deblur.notify_job"
EVENT = "job.finished"
TIMEOUT_S = 10.0


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolved = tuple[socket.AddressFamily, tuple[Any, ...]]
"""One answer of ``getaddrinfo``: the family and socket address to connect to."""

ALLOW_ENV = HELP["notify_allow_networks"].env
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; Python counts it neither private nor global
_METADATA = ipaddress.ip_address("169.254.169.254")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_DEFAULT_TIMEOUT: Any = socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]  # "no timeout given"


def check_notify_url(url: str, allow: Sequence[Network] | None = None) -> str:
    """``url`` if the workers may POST to it; raises InputError naming the problem otherwise.

    It must be an absolute http(s) URL with a host that neither is nor resolves to an address of the local network
    outside ``allow`` (default: ``DEBLUR_NOTIFY_ALLOW_NETWORKS``). A host that does not resolve here is accepted:
    the producer may not see the names the workers do, and they resolve and check it again before each delivery.
    """
    host, port = _target(url)
    try:
        resolved = _resolve(host, port)
    except OSError:
        return url
    _refuse_local(url, host, resolved, _allowed(allow))
    return url


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"notify URL {url!r} is not an absolute http:// or https:// URL with a host")
    try:
        port = parts.port
    except ValueError:
        raise InputError(f"notify URL {url!r} has no valid port (1..65535)") from None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _allowed(allow: Sequence[Network] | None) -> Sequence[Network]:
    return load_settings().notify_allowed_networks() if allow is None else allow


def _resolve(host: str, port: int) -> list[Resolved]:
    """Every address ``host`` resolves to (a literal address, in any form ``inet_aton`` reads, is its own)."""
    return [(family, sockaddr) for family, _, _, _, sockaddr in
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _refuse_local(url: str, host: str, resolved: Sequence[Resolved], allow: Sequence[Network]) -> None:
    """Raise InputError when any address in ``resolved`` lies in the local network and outside ``allow``."""
    for _, sockaddr in resolved:
        address = ipaddress.ip_address(sockaddr[0])
        kind = local_kind(address, allow)
        if kind is None:
            continue
        judged = _unmapped(address)
        shown = f"{address} (IPv4 {judged})" if judged != address else str(address)
        named = f"names {shown}" if _literal(host) == address else f"has a host, {host!r}, that resolves to {shown}"
        raise InputError(
            f"notify URL {url!r} {named}, {kind}: the workers send no notifications into the local network. The "
            f"operator can allow its network with {ALLOW_ENV} (e.g. {ALLOW_ENV}={ipaddress.ip_network(judged)})")


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _unmapped(address: Address) -> Address:
    """``address``, or the IPv4 address an IPv4-mapped IPv6 one stands for: a socket given ::ffff:a.b.c.d
    reaches a.b.c.d."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def local_kind(address: Address, allow: Sequence[Network] = ()) -> str | None:
    """What makes ``address`` an address of the local network ("a loopback address", ...), or None when it is
    public or in one of the networks ``allow`` names. An IPv4-mapped IPv6 address is judged as its IPv4 one."""
    address = _unmapped(address)
    if any(address in network for network in allow):
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "the unspecified address (this host)"
    if address == _METADATA:
        return "a link-local address (the cloud metadata service)"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in _SHARED:
        return "a shared address (100.64.0.0/10, carrier-grade NAT)"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "an address that is not globally routable"
    if isinstance(address, ipaddress.IPv6Address):  # 6to4 and NAT64 carry an IPv4 address the packet ends at
        carried = address.sixtofour or (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
                                        if address in _NAT64 else None)
        kind = local_kind(carried, allow) if carried else None
        if kind:
            return f"an IPv6 address that carries {carried}, {kind}"
    return None


def announce(settings: Settings, job_id: str) -> None:
    """Enqueue the notification of a job that has just finished (the task finds the URL in the job's spec).

    It goes at the most urgent priority: a notification takes a moment, and queued behind another job's
    thousands of batches it would arrive hours after the job finished.
    """
    from jobs.celery_app import PRIORITY_LEVELS, app_for, broker_priority

    delivery = str(uuid.uuid4())
    app_for(settings).send_task(NOTIFY_TASK, args=[job_id, delivery], queue=settings.queue,
                                priority=broker_priority(PRIORITY_LEVELS - 1))


def announce_if_wanted(settings: Settings, job_id: str, spec: dict[str, Any] | None) -> None:
    """:func:`announce` when the job's ``spec`` asks for notifications."""
    if spec and spec.get("notify_url"):
        announce(settings, job_id)


def body(job: dict[str, Any], delivery: str) -> bytes:
    """The JSON document POSTed: the event, a delivery id and the job's status as ``deblur status`` reports it."""
    return json.dumps({"event": EVENT, "delivery": delivery, "job": job}, sort_keys=True, default=str).encode()


def deliver(url: str, payload: bytes, secret: str | None = None, timeout: float = TIMEOUT_S,
            allow: Sequence[Network] | None = None) -> int:
    """POST ``payload`` to ``url``; returns the HTTP status.

    The host is resolved and every address checked as at submission (``allow``, default
    ``DEBLUR_NOTIFY_ALLOW_NETWORKS``), and the POST goes to those addresses, never to a second answer from DNS.
    Through a proxy (``http_proxy``/``https_proxy``, unless ``no_proxy`` names the host) the proxy connects, so
    only what the host resolves to here is checked, and a host that does not resolve here is left to the proxy.

    Raises:
        TransientError: the receiver could not be resolved or reached, timed out, or
            answered 5xx, 408 or 429: worth trying again later.
        InputError: the URL leads into the local network, or any other non-2xx answer (a 404, say): trying
            again will not help.
    """
    host, port = _target(url)
    scheme = urlsplit(url).scheme
    proxy = _proxy_for(scheme, urlsplit(url).netloc.rpartition("@")[2])
    try:
        resolved = _resolve(host, port)
    except OSError as exc:
        if proxy is None:
            raise TransientError(f"notify {url}: cannot resolve {host!r} ({exc})") from None
        resolved = []
    _refuse_local(url, host, resolved, _allowed(allow))
    headers = {"Content-Type": "application/json", "User-Agent": "deblur-notify/1", "X-Deblur-Event": EVENT}
    if secret:
        signature = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
        headers["X-Deblur-Signature"] = f"sha256={signature}"
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    connect = _ConnectTo(None if proxy else resolved)
    opener = urllib.request.build_opener(
        _NoRedirects, urllib.request.ProxyHandler({scheme: proxy} if proxy else {}),
        _PinnedHTTPHandler(connect), _PinnedHTTPSHandler(connect))
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (408, 429):
            raise TransientError(f"notify {url}: the receiver answered {exc.code}") from None
        if 300 <= exc.code < 400:
            raise InputError(f"notify {url}: the receiver answered {exc.code}, a redirect to "
                             f"{exc.headers.get('Location')!r}; not followed (it would turn the POST into a GET "
                             "without the body): submit with the URL it names") from None
        raise InputError(f"notify {url}: the receiver answered {exc.code}; not retried") from None
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientError(f"notify {url}: cannot reach the receiver ({reason!r})") from None


def _proxy_for(scheme: str, netloc: str) -> str | None:
    """The proxy the environment names for ``scheme``, unless ``no_proxy`` exempts ``netloc``."""
    proxy = urllib.request.getproxies().get(scheme)
    return proxy if proxy and not urllib.request.proxy_bypass(netloc) else None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a hop: urllib would follow a 301/302 as a GET without the body, and the
    notification would be reported delivered while nothing was (and a redirect could point into the local
    network)."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class _ConnectTo:
    """``http.client``'s socket factory for one delivery: it connects to the addresses checked for the receiver,
    whatever DNS answers by now (``None``: to the proxy it is asked for, as ``socket.create_connection`` does)."""

    def __init__(self, resolved: Sequence[Resolved] | None) -> None:
        self.resolved = resolved

    def __call__(self, address: tuple[str, int], timeout: Any = _DEFAULT_TIMEOUT,
                 source_address: tuple[str, int] | None = None) -> socket.socket:
        if self.resolved is None:
            return socket.create_connection(address, timeout, source_address)
        error: OSError = OSError(f"no address to connect to for {address[0]}")
        for family, sockaddr in self.resolved:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                if timeout is not _DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
        raise error


def _pinned(base: type[http.client.HTTPConnection], connect: _ConnectTo) -> Any:
    def connection(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        made = base(*args, **kwargs)
        made._create_connection = connect  # type: ignore[attr-defined]  # the hook connect() opens its socket with
        return made
    return connection


class _PinnedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, connect: _ConnectTo) -> None:
        super().__init__()
        self.connect = connect

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_pinned(http.client.HTTPConnection, self.connect), req)


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connect: _ConnectTo) -> None:
        super().__init__()
        self.connect = connect

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_pinned(http.client.HTTPSConnection, self.connect), req, context=self._context)
