"""Images handed over as text (agents, MCP): an http(s) URL, a data URL, or bare base64 -> bytes.

The bytes then go through `load_image` (through `ChatSession.prepare_images`) like any upload, so the
same byte and pixel limits apply. A string is never taken as a path: an agent must not make the server
read its own files.

Fetching a URL is guarded against server-side request forgery, since the server may sit next to
things the caller cannot reach:

- only http and https, no user:password@ in the URL;
- the host is resolved once, and every address it resolves to must be public: loopback, private,
  shared (100.64/10), link-local, multicast, reserved and unspecified addresses are refused, IPv4-mapped
  IPv6 included (`check_address`);
- the connection goes to the address that was checked (the IP is pinned: a second DNS answer cannot
  point it elsewhere), with the original host name in the Host header and for TLS (SNI, certificate);
- redirects are followed by hand, each hop checked the same way, at most `MAX_REDIRECTS`;
- the body is read in chunks and refused as soon as it passes the byte limit; one deadline bounds the
  whole fetch (connecting, slow bodies, redirects); no proxies, no compression.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse

from ..errors import ImageError
from .images import MAX_FILE_BYTES

MAX_REDIRECTS = 3
TIMEOUT_S = 15.0           # for the whole fetch, redirects included
USER_AGENT = "mini-gemini-studio (image fetch for a chat turn)"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_BASE64 = re.compile(rb"[A-Za-z0-9+/_-]*={0,2}")
_HOW = ("Give the image as an http(s) URL, a data URL (data:image/png;base64,...) or the file's bytes in "
        "base64.")


def _mb(n: int) -> str:
    return f"{n / (1 << 20):g} MB"


# ---- decoding a string ------------------------------------------------------------------------------
def image_bytes(source: str, *, max_bytes: int = MAX_FILE_BYTES, timeout: float = TIMEOUT_S) -> bytes:
    """The bytes of an image given as an http(s) URL, a data URL or bare base64; ImageError if none of
    those, or if it cannot be had within the limits. The bytes are not decoded here (load_image does)."""
    s = (source or "").strip()
    if not s:
        raise ImageError("No image was given. " + _HOW, "empty")
    head = s[:16].lower()
    if head.startswith(("http://", "https://")):
        return fetch(s, max_bytes=max_bytes, timeout=timeout)
    if head.startswith("data:"):
        meta, comma, payload = s.partition(",")
        if not comma or not meta.lower().endswith(";base64"):
            raise ImageError("A data URL must be base64 encoded (data:image/png;base64,...).", "unreadable")
        return decode_base64(payload, max_bytes=max_bytes)
    if ":" in s[:64]:  # another scheme (file:, ftp:, ...) or a Windows path; base64 has no colon
        raise ImageError("Only http and https URLs are fetched, and no files of the server are read. " + _HOW,
                         "unsupported")
    return decode_base64(s, max_bytes=max_bytes)


def decode_base64(text: str, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Standard or URL-safe base64 (whitespace and missing padding allowed); the size limit is checked
    on the encoded length first, so an oversized string is refused before anything is decoded."""
    data = re.sub(rb"\s+", b"", text.encode("ascii", "replace"))
    if len(data) > 4 * (max_bytes // 3 + 1) + 4:
        raise ImageError(f"The image is too large: the limit is {_mb(max_bytes)}.", "too_big")
    if not data or not _BASE64.fullmatch(data):
        raise ImageError("The image is neither a URL nor valid base64. " + _HOW, "unreadable")
    data = data.replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    try:
        raw = base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError("The image is neither a URL nor valid base64. " + _HOW, "unreadable") from e
    if len(raw) > max_bytes:
        raise ImageError(f"The image is too large: the limit is {_mb(max_bytes)}.", "too_big")
    return raw


# ---- fetching a URL -----------------------------------------------------------------------------------
def check_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address if it is a public unicast one; ImageError if it is loopback, private, link-local, shared,
    multicast, reserved or unspecified (an IPv6 address that carries an IPv4 one, mapped, compatible, 6to4,
    Teredo or NAT64, is judged by that IPv4)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # an IPv6 scope id ("fe80::1%eth0") is no part of it
    except ValueError as e:
        raise ImageError("The image URL's host has an address that cannot be checked.", "forbidden") from e
    judged = addr
    if isinstance(addr, ipaddress.IPv6Address):
        judged = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None) or addr
        if judged is addr and (int(addr) >> 32 == 0 and int(addr) > 1  # deprecated IPv4-compatible ::a.b.c.d
                               or addr in _NAT64):                      # DNS64/NAT64: 64:ff9b::a.b.c.d
            judged = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    bad = (judged.is_loopback or judged.is_private or judged.is_link_local or judged.is_multicast
           or judged.is_reserved or judged.is_unspecified or not judged.is_global)
    if bad or (judged is not addr and (addr.is_loopback or addr.is_link_local or addr.is_multicast)):
        raise ImageError("The image URL points at a local or private network address; only images on the "
                         "public internet are fetched.", "forbidden")
    return addr


def _resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (tests replace this)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _connect(ip: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to this (already checked) address (tests replace this)."""
    return socket.create_connection((ip, port), timeout=timeout)


def _public_addresses(host: str, port: int) -> list[str]:
    try:
        ips = _resolve(host, port)
    except (OSError, UnicodeError) as e:
        raise ImageError(f"Could not find the host of the image URL ({host}).", "unreachable") from e
    if not ips:
        raise ImageError(f"Could not find the host of the image URL ({host}).", "unreachable")
    for ip in ips:  # every answer must be public: a mixed answer is refused, not filtered
        check_address(ip)
    return ips


def _split(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ImageError("The image URL is not valid.", "unreadable") from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError("Only http and https image URLs are fetched. " + _HOW, "unsupported")
    if parts.username is not None or parts.password is not None:
        raise ImageError("Image URLs with a user name or password are not fetched.", "unsupported")
    host = parts.hostname
    if not host:
        raise ImageError("The image URL has no host.", "unreadable")
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return scheme, host, port or (443 if scheme == "https" else 80), target


def _connect_first(ips: list[str], port: int, timeout) -> tuple[socket.socket, str]:
    """A socket to the first of the checked `ips` that answers, and that address."""
    last: Exception | None = None
    for ip in ips:
        try:
            return _connect(ip, port, timeout), ip
        except OSError as e:
            last = e
    raise last or OSError("no address")


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection whose socket goes to a checked IP, whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, ips: list[str], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ips, self.connected_to = ips, None

    def connect(self):
        self.sock, self.connected_to = _connect_first(self.ips, self.port, self.timeout)


class _PinnedHTTPS(_PinnedHTTP):
    """As `_PinnedHTTP`, then TLS with the host's name (SNI and certificate check against the name, not the IP)."""

    def __init__(self, host: str, port: int, ips: list[str], timeout: float):
        super().__init__(host, port, ips, timeout)
        self.tls = ssl.create_default_context()

    def connect(self):
        super().connect()
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.host)


class _Pinned:
    """The pinned connection for a URL's scheme (`conn`), and the address it reached (`connected_to`)."""

    def __init__(self, scheme: str, host: str, port: int, ips: list[str], timeout: float):
        self.conn = (_PinnedHTTPS if scheme == "https" else _PinnedHTTP)(host, port, ips, timeout)

    @property
    def connected_to(self) -> str | None:
        return self.conn.connected_to


def _abort(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv (close alone may not)
        except OSError:
            pass


def fetch(url: str, *, max_bytes: int = MAX_FILE_BYTES, timeout: float = TIMEOUT_S,
          max_redirects: int = MAX_REDIRECTS) -> bytes:
    """GET an image over http(s) under the guards described in the module docstring."""
    deadline = time.monotonic() + timeout
    for _hop in range(max_redirects + 1):
        scheme, host, port, target = _split(url)
        ips = _public_addresses(host, port)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageError("Fetching the image URL took too long.", "timeout")
        pinned = _Pinned(scheme, host, port, ips, remaining)
        conn = pinned.conn
        # a hard stop at the deadline, also for a server that trickles its headers or body byte by byte
        watchdog = threading.Timer(remaining, _abort, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept": "image/*",
                                                 "Accept-Encoding": "identity", "Connection": "close"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise ImageError(f"The image URL redirects (HTTP {resp.status}) to nowhere.", "unreachable")
                url = urllib.parse.urljoin(url, location.strip())
                continue
            if resp.status != 200:
                raise ImageError(f"The image URL answered HTTP {resp.status} {resp.reason}.", "unreachable")
            length = resp.getheader("Content-Length")
            if length and length.strip().isdigit() and int(length) > max_bytes:
                raise ImageError(f"The image at the URL is too large ({_mb(int(length))}); the limit is "
                                 f"{_mb(max_bytes)}.", "too_big")
            chunks, size = [], 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ImageError("Fetching the image URL took too long.", "timeout")
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                chunk = resp.read1(min(65536, max_bytes + 1 - size))  # what has arrived, not a full block
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ImageError(f"The image at the URL is larger than the {_mb(max_bytes)} limit.",
                                     "too_big")
            if time.monotonic() >= deadline:  # cut off by the watchdog: the body may be incomplete
                raise ImageError("Fetching the image URL took too long.", "timeout")
            return b"".join(chunks)
        except ImageError:
            raise
        except TimeoutError as e:  # socket.timeout is TimeoutError
            raise ImageError("Fetching the image URL took too long.", "timeout") from e
        except ssl.SSLError as e:
            raise ImageError(f"Could not fetch the image URL securely ({e.reason or e}).", "unreachable") from e
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                raise ImageError("Fetching the image URL took too long.", "timeout") from e
            raise ImageError(f"Could not fetch the image URL ({type(e).__name__}).", "unreachable") from e
        finally:
            watchdog.cancel()
            conn.close()
    raise ImageError(f"The image URL redirects more than {max_redirects} times.", "unreachable")
