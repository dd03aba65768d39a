"""Agents as users: images given as text (URL / data URL / base64) with the URL fetch's SSRF guards, and
the app's MCP tool driven by a real MCP client (PyPI `mcp`, streamable HTTP) against an app on loopback.

No traffic ever leaves the machine: refusals are checked on loopback and private addresses, and the
accepted path uses a patched resolver that answers a public address and a patched connector that records
that address but connects to a test server on 127.0.0.1.
"""
import asyncio
import base64
import http.server
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mini_gemini.errors import ImageError
from mini_gemini.inputs import remote
from helpers import launch_app, stop_process

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "squares-1.png"
QUESTION = "What digit is in the red square?"
FOLLOW_UP = "And which colour is the largest square?"
PUBLIC = "93.184.215.14"    # stands for a public host; never contacted (the connector is patched)


def _png(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


# ---- strings -> bytes ------------------------------------------------------------------------------------
def test_data_urls_and_base64_decode_and_paths_are_never_read(tmp_path):
    png = _png()
    b64 = base64.b64encode(png).decode()
    assert remote.image_bytes("data:image/png;base64," + b64) == png
    assert remote.image_bytes(b64) == png
    assert remote.image_bytes(base64.urlsafe_b64encode(png).decode().rstrip("=")) == png
    assert remote.image_bytes(" \n" + b64[:40] + "\n" + b64[40:]) == png  # wrapped lines
    secret = tmp_path / "secret.png"
    secret.write_bytes(png)
    for bad in (f"file://{secret}", "ftp://example.com/a.png", "C:\\images\\a.png", "data:image/png,rawbytes",
                "", "not base64 at all!"):
        with pytest.raises(ImageError):
            remote.image_bytes(bad)
    # a path made only of base64 characters is decoded as base64 (garbage), never opened
    assert remote.image_bytes(str(secret).replace(".", "")) != png


def test_base64_size_limit_is_checked_before_decoding():
    with pytest.raises(ImageError, match="too large"):
        remote.decode_base64("A" * 2000, max_bytes=1000)
    assert len(remote.decode_base64(base64.b64encode(b"x" * 1000).decode(), max_bytes=1000)) == 1000


# ---- URL guards -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ip", ["127.0.0.1", "127.8.9.1", "10.1.2.3", "172.16.0.1", "192.168.1.1",
                                "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1",
                                "255.255.255.255", "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1",
                                "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1",
                                "64:ff9b::7f00:1"])
def test_non_public_addresses_are_refused(ip):
    with pytest.raises(ImageError, match="local or private"):
        remote.check_address(ip)


@pytest.mark.parametrize("ip", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::5db8:d70e"])
def test_public_addresses_pass(ip):
    assert str(remote.check_address(ip)) == ip


def _no_connect(*a, **k):
    raise AssertionError("a refused URL must not be connected to")


@pytest.mark.parametrize("url", ["http://127.0.0.1/a.png", "http://localhost:7860/config", "http://10.0.0.5/x",
                                 "http://169.254.169.254/latest/meta-data/", "http://[::1]:80/a.png",
                                 "https://2130706433/a.png", "http://0x7f.1/a.png", "http://0/a.png"])
def test_urls_to_local_or_private_addresses_are_refused_before_connecting(url, monkeypatch):
    monkeypatch.setattr(remote, "_connect", _no_connect)
    with pytest.raises(ImageError, match="local or private"):
        remote.image_bytes(url)


def test_a_hostname_resolving_to_loopback_is_refused(monkeypatch):
    monkeypatch.setattr(remote, "_connect", _no_connect)
    monkeypatch.setattr(remote, "_resolve", lambda host, port: ["127.0.0.1"])
    with pytest.raises(ImageError, match="local or private"):
        remote.fetch("http://images.example.com/cat.png")
    # one private address among public ones is enough to refuse (no filtering, no retrying elsewhere)
    monkeypatch.setattr(remote, "_resolve", lambda host, port: [PUBLIC, "10.0.0.7"])
    with pytest.raises(ImageError, match="local or private"):
        remote.fetch("http://images.example.com/cat.png")


def test_other_schemes_and_credentials_are_refused(monkeypatch):
    monkeypatch.setattr(remote, "_connect", _no_connect)
    for url in ("gopher://example.com/", "http://user:pw@example.com/a.png", "http:///a.png"):
        with pytest.raises(ImageError):
            remote.fetch(url)


class _Server:
    """A test HTTP server on 127.0.0.1 whose answers the test sets per path."""

    def __init__(self):
        self.routes, self.requests = {}, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append((self.path, self.headers.get("Host")))
                status, headers, body = owner.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers and not callable(body):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if callable(body):
                    body(self.wfile)
                else:
                    self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def pinned(monkeypatch):
    """Public-looking hosts resolve to PUBLIC; connections to PUBLIC land on a loopback test server. The
    connector records where the fetch wanted to go (the pinned IP), and refuses any other address."""
    srv = _Server()
    dialled = []

    def resolve(host, port):
        return {"images.example.com": [PUBLIC], "cdn.example.net": [PUBLIC], "evil.example.org": ["127.0.0.1"],
                "meta.example.org": ["169.254.169.254"]}.get(host) or _fail(host)

    def connect(ip, port, timeout):
        dialled.append((ip, port))
        assert ip == PUBLIC, f"tried to connect to {ip}"
        return socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)

    def _fail(host):
        raise socket.gaierror(f"unknown host {host}")

    monkeypatch.setattr(remote, "_resolve", resolve)
    monkeypatch.setattr(remote, "_connect", connect)
    srv.dialled = dialled
    yield srv
    srv.close()


def test_a_public_url_is_fetched_from_the_pinned_address(pinned):
    png = _png()
    pinned.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, png)
    assert remote.image_bytes("http://images.example.com/cat.png") == png
    assert pinned.dialled == [(PUBLIC, 80)]
    assert pinned.requests == [("/cat.png", "images.example.com")]  # the host name travels in Host


def test_redirects_are_checked_hop_by_hop_and_bounded(pinned):
    png = _png()
    pinned.routes["/a"] = (302, {"Location": "http://cdn.example.net/b"}, b"")
    pinned.routes["/b"] = (301, {"Location": "/cat.png"}, b"")
    pinned.routes["/cat.png"] = (200, {}, png)
    assert remote.fetch("http://images.example.com/a") == png
    assert [p for p, _ in pinned.requests] == ["/a", "/b", "/cat.png"]

    for target in (f"http://127.0.0.1:{pinned.port}/cat.png", "http://evil.example.org/x",
                   "http://meta.example.org/latest", "http://[::1]/x", "file:///etc/passwd"):
        pinned.routes["/to-local"] = (307, {"Location": target}, b"")
        with pytest.raises(ImageError):
            remote.fetch("http://images.example.com/to-local")
    assert all(ip == PUBLIC for ip, _ in pinned.dialled)

    pinned.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(ImageError, match="redirects more than 3 times"):
        remote.fetch("http://images.example.com/loop")
    assert sum(p == "/loop" for p, _ in pinned.requests) == 4


def test_size_limit_while_streaming_and_timeout(pinned):
    pinned.routes["/big-declared"] = (200, {"Content-Length": "5000"}, b"x" * 5000)
    with pytest.raises(ImageError, match="too large"):
        remote.fetch("http://images.example.com/big-declared", max_bytes=1000)

    def endless(wfile):  # no Content-Length, never ends by itself
        try:
            for _ in range(1000):
                wfile.write(b"y" * 1024)
        except OSError:
            pass
    pinned.routes["/endless"] = (200, {"Connection": "close"}, endless)
    with pytest.raises(ImageError, match="larger than"):
        remote.fetch("http://images.example.com/endless", max_bytes=10_000)

    def slow(wfile):
        for _ in range(20):
            try:
                wfile.write(b"z")
                wfile.flush()
            except OSError:
                return
            time.sleep(0.2)
    pinned.routes["/slow"] = (200, {"Content-Length": "20"}, slow)
    # a byte every 0.2 s never trips a per-read timeout: only a deadline on the whole fetch stops it
    with pytest.raises(ImageError, match="too long"):
        remote.fetch("http://images.example.com/slow", timeout=1.0)

    pinned.routes["/missing"] = (404, {}, b"")
    with pytest.raises(ImageError, match="HTTP 404"):
        remote.fetch("http://images.example.com/missing")


# ---- the app's MCP tool (unit level) ---------------------------------------------------------------------
def test_mining_summary_names_the_strongest_regions():
    from mini_gemini.ui.mcp import region_shares
    m = np.zeros((3, 3))  # token cells that line up with the ninths of a square photo
    m[0, 0], m[1, 1], m[2, 2] = 6.0, 1.0, 3.0
    shares = dict(region_shares(m, 100, 100))
    assert shares["top-left"] == pytest.approx(0.6) and shares["bottom-right"] == pytest.approx(0.3)
    assert shares["centre"] == pytest.approx(0.1) and shares["top"] == 0
    assert sum(shares.values()) == pytest.approx(1.0)
    wide = np.zeros((4, 4))
    wide[1, 3] = 1.0  # a 200 x 100 photo sits in rows 1-2 of the padded square; padding rows are cut
    assert region_shares(wide, 200, 100)[0][0] in ("top-right", "right")
    assert region_shares(np.zeros((4, 4)), 10, 10) == []


def test_the_summary_says_where_the_answer_looked(monkeypatch):
    """The tool's summary comes from the answer's own map (its attribution through mining), not from the
    question-agnostic mining focus: on the demo model, the digit's answer drew on the red square's region."""
    from mini_gemini.chat.engine import GenOptions
    from mini_gemini.ui import mcp, server
    from mini_gemini.ui.settings import parse_args
    from mini_gemini.viz import heatmap as hm
    from mini_gemini.viz.answer_map import answer_summary
    loader = server.Loader(parse_args(["--model", "demo", "--sdxl", "none", "--device", "cpu"])).start()
    engine = loader.wait()
    monkeypatch.setattr(server, "LOADER", loader)
    session = engine.session("mcp-summary")
    list(session.chat(QUESTION, [str(EXAMPLE)], options=GenOptions(temperature=0)))
    turn = session.turns[-1]
    text = mcp.mining_summary(session, turn.images)
    layout = hm.Layout.from_config(engine.model.config)
    want = answer_summary(session.explain(), session.images_seen(turn), turn.images, {id(turn.images[0]): 1}, layout)
    assert text == "Mining summary, where the answer looked: " + want["text"]
    # the red square (with its digit) lies right of the centre of squares-1.png: the answer drew on it most
    assert want["images"][0]["regions"][0]["region"] == "right" and want["images"][0]["regions"][0]["share"] > 0.5
    assert "Without the mined detail" in text
    assert mcp.describe_image(turn.images[0], 1, layout).split(": ", 1)[1] not in text  # not the mining focus


def test_the_flag_comes_from_the_command_line_or_the_environment(monkeypatch):
    from mini_gemini.ui.settings import parse_args
    for var in ("MGM_MCP_SERVER", "GRADIO_MCP_SERVER"):
        monkeypatch.delenv(var, raising=False)
    assert parse_args([]).mcp is False
    assert parse_args(["--mcp"]).mcp is True
    monkeypatch.setenv("GRADIO_MCP_SERVER", "True")
    assert parse_args([]).mcp is True
    monkeypatch.delenv("GRADIO_MCP_SERVER")
    monkeypatch.setenv("MGM_MCP_SERVER", "1")
    assert parse_args([]).mcp is True


# ---- a real MCP client against the running app ---------------------------------------------------------
@pytest.fixture(scope="module")
def mcp_server(tiny_checkpoint, tmp_path_factory):
    """(URL, log file) of an app serving the MCP tool."""
    pytest.importorskip("mcp", reason="the MCP tests need the `mcp` package: pip install 'mcp>=1.21,<2'")
    tmp = tmp_path_factory.mktemp("mcp-app")
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    env.pop("GRADIO_MCP_SERVER", None)
    proc, url = launch_app(["--model", tiny_checkpoint("vicuna"), "--sdxl", "none", "--device", "cpu",
                            "--max-new-tokens", "48", "--mcp"], tmp, tmp / "app.log", env=env)
    try:
        yield url, tmp / "app.log"
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def mcp_app(mcp_server):
    return mcp_server[0]


async def _with_session(url, work):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client
    async with streamablehttp_client(url + "/gradio_api/mcp/") as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await work(session)


def _reply(result) -> tuple[str, str, str]:
    """(answer with its notes, mining summary, session line) of one tool result."""
    [content] = result.content
    assert content.type == "text"
    paragraphs = content.text.split("\n\n")
    k = next(i for i, p in enumerate(paragraphs) if p.startswith("Mining summary"))
    assert k == len(paragraphs) - 2 and paragraphs[-1].startswith("session_id: ")
    return "\n\n".join(paragraphs[:k]), paragraphs[k], paragraphs[-1]


def _error(result) -> str:
    assert result.isError
    return " ".join(c.text for c in result.content if c.type == "text")


def test_an_mcp_client_lists_the_tool_and_chats_about_an_image(mcp_app):
    b64 = base64.b64encode(EXAMPLE.read_bytes()).decode()

    async def work(s):
        tools = (await s.list_tools()).tools
        first = await s.call_tool("chat_about_image", {"message": QUESTION, "image": b64, "temperature": 0})
        sid = _reply(first)[2].split()[1]
        follow = await s.call_tool("chat_about_image", {"message": FOLLOW_UP, "session_id": sid,
                                                        "temperature": 0})
        fresh = await s.call_tool("chat_about_image", {"message": FOLLOW_UP, "temperature": 0})
        data_url = await s.call_tool("chat_about_image", {"message": QUESTION, "temperature": 0,
                                                          "image": "data:image/png;base64," + b64})
        local = await s.call_tool("chat_about_image", {"message": QUESTION, "image": mcp_app + "/config"})
        bad_sid = await s.call_tool("chat_about_image", {"message": "hi", "session_id": "../../etc"})
        broken = await s.call_tool("chat_about_image", {"message": "hi", "session_id": sid,
                                                        "image": base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).decode()})
        again = await s.call_tool("chat_about_image", {"message": FOLLOW_UP, "session_id": sid, "temperature": 0})
        return tools, first, follow, fresh, data_url, local, bad_sid, broken, again

    tools, first, follow, fresh, data_url, local, bad_sid, broken, again = asyncio.run(_with_session(mcp_app, work))

    # only the agents' tool is offered (not /chat, whose file-list schema agents cannot fill), fully typed
    assert [t.name for t in tools] == ["chat_about_image"]
    tool = tools[0]
    props = tool.inputSchema["properties"]
    assert list(props) == ["message", "image", "session_id", "temperature"]
    assert [props[k]["type"] for k in props] == ["string", "string", "string", "number"]
    assert tool.inputSchema.get("required") == ["message"]
    assert "$ref" not in str(tool.inputSchema) and "FileData" not in str(tool.inputSchema)
    assert all(props[k]["description"] for k in props)
    assert "mining" in tool.description and "session_id" in tool.description

    assert not first.isError, first.content
    answer, summary, session = _reply(first)
    assert answer.strip()
    assert summary.startswith("Mining summary, where the answer looked: Image 1 (512×384 px): the answer drew on")
    assert session.startswith("session_id: ") and "turn 1 of this conversation" in session
    sid = session.split()[1]

    # the second call continues the conversation: turn 2, and an answer made with the image in view
    assert not follow.isError, follow.content
    f_answer, f_summary, f_session = _reply(follow)
    assert f_session.startswith(f"session_id: {sid} ") and "turn 2 of" in f_session
    assert "no image in this turn" in f_summary and "Image 1 (512×384 px): the answer drew on" in f_summary
    fr_answer, fr_summary, fr_session = _reply(fresh)
    assert "turn 1 of" in fr_session and fr_session.split()[1] != sid
    assert fr_summary == "Mining summary: no image in this conversation yet."
    assert f_answer != fr_answer

    assert not data_url.isError and _reply(data_url)[0] == answer  # same image, same greedy answer

    assert "local or private" in _error(local)
    assert "session_id" in _error(bad_sid)
    assert "damaged or incomplete" in _error(broken)
    # the refused image left no trace: the conversation goes on at turn 3
    assert not again.isError and "turn 3 of" in _reply(again)[2]


def test_the_chat_endpoint_is_not_an_mcp_tool_but_stays_an_api(mcp_app):
    from gradio_client import Client, handle_file
    reply, _, gallery = Client(mcp_app, verbose=False).predict(QUESTION, [handle_file(str(EXAMPLE))], False, 0.0,
                                                               api_name="/chat")
    assert reply and len(gallery) == 3  # mining focus, mining gain, where the answer looked

    async def work(s):
        return await s.call_tool("api_chat", {"message": "hi"})
    assert "Unknown tool" in _error(asyncio.run(_with_session(mcp_app, work)))


def test_wrong_typed_tool_arguments_get_one_sentence_and_no_traceback(mcp_server):
    """A value of the wrong JSON type is refused by the MCP layer against the tool's schema (one sentence naming
    the value and the type wanted; the app never sees it); a number out of range reaches the tool and is refused
    there in one sentence, with one line in the app's log. No traceback anywhere."""
    url, log = mcp_server
    mistyped = [{"message": 5}, {"message": ["hi"]}, {"message": {"text": "hi"}}, {"message": "hi", "image": 3},
                {"message": "hi", "image": ["data:image/png;base64,AAAA"]}, {"message": "hi", "session_id": 12345678},
                {"message": "hi", "temperature": "hot"}, {"message": "hi", "temperature": [0.2]},
                {"message": "hi", "temperature": True}]
    out_of_range = [{"message": "hi", "temperature": 7}, {"message": "hi", "temperature": -1},
                    {"message": "hi", "temperature": 1e308}]

    async def work(s):
        return [await s.call_tool("chat_about_image", args) for args in mistyped + out_of_range]
    before = log.read_text()
    results = asyncio.run(_with_session(url, work))
    for args, result in zip(mistyped, results):
        error = _error(result)
        assert "is not of type" in error and "\n" not in error and "Traceback" not in error, (args, error)
    for args, result in zip(out_of_range, results[len(mistyped):]):
        error = _error(result)
        assert error.startswith("temperature must be a number from 0 to 1.5"), (args, error)
    added = log.read_text()[len(before):]
    assert "Traceback" not in added and added.count("refused: temperature") == len(out_of_range)
