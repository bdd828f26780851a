"""The parameter-schema API: its config document, the POST with
``url_upload`` and a samples count, on the real engine."""

from __future__ import annotations

import base64
import datetime
import http.server
import io
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from PIL import Image

from sfumato.errors import InvalidParameterError
from sfumato.server.app import create_app
from sfumato.server.fetch import fetch_image
from sfumato.server.settings import ServerSettings

from .helpers import MODEL, error_body, gradient, png_bytes, wait_job

CONFIG = "/api/v1/public/config/diffusion"
POST = "/api/v1/private/client/ai/diffusion"


PICTURE = png_bytes(gradient(320))
HOST_HEADERS: list[str] = []
"""The ``Host`` header of each request the image sites answered."""


class _ImageSite(http.server.BaseHTTPRequestHandler):
    """A PNG, a redirect to it, a large file, a slow answer, text."""

    def do_GET(self) -> None:
        HOST_HEADERS.append(self.headers.get("Host", ""))
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/picture.png")
            self.end_headers()
            return
        if self.path == "/slow.png":
            time.sleep(3)
        body = {"/picture.png": PICTURE, "/slow.png": PICTURE, "/big.png": b"\0" * 200_000}.get(self.path, b"text")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server under test gave up on purpose (size or time limit)

    def log_message(self, *_args: Any) -> None:
        pass


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """Serve ``_ImageSite`` on a loopback port until the generator closes; yields the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageSite)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def image_site() -> Iterator[str]:
    """The image site over http on loopback; its base URL."""
    for port in _serve():
        yield f"http://127.0.0.1:{port}"


SITE_NAME = "pictures.example"


@pytest.fixture(scope="module")
def tls_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """The image site over https, with a self-signed certificate for ``SITE_NAME``:
    its port and the certificate's PEM file (the one CA a client must trust)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SITE_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SITE_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "site.pem", folder / "site.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    for port in _serve(context):
        yield port, cert_file


def test_config_document_describes_every_parameter_as_seed_003_does(client: TestClient) -> None:
    data = client.get(CONFIG).json()["data"]
    params = {p["in"]: p for p in data["aParam"]}
    assert set(params) == {"word", "url_upload", "steps", "guidance", "strength", "width", "height", "cimg", "seed",
                           "model"}  # fmt: skip
    assert params["word"]["isMandatory"] and params["word"]["type"] == "string"
    assert not params["url_upload"]["isMandatory"]
    # The seed's documented defaults and ranges.
    assert (params["steps"]["type"], params["steps"]["default"], params["steps"]["ui"]["max"]) == ("int", 20, 200)
    assert (params["guidance"]["type"], params["guidance"]["default"]) == ("float", 7.5)
    assert (params["guidance"]["ui"]["min"], params["guidance"]["ui"]["max"]) == (0.1, 10)
    assert (params["strength"]["default"], params["strength"]["ui"]["min"], params["strength"]["ui"]["max"]) == (
        0.75,
        0,
        1,
    )
    assert params["width"]["accept"]["$in"] == [320, 384, 448, 512, 640, 768] and params["width"]["default"] == 320
    assert params["cimg"]["accept"]["$in"] == [1, 2, 3, 4] and params["cimg"]["default"] == 1
    assert params["seed"]["default"] == 1 and params["seed"]["ui"]["max"] == 1_000_000
    assert params["model"]["accept"]["$in"] == [MODEL]
    assert all(p["ui"]["title"] and p["ui"]["widget"] and p["out"] for p in params.values())


def test_txt2img_with_a_samples_count(client: TestClient) -> None:
    created = client.post(POST, json={"word": "a harbour", "steps": 1, "cimg": 2, "seed": 9})
    assert created.status_code == 201, created.text
    uid = created.json()["data"]["uid"]
    assert created.json()["data"]["created_at"].endswith("Z")
    done = wait_job(client, uid)
    assert done["state"] == "done", done
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in done["images"]]
    assert len(images) == 2 and all(i.shape == (320, 320, 3) for i in images)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 0


def test_img2img_from_a_url_following_a_redirect(settings: ServerSettings, image_site: str) -> None:
    with TestClient(create_app(replace(settings, allow_private_urls=True))) as allowed:
        created = allowed.post(POST, json={"word": "a harbour", "url_upload": f"{image_site}/redirect", "steps": 1,
                                           "strength": 1.0})  # fmt: skip
        assert created.status_code == 201, created.text
        done = wait_job(allowed, created.json()["data"]["uid"])
        assert done["state"] == "done" and (done["width"], done["height"]) == (320, 320)
        assert done["payload"]["url_upload"] == f"{image_site}/redirect"


@pytest.mark.parametrize(
    ("path", "allow", "says"),
    [
        ("/picture.png", False, "loopback, private or reserved"),
        ("/text", True, "not a readable image"),
        ("/big.png", True, "the limit is 100000"),
        ("/slow.png", True, "timed out"),
        ("/missing-host", True, "cannot resolve"),
    ],
)
def test_url_upload_refusals_name_the_field(
    settings: ServerSettings,
    image_site: str,
    path: str,
    allow: bool,
    says: str,
) -> None:
    url = "http://no-such-host.invalid/x.png" if path == "/missing-host" else f"{image_site}{path}"
    local = replace(settings, allow_private_urls=allow, fetch_timeout_s=1.0, fetch_max_bytes=100_000)
    with TestClient(create_app(local)) as c:
        body = error_body(c.post(POST, json={"word": "x", "url_upload": url}), 422, "url_upload")
        assert says in body["error"], body


@pytest.mark.parametrize(("name", "host_header"), [("rebind.example", "rebind.example"),
                                                   ("bücher.example", "xn--bcher-kva.example")])  # fmt: skip
def test_url_upload_connects_to_the_address_it_checked(
    settings: ServerSettings,
    image_site: str,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    host_header: str,
) -> None:
    """A rebinding DNS answers a public address to the check and loopback after
    it: the fetch must connect to the checked address, sending the name as Host
    (IDNA-encoded, as on the wire)."""
    port = int(image_site.rsplit(":", 1)[1])
    answers = iter(["1.2.3.4"])
    resolve, connect = socket.getaddrinfo, socket.create_connection
    connected: list[tuple[str, int]] = []

    def rebinding(host: str, *args: Any, **kwargs: Any) -> Any:
        if host not in (name, host_header):
            return resolve(host, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers, "127.0.0.1"), port))]

    def to_the_site(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        connected.append(address)  # 1.2.3.4 stands for a public host; the site plays it
        return connect(("127.0.0.1", port) if address[0] == "1.2.3.4" else address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(socket, "create_connection", to_the_site)
    HOST_HEADERS.clear()
    data = fetch_image(f"http://{name}:{port}/picture.png", replace(settings, allow_private_urls=False))
    assert connected == [("1.2.3.4", port)]
    assert HOST_HEADERS == [f"{host_header}:{port}"]
    assert Image.open(io.BytesIO(data)).size == (320, 320)


def test_url_upload_over_https_checks_the_certificate_against_the_name(
    settings: ServerSettings,
    tls_site: tuple[int, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection goes to the checked address, TLS still uses the name: the
    site's certificate is valid for ``SITE_NAME`` and for no other name of it."""
    port, cert_file = tls_site
    resolve = socket.getaddrinfo

    def both_names_on_loopback(host: str, *args: Any, **kwargs: Any) -> Any:
        if host in (SITE_NAME, "other.example"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", both_names_on_loopback)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))  # httpx trusts it, as a private CA would be
    allowed = replace(settings, allow_private_urls=True)
    HOST_HEADERS.clear()
    data = fetch_image(f"https://{SITE_NAME}:{port}/picture.png", allowed)
    assert Image.open(io.BytesIO(data)).size == (320, 320)
    assert HOST_HEADERS == [f"{SITE_NAME}:{port}"]
    with pytest.raises(InvalidParameterError, match="CERTIFICATE_VERIFY_FAILED") as caught:
        fetch_image(f"https://other.example:{port}/picture.png", allowed)
    assert caught.value.field == "url_upload"


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "http://[::1]:1/a.png",
                                 "http://169.254.169.254/latest", "http://10.0.0.1/a.png"])  # fmt: skip
def test_url_upload_schemes_and_private_addresses_are_refused(client: TestClient, url: str) -> None:
    error_body(client.post(POST, json={"word": "x", "url_upload": url}), 422, "url_upload")


@pytest.mark.parametrize(
    ("body", "field"),
    [({"word": ""}, "word"), ({"word": "x", "width": 256}, "width"), ({"word": "x", "cimg": 5}, "cimg"),
     ({"word": "x", "steps": 201}, "steps"), ({"word": "x", "guidance": 0}, "guidance"),
     ({"word": "x", "saveinterval": 2}, "saveinterval")],
)  # fmt: skip
def test_param_schema_bad_requests_name_the_field(client: TestClient, body: dict[str, Any], field: str) -> None:
    error_body(client.post(POST, json=body), 422, field)


def test_param_schema_backlog_full_is_409(settings: ServerSettings) -> None:
    with TestClient(create_app(replace(settings, queue_size=1))) as small:
        first = small.post(POST, json={"word": "x", "steps": 1})
        assert first.status_code == 201
        assert error_body(small.post(POST, json={"word": "y", "steps": 1}), 409)["code"] == "queue_full"
        small.delete(f"/queue/{first.json()['data']['uid']}")
