"""GET/HEAD /rec/<token>.mp3 through the real aiohttp app (in-process test server, a real
file, a fake index lookup): Range edge cases (RFC 9110 §14), If-Range, 404/410, no disk access
on the event loop."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

import softpbx.http.app as http_app
from softpbx.core.switch import Switch
from softpbx.http.app import UNSATISFIABLE, byte_range, make_app

SIZE = 1000
TOKEN = "A" * 32
DELETED = "D" * 32
MISSING = "M" * 32
T = TypeVar("T")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture
def mp3(tmp_path: Path) -> Path:
    path = tmp_path / "call.mp3"
    path.write_bytes(os.urandom(SIZE))
    return path


def serve(mp3: Path, scenario: Callable[[TestClient[Any, Any]], Awaitable[T]]) -> T:
    index = {digest(TOKEN): (str(mp3), "ready", "c1"),
             digest(DELETED): (str(mp3), "deleted", "c2"),
             digest(MISSING): (str(mp3) + ".gone", "ready", "c3")}
    app = make_app(switch=cast(Switch, None), clock=lambda: 0.0, cdr_fetch=lambda n: [],
                   recording_lookup=index.get)

    async def run() -> T:
        async with TestClient(TestServer(app)) as client:
            return await scenario(client)

    return asyncio.run(run())


async def fetch(client: TestClient[Any, Any], token: str = TOKEN, method: str = "GET",
                **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with client.request(method, f"/rec/{token}.mp3",
                              headers={k.replace("_", "-"): v for k, v in headers.items()}) as r:
        return r.status, r.headers.copy(), await r.read()  # case-insensitive


@pytest.mark.parametrize(("value", "expected"), [
    ("bytes=100-199", (100, 200)),
    ("bytes=0-0", (0, 1)),
    ("bytes=-50", (950, 1000)),
    ("bytes=-5000", (0, 1000)),
    ("bytes=990-", (990, 1000)),
    ("bytes=0-99999999999", (0, 1000)),
    ("BYTES = 1-2 ", (1, 3)),
    ("bytes=-0", UNSATISFIABLE),
    ("bytes=1000-", UNSATISFIABLE),
    ("bytes=1000-1001", UNSATISFIABLE),
    ("bytes=0-1,5-6", None),       # several ranges: ignored (RFC 9110 §14.2)
    ("bytes=0-1,", None),
    ("items=0-1", None),           # a unit we do not know: ignored
    ("bytes=5-2", None),           # invalid: ignored
    ("bytes=", None),
    ("bytes=-", None),
    ("bytes=abc", None),
    ("bytes 0-1", None),
    ("bytes=0-1-2", None),
    ("bytes=1e3-", None),
    ("bytes=+1-2", None),
    ("bytes=" + "9" * 40 + "-", None),
])
def test_byte_range(value: str, expected: object) -> None:
    assert byte_range(value, SIZE) == expected


@pytest.mark.parametrize(("range_", "status", "part"), [
    ("bytes=100-199", 206, (100, 200)),
    ("bytes=-50", 206, (950, 1000)),
    ("bytes=0-1,5-6", 200, None),
    ("bytes=-0", 416, None),
    ("bytes=2000-", 416, None),
    ("items=0-1", 200, None),
    ("bytes=oops", 200, None),
    ("bytes=9-3", 200, None),
])
def test_range_requests(mp3: Path, range_: str, status: int, part: tuple[int, int] | None
                        ) -> None:
    body = mp3.read_bytes()
    got_status, headers, got = serve(mp3, lambda c: fetch(c, Range=range_))
    assert got_status == status, (range_, got_status, got[:100])
    assert headers.get("Accept-Ranges") == "bytes"
    if status == 416:
        assert headers["Content-Range"] == f"bytes */{SIZE}"
        return
    assert headers["Content-Type"] == "audio/mpeg"
    start, end = part or (0, SIZE)
    assert got == body[start:end] and int(headers["Content-Length"]) == end - start
    if status == 206:
        assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
    else:
        assert "Content-Range" not in headers


def test_if_range(mp3: Path) -> None:
    async def scenario(c: TestClient[Any, Any]) -> dict[str, int]:
        _, headers, _ = await fetch(c)
        etag, modified = headers["ETag"], headers["Last-Modified"]
        old = email.utils.formatdate(mp3.stat().st_mtime - 3600, usegmt=True)
        out = {}
        for name, validator in {"etag": etag, "date": modified, "other-etag": '"x-1"',
                                "weak": "W/" + etag, "old-date": old, "garbage": "nope"}.items():
            status, _, body = await fetch(c, Range="bytes=0-9", If_Range=validator)
            assert len(body) == (10 if status == 206 else SIZE)
            out[name] = status
        return out

    assert serve(mp3, scenario) == {"etag": 206, "date": 206, "other-etag": 200, "weak": 200,
                                    "old-date": 200, "garbage": 200}


def test_head(mp3: Path) -> None:
    async def scenario(c: TestClient[Any, Any]) -> list[tuple[int, CIMultiDict[str], bytes]]:
        return [await fetch(c, method="HEAD"), await fetch(c, method="HEAD", Range="bytes=0-9")]

    for status, headers, body in serve(mp3, scenario):
        assert (status, body) == (200, b"")
        assert int(headers["Content-Length"]) == SIZE
        assert headers["Content-Type"] == "audio/mpeg"
        assert headers["Accept-Ranges"] == "bytes"


def test_unknown_malformed_and_missing_get_one_404_and_deleted_410(mp3: Path) -> None:
    async def scenario(c: TestClient[Any, Any]) -> dict[str, tuple[int, bytes]]:
        out = {}
        for name, token in {"unknown": "U" * 32, "malformed": "x", "missing": MISSING,
                            "deleted": DELETED}.items():
            status, _, body = await fetch(c, token)
            out[name] = (status, body)
        out["deleted-head"] = (await fetch(c, DELETED, method="HEAD"))[:1] + (b"",)
        return out

    got = serve(mp3, scenario)
    assert got["unknown"] == got["malformed"] == got["missing"]
    assert got["unknown"][0] == 404
    assert got["deleted"][0] == 410 and b"410" in got["deleted"][1]
    assert got["deleted-head"][0] == 410


def test_the_file_is_opened_off_the_event_loop(mp3: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[bool] = []
    loop_thread: list[int] = []
    real_open = open

    def spy_open(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident() == loop_thread[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(http_app, "open", spy_open, raising=False)
    monkeypatch.setattr(http_app.os.path, "isfile", lambda p: pytest.fail("isfile on the loop"))

    async def scenario(c: TestClient[Any, Any]) -> int:
        loop_thread.append(threading.get_ident())
        return (await fetch(c))[0]

    assert serve(mp3, scenario) == 200
    assert threads == [False]
