"""Fetching an image from a URL a client names (the parameter-schema API's ``url_upload``).

Only http(s) is fetched. Every address the host name resolves to is checked,
at each redirect too: loopback, private, link-local, multicast, reserved and
unspecified addresses are refused unless the server allows them, so a
request cannot make the server reach into its own network. The connection
then goes to the addresses that were checked, not to a second lookup of the
name, so a DNS answer that changes in between (rebinding) cannot redirect it;
the ``Host`` header and TLS (SNI and certificate) still use the name. The
answer must come within the timeout (for the whole transfer, not per read)
and stay under the size limit.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit

import httpx

from sfumato import images as imaging
from sfumato.errors import InvalidParameterError
from sfumato.server.settings import ServerSettings

MAX_REDIRECTS = 3


def _refused(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any((ip.is_private, ip.is_loopback, ip.is_link_local, ip.is_multicast, ip.is_reserved, ip.is_unspecified))


def checked_addresses(host: str, port: int, allow_private: bool, field: str) -> list[str]:
    """The addresses ``host`` resolves to, in the resolver's order; refused when
    any of them is one the server must not reach."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidParameterError(field, f"cannot resolve host {host!r} ({exc})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if not allow_private and _refused(address):
            raise InvalidParameterError(
                field,
                f"host {host!r} is a loopback, private or reserved address ({address}); this server refuses those",
            )
    return addresses


def _open_pinned(client: httpx.Client, url: str, addresses: list[str], port: int) -> httpx.Response:
    """GET ``url`` from the first of ``addresses`` that accepts a connection, as
    ``url``'s host name (``Host`` header, SNI, certificate); the answer streams."""
    target = httpx.URL(url)
    name = target.raw_host.decode("ascii")  # IDNA-encoded, as DNS and TLS see it
    extensions = {"sni_hostname": name} if target.scheme == "https" else {}
    headers = {"Host": target.netloc.decode("ascii")}
    for i, address in enumerate(addresses):
        request = client.build_request(
            "GET", target.copy_with(host=address, port=port), headers=headers, extensions=extensions
        )
        try:
            return client.send(request, stream=True)
        except httpx.ConnectError:
            if i == len(addresses) - 1:
                raise
    raise httpx.ConnectError(f"{name!r} resolved to no address")


def fetch_image(url: str, settings: ServerSettings, field: str = "url_upload") -> bytes:
    """The bytes of the image at ``url``, checked readable.

    Raises
    ------
    InvalidParameterError
        Naming ``field``: a refused scheme or address, a timeout, an answer too
        large or not 200, or bytes that are not an image.
    """
    deadline = time.monotonic() + settings.fetch_timeout_s
    limit = settings.fetch_max_bytes
    with httpx.Client(timeout=settings.fetch_timeout_s, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise InvalidParameterError(
                    field, f"only http and https URLs are fetched, got {parts.scheme or 'none'!r}"
                )
            if not parts.hostname:
                raise InvalidParameterError(field, f"{url!r} has no host")
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise InvalidParameterError(field, f"{url!r} has an invalid port") from None
            addresses = checked_addresses(parts.hostname, port, settings.allow_private_urls, field)
            try:
                with contextlib.closing(_open_pinned(client, url, addresses, port)) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise InvalidParameterError(field, f"fetching {url!r} answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise InvalidParameterError(field, f"the image is {declared} bytes; the limit is {limit}")
                    data = bytearray()
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise InvalidParameterError(field, f"the image passed {limit} bytes; the limit is {limit}")
                        if time.monotonic() > deadline:
                            raise httpx.ReadTimeout("the transfer took too long")
            except httpx.TimeoutException:
                raise InvalidParameterError(
                    field, f"fetching {url!r} timed out after {settings.fetch_timeout_s} s"
                ) from None
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise InvalidParameterError(field, f"fetching {url!r} failed: {exc}") from None
            imaging.to_array(bytes(data), field)
            return bytes(data)
    raise InvalidParameterError(field, f"more than {MAX_REDIRECTS} redirects")
