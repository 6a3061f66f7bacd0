"""GET /status: admin-only HTML with per-channel attempts, success and latency charts as inline SVG.

The page is rendered by headless Chromium (Debian's `chromium`; .ci/run installs it) and the screenshot
is decoded here with zlib and struct, so "it renders" means pixels, not just markup.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import httpx
import pytest
from conftest import FakeUpstream, Reply, simple_config

import uni_api
from scheduler import Channel

ADMIN, USER_KEY = "sk-admin-key", "sk-client"
MESSAGES = [{"role": "user", "content": "hi"}]
GREEN, RED, BLUE = (0x16, 0xA3, 0x4A), (0xDC, 0x26, 0x26), (0x25, 0x63, 0xEB)  # the page's chart colours


def config_with_admin(*upstreams: FakeUpstream) -> dict:
    config = simple_config(*upstreams)
    config["api_keys"].append({"api": ADMIN, "role": "admin"})
    return config


def traffic(gw, failing: FakeUpstream) -> None:
    """up0 fails once (up1 answers instead), then answers: up0 2 attempts 1 answered, up1 1 of 1."""
    failing.enqueue(Reply(status=500, json={"error": {"message": "down"}}))
    with gw.http(USER_KEY) as http:
        for _ in range(2):
            assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES}).status_code == 200


def table_rows(page: str) -> list[list[str]]:
    """The body rows' cell texts, tags stripped (charts become empty strings)."""
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [[re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body)]


# --- Access ---


def test_status_page_answers_only_admin_keys(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(config_with_admin(upstream))
    with httpx.Client(base_url=gw.url) as http:
        missing = http.get("/status")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/status", params={"key": "sk-wrong"}).status_code == 401
        user = http.get("/status", params={"key": USER_KEY})
        assert user.status_code == 403 and user.json()["error"]["code"] == "admin_required"
        assert http.get("/status", headers={"Authorization": f"Bearer {USER_KEY}"}).status_code == 403
        by_query = http.get("/status", params={"key": ADMIN})
        by_header = http.get("/status", headers={"x-api-key": ADMIN})
    for page in (by_query, by_header):
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["referrer-policy"] == "no-referrer"


# --- Content ---


def test_status_page_lists_attempts_success_and_latency_per_channel(make_upstream, make_gateway) -> None:
    failing, healthy = make_upstream(), make_upstream()
    gw = make_gateway(config_with_admin(failing, healthy))
    with gw.http(ADMIN) as http:
        assert table_rows(http.get("/status").text) == [["No attempts yet."]]
        traffic(gw, failing)
        page = http.get("/status").text
    rows = table_rows(page)
    assert [row[:3] for row in rows] == [["up0/gpt-4o", "2", "50.0%"], ["up1/gpt-4o", "1", "100.0%"]]
    assert all(re.fullmatch(r"\d+ ms", row[3]) for row in rows)
    assert page.count("<svg") == 4 and 'fill="#dc2626"' in page and 'fill="#16a34a"' in page


def test_status_page_has_no_script_and_no_outside_assets(make_upstream, make_gateway) -> None:
    failing, healthy = make_upstream(), make_upstream()
    gw = make_gateway(config_with_admin(failing, healthy))
    traffic(gw, failing)
    with gw.http(ADMIN) as http:
        response = http.get("/status")
    page = response.text.lower()
    assert "<script" not in page and "javascript:" not in page
    assert not re.search(r"<[^>]+\son\w+=", page)  # no inline event handlers
    assert not re.search(r"\b(src|href)=", page) and "url(" not in page and "@import" not in page
    assert response.headers["content-security-policy"] == "default-src 'none'; style-src 'unsafe-inline'"


def test_channel_names_are_escaped(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(config_with_admin(upstream))
    gw.state.recent.record(Channel("<b>evil</b>", "m", "m&n"), uni_api.UpstreamError(502, "x"), 0.01)
    with gw.http(ADMIN) as http:
        page = http.get("/status").text
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt;/m&amp;n" in page


def test_attempt_buckets_roll_over_and_old_ones_leave_the_window() -> None:
    now = [1_000_000.0]
    stats = uni_api.AttemptStats(clock=lambda: now[0], bucket_s=60, buckets=3)
    channel = Channel("p", "alias", "up")
    stats.record(channel, uni_api.UpstreamError(500, "x"), 0.5)
    stats.record(channel, ok_response(), 0.1)
    now[0] += 60
    stats.record(channel, ok_response(), 0.3)
    [(provider, model, buckets)] = stats.window()
    assert (provider, model) == ("p", "up")
    assert [(b.attempts, b.answered, round(b.total_ms)) for b in buckets] == [(0, 0, 0), (2, 1, 600), (1, 1, 300)]
    now[0] += 120
    assert [b.attempts for b in stats.window()[0][2]] == [1, 0, 0]
    now[0] += 60
    assert stats.window() == []  # every bucket is older than the window
    for _ in range(10):
        now[0] += 60
        stats.record(channel, ok_response(), 0.1)
    assert len(stats._series[("p", "up")]) == 3  # memory stays bounded by the window


def ok_response() -> uni_api.Response:
    return uni_api.Response(b"{}", status_code=200)


# --- Rendering in a real browser ---


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, bytearray(), None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data[pos + 8:pos + 8 + length])
        elif kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0 and color in (2, 6), header
    channels = 3 if color == 2 else 4
    rows = unfilter(zlib.decompress(bytes(idat)), width * channels, height, channels)
    pixels = [(row[x], row[x + 1], row[x + 2]) for row in rows for x in range(0, width * channels, channels)]
    return width, height, pixels


def unfilter(raw: bytes, stride: int, height: int, bpp: int) -> list[bytearray]:
    """Undo PNG's per-row filters (None, Sub, Up, Average, Paeth)."""
    rows: list[bytearray] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride) if kind else ():
            left = line[i - bpp] if i >= bpp else 0
            up, corner = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            else:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(line)
        previous = line
    return rows


def near(pixel: tuple[int, int, int], colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


def test_status_page_renders_in_headless_chromium_with_visible_charts(make_upstream, make_gateway,
                                                                      tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package with apt-get)")
    failing, healthy = make_upstream(), make_upstream()
    gw = make_gateway(config_with_admin(failing, healthy))
    traffic(gw, failing)
    shot = tmp_path / "status.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1000,700",
                    f"{gw.url}/status?key={ADMIN}"], capture_output=True, timeout=60, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1000, 700)
    ink = sum(1 for p in pixels if p != (255, 255, 255))
    assert ink > 0.01 * width * height, f"the page looks blank: {ink} non-white pixels"
    for colour in (GREEN, RED, BLUE):  # answered bars, the failed bar, latency bars: the SVG charts were drawn
        assert sum(1 for p in pixels if near(p, colour)) > 20, colour
