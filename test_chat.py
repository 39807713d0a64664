"""Tests for chat.py, in the order of the product: fixtures and helpers, the consumer,
HTTP, a real server, Redis, and the browser (the Channels tutorial's own Selenium tests).

    pip install -r requirements.txt pytest pytest-asyncio selenium websockets uvicorn uv pillow zxing-cpp
    python -m pytest

Tests that need redis-server or Chromium skip when those are missing, and fail instead
when CI=true.
"""

import asyncio
import base64
import concurrent.futures
import contextlib
import gzip
import http.client
import importlib.util
import io
import itertools
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_asyncio
import redis
import zxingcpp
from channels.layers import get_channel_layer
from channels.testing import HttpCommunicator, WebsocketCommunicator
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.wait import WebDriverWait
from websockets.asyncio.client import connect as asyncio_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import connect

import chat

APPLICATION = chat.application  # chat configures itself when asked, as under Daphne
HERE = Path(__file__).resolve().parent
TIMEOUT = 10  # seconds any single expected event may take before a test fails

# === Fixtures and helpers ===


def need(program: str) -> str:
    """The path of a program the test needs: skip without it, or fail under CI=true."""
    found = shutil.which(program)
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{program} is required when CI=true, and it is not installed")
    pytest.skip(f"{program} is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Process:
    """A subprocess whose combined output is collected line by line as it arrives."""

    def __init__(
        self,
        args: list[str],
        env: dict | None = None,
        cwd: Path = HERE,
        group: bool = False,
    ):
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.group = group  # (stopped with its children: runserver's reloader)
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=group,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, prefix: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"no line starting {prefix!r}; output:\n{self.text}")

    @property
    def text(self) -> str:
        return "".join(self.output)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        return self.proc.returncode


class ChatServer(Process):
    """`python chat.py --port 0 ...`. `urls` are the addresses its banner printed;
    `url` is the loopback one (tests never talk to other addresses)."""

    def __init__(
        self,
        *args: str,
        port: int = 0,
        env: dict | None = None,
        script: str = "chat.py",
    ):
        super().__init__([sys.executable, script, "--port", str(port), *args], env=env)
        self.urls = [
            self.wait_for_line("chat.py: open ").split()[-1].removesuffix("/chat/")
        ]
        while not (line := self.wait_for_line("chat.py: ")).startswith(
            "chat.py: channel"
        ):
            self.urls.append(line.split()[-1].removesuffix("/chat/"))
        self.banner_layer = line
        self.url = next(url for url in self.urls if "//127." in url or "[::1]" in url)

    def websocket(self, room: str, origin: str | None = "same", **query):
        return open_socket(self.url, room, origin, **query)


def open_socket(base_url: str, room: str, origin: str | None = "same", **query):
    host = base_url.split("://", 1)[1]
    query_string = "&".join(f"{k}={quote(str(v))}" for k, v in query.items())
    uri = f"ws://{host}/ws/chat/{quote(room)}/" + (f"?{query_string}" if query else "")
    return connect(uri, origin=base_url if origin == "same" else origin, open_timeout=5)


def next_frame(ws, frame_type: str = "message") -> dict:
    """The next frame of a type from a real socket, skipping other kinds of frame."""
    deadline = time.monotonic() + TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        frame = json.loads(ws.recv(timeout=left))
        if frame["type"] == frame_type:
            return frame
    raise AssertionError(f"no {frame_type!r} frame within {TIMEOUT} s")


def post(ws, text: str) -> None:
    ws.send(json.dumps({"message": text}))


@pytest.fixture(scope="session")
def live_server():
    """One real chat.py for the real-server and browser tests; `.url` as in
    pytest-django's fixture of the same name, so the tutorial's tests read the same."""
    server = ChatServer("--rate-limit", "0")
    yield server
    server.stop()
    assert "Traceback" not in server.text, server.text


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server on a free port (never 6379); yields its URL."""
    server = RedisServer()
    yield server.url
    server.stop()


class RedisServer(Process):
    """redis-server on loopback; `config` (a file, for a sentinel) and `extra` flags
    are its own."""

    def __init__(self, port: int | None = None, config: str = "", *extra: str):
        self.port = port or free_port()
        program = need("redis-server")
        super().__init__(
            [program, *([config] if config else [])]
            + ["--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", *extra]
            # (a replica writes what it gets to disk: not into the next one's start)
            + ["--dir", tempfile.mkdtemp(prefix="chat-redis-")]
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        wait_until(self.answers, what=f"redis-server on port {self.port}")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="session")
def chrome_driver():
    """Headless Debian Chromium through its own chromedriver: no driver downloads."""
    options = Options()
    options.binary_location = need("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(need("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


# Consumer tests share one event loop, as the consumers of one server do.
asyncio_test = pytest.mark.asyncio(loop_scope="session")
ORIGIN = [(b"origin", b"http://127.0.0.1:8000"), (b"host", b"127.0.0.1:8000")]


def communicator(room: str, headers=ORIGIN, **query) -> WebsocketCommunicator:
    path = f"/ws/chat/{quote(room)}/"
    if query:
        path += "?" + "&".join(f"{k}={quote(str(v))}" for k, v in query.items())
    return WebsocketCommunicator(chat.application, path, headers)


async def joined(room: str, **query) -> WebsocketCommunicator:
    """A member who has connected and been welcomed; `.history` is what came before."""
    member = communicator(room, **query)
    connected, _ = await member.connect()
    assert connected, f"could not join room {room!r}"
    member.history = []
    while (frame := await member.receive_json_from(timeout=TIMEOUT))[
        "type"
    ] != "welcome":
        member.history.append(frame)
    member.welcome = frame
    return member


async def next_json(member: WebsocketCommunicator, frame_type: str = "message"):
    """The next frame of a type, skipping frames of other types."""
    while True:
        frame = await member.receive_json_from(timeout=TIMEOUT)
        if frame["type"] == frame_type:
            return frame


async def frames_within(member: WebsocketCommunicator, seconds: float) -> list[dict]:
    """Every frame that arrives within a short window (to show what did NOT arrive)."""
    frames = []
    while not await member.receive_nothing(timeout=seconds):
        frames.append(await member.receive_json_from())
    return frames


async def no_message_within(member: WebsocketCommunicator, seconds: float = 0.3):
    return not [
        f for f in await frames_within(member, seconds) if f["type"] == "message"
    ]


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_layer(monkeypatch):
    """Each consumer test starts with an empty channel layer, no rooms, and no rate
    limit (the tests of the limit set one)."""
    layer = get_channel_layer()
    await layer.flush()
    for hub in list(chat.hubs.values()):
        await hub.stop()
    chat.hubs.clear()
    chat.rooms.cache_clear()
    chat.address_rates.clear()
    monkeypatch.setattr(chat.settings, "CHAT_RATE_LIMIT", 0, raising=False)
    monkeypatch.setattr(chat.settings, "CHAT_MAX_PER_ADDRESS", 0, raising=False)
    yield layer
    await layer.flush()


# === Consumer tests ===


@asyncio_test
async def test_both_members_receive_a_message_sender_included(fresh_layer):
    alice, bob = await joined("lobby-1"), await joined("lobby-1")
    await alice.send_json_to({"message": "hello"})
    for member in (alice, bob):
        frame = await next_json(member)
        assert frame["message"] == "hello"
        assert frame["ts"].endswith("Z")
    await alice.disconnect()
    await bob.disconnect()


@asyncio_test
async def test_member_of_another_room_does_not_receive(fresh_layer):
    alice, carol = await joined("room_a"), await joined("room_b")
    await alice.send_json_to({"message": "for room a"})
    assert (await next_json(alice))["message"] == "for room a"
    assert await no_message_within(carol), "room_b got room_a's message"
    await alice.disconnect()
    await carol.disconnect()


@asyncio_test
@pytest.mark.parametrize(
    "one, other",
    [
        ("cafe", "сafe"),  # the second starts with a Cyrillic 'с'
        ("café", "cafe"),
        ("кафе-1", "кафе_1"),
        ("東京", "京東"),
    ],
)
async def test_look_alike_unicode_rooms_stay_apart(fresh_layer, one, other):
    assert chat.group_name(one) != chat.group_name(other)
    first, second = await joined(one), await joined(other)
    await first.send_json_to({"message": f"only in {one}"})
    assert (await next_json(first))["message"] == f"only in {one}"
    assert await no_message_within(second), f"{other!r} got {one!r}'s message"
    await first.disconnect()
    await second.disconnect()


def test_group_names_are_short_ascii():
    for room in ("кафе-1", "東京", "café", "x" * 100, "नमस्ते"):
        name = chat.group_name(room)
        assert name.isascii() and len(name) < 100, name


MALFORMED = [
    ("text", "not json"),
    ("text", "[1, 2]"),
    ("text", '"just a string"'),
    ("text", "{}"),
    ("text", '{"message": 42}'),
    ("text", '{"message": null}'),
    ("text", '{"message": ""}'),
    ("text", '{"message": "   \\t "}'),
    ("text", '{"message": "nul \\u0000 inside"}'),
    ("text", '{"message": "lone \\ud800 surrogate"}'),
    ("text", '{"message": "a carriage\\r return"}'),
    ("text", json.dumps({"message": "line\n" * chat.MAX_LINES + "one too many"})),
    ("text", json.dumps({"message": "x" * (chat.MAX_MESSAGE + 1)})),
    ("text", json.dumps({"message": "\U0001f600" * (chat.MAX_MESSAGE_BYTES // 4 + 1)})),
    ("text", "[" * 100_000),
    ("bytes", b"\x00\x01binary"),
]


@asyncio_test
@pytest.mark.parametrize("kind, data", MALFORMED)
async def test_malformed_frame_gets_error_and_socket_still_works(
    fresh_layer, kind, data
):
    sender, other = await joined("strict"), await joined("strict")
    await sender.send_to(**{f"{kind}_data": data})
    error = await next_json(sender, "error")
    assert error["message"], error
    assert await no_message_within(other, 0.1), "a malformed frame was relayed"

    await sender.send_json_to({"message": "still here"})
    assert (await next_json(sender))["message"] == "still here"
    assert (await next_json(other))["message"] == "still here"
    await sender.disconnect()
    await other.disconnect()


@asyncio_test
@pytest.mark.parametrize(
    "room",
    ["a%20b", "x" * 101, "semi;colon", "dot.dot", "\u3164", "a\u0301\u0302\u0303"],
)
async def test_invalid_room_name_refuses_the_handshake(fresh_layer, room):
    connected, _ = await communicator(room).connect()
    assert not connected


@asyncio_test
@pytest.mark.parametrize(
    "headers",
    [
        [(b"origin", b"http://evil.example"), (b"host", b"127.0.0.1:8000")],
        [(b"host", b"127.0.0.1:8000")],
    ],
    ids=["foreign-origin", "no-origin"],
)
async def test_foreign_or_missing_origin_is_refused(fresh_layer, headers):
    connected, _ = await communicator("lobby", headers).connect()
    assert not connected


@asyncio_test
async def test_a_thousand_garbage_frames_in_a_row_leave_the_socket_usable(fresh_layer):
    sender, other = await joined("garbage"), await joined("garbage")
    for n in range(1000):
        await sender.send_to(text_data=f"garbage {n}")
    errors = [await next_json(sender, "error") for _ in range(1000)]
    assert {e["message"] for e in errors} == {"not valid JSON"}
    await sender.send_json_to({"message": "after the garbage"})
    assert (await next_json(other))["message"] == "after the garbage"
    await sender.disconnect()
    await other.disconnect()


@asyncio_test
async def test_a_flood_past_the_rate_limit_gets_error_frames(fresh_layer, monkeypatch):
    monkeypatch.setattr(chat.settings, "CHAT_RATE_LIMIT", 3, raising=False)
    flooder, other = await joined("flood"), await joined("flood")
    for n in range(10):
        await flooder.send_json_to({"message": f"flood {n}"})
    frames = [await flooder.receive_json_from() for _ in range(10)]
    frames += await frames_within(flooder, 0.2)
    relayed = [f["message"] for f in frames if f["type"] == "message"]
    refused = [f for f in frames if f["type"] == "error"]
    assert relayed == ["flood 0", "flood 1", "flood 2"]
    assert len(refused) == 7 and "at most 3 a second" in refused[0]["message"]
    assert [
        f["message"] for f in await frames_within(other, 0.2) if f["type"] == "message"
    ] == relayed
    await asyncio.sleep(1)  # the scenario: the bucket refills after a second
    await flooder.send_json_to({"message": "calm again"})
    assert (await next_json(other))["message"] == "calm again"
    await flooder.disconnect()
    await other.disconnect()


# --- Names, ids, history and resume ---


@asyncio_test
async def test_messages_carry_consecutive_ids_user_and_time(fresh_layer):
    ana = await joined("ids", name="ana")
    for text in ("one", "two", "three"):
        await ana.send_json_to({"message": text})
    frames = [await next_json(ana) for _ in range(3)]
    assert [f["id"] for f in frames] == [1, 2, 3]
    assert {f["user"] for f in frames} == {"ana"}
    assert all(f["ts"].endswith("Z") and "T" in f["ts"] for f in frames)
    assert len({f["epoch"] for f in frames}) == 1
    await ana.disconnect()


@asyncio_test
async def test_a_message_may_hold_line_breaks_up_to_max_lines(fresh_layer):
    ana = await joined("lines", name="ana")
    text = "\n".join(f"line {n}" for n in range(chat.MAX_LINES))
    await ana.send_json_to({"message": text})
    assert (await next_json(ana))["message"] == text
    await ana.disconnect()


@asyncio_test
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  ana  ", "ana"),
        ("a\u0000n\u200ea\tb", "ana b"),
        ("x" * 100, "x" * chat.MAX_NAME),
        ("Зоя 東", "Зоя 東"),
        ("Zalgo" + "\u0336\u0337\u0338" * 9, "Zalgo\u0336\u0337"),  # 2 marks at most
        ("e\u0301", "\u00e9"),  # one way to write é
    ],
)
async def test_nicknames_are_trimmed_cleaned_and_limited(fresh_layer, raw, expected):
    member = await joined("names", name=raw)
    assert member.welcome["user"] == expected
    await member.disconnect()


@asyncio_test
@pytest.mark.parametrize(
    "raw", ["\u3164", "\u200b\u200d", "\u115f \uffa0", "\u0301" * 3]
)
async def test_a_name_that_shows_nothing_becomes_a_guest(fresh_layer, raw):
    member = await joined("names", name=raw)
    assert re.fullmatch(r"guest-\d{4}", member.welcome["user"])
    await member.disconnect()


@asyncio_test
async def test_two_members_never_show_the_same_name(fresh_layer):
    ana = await joined("same-name", name="ana")
    second = await joined("same-name", name="ana")
    third = await joined("same-name", name="ana")
    assert [m.welcome["user"] for m in (ana, second, third)] == [
        "ana",
        "ana (2)",
        "ana (3)",
    ]
    assert sorted(third.welcome["members"]) == ["ana", "ana (2)", "ana (3)"]
    await second.disconnect()
    bob = await joined("same-name", name="bob")
    await bob.send_json_to({"type": "rename", "name": "ana"})
    renamed = await next_json(ana, "rename")
    assert (renamed["old"], renamed["user"]) == ("bob", "ana (2)")
    await ana.disconnect()
    again = await joined("same-name", name="ana")
    assert again.welcome["user"] == "ana"
    for member in (third, bob, again):
        await member.disconnect()


@asyncio_test
async def test_without_a_name_a_guest_name_is_generated(fresh_layer):
    one, two = await joined("guests"), await joined("guests", name="   ")
    assert one.welcome["user"].startswith("guest-")
    assert two.welcome["user"].startswith("guest-")
    await one.disconnect()
    await two.disconnect()


@asyncio_test
async def test_late_joiner_sees_history_then_welcome(fresh_layer):
    ana = await joined("late", name="ana")
    for n in range(chat.HISTORY_SIZE + 5):
        await ana.send_json_to({"message": f"m{n}"})
    for _ in range(chat.HISTORY_SIZE + 5):
        await next_json(ana)
    bob = await joined("late", name="bob")
    ids = [f["id"] for f in bob.history]
    assert ids == list(range(6, chat.HISTORY_SIZE + 6)), "history is bounded, in order"
    assert bob.history[-1]["message"] == f"m{chat.HISTORY_SIZE + 4}"
    assert bob.welcome["count"] == 2 and sorted(bob.welcome["members"]) == [
        "ana",
        "bob",
    ]
    await ana.disconnect()
    await bob.disconnect()


@asyncio_test
async def test_reconnect_with_since_gets_exactly_the_missed_messages(fresh_layer):
    ana = await joined("resume", name="ana")
    for text in ("a", "b", "c", "d", "e"):
        await ana.send_json_to({"message": text})
    frames = [await next_json(ana) for _ in range(5)]
    epoch = frames[0]["epoch"]
    bob = await joined("resume", name="bob", since=2, epoch=epoch)
    assert [f["message"] for f in bob.history] == ["c", "d", "e"]
    assert bob.welcome["epoch"] == epoch and bob.welcome["last_id"] == 5
    cy = await joined("resume", name="cy", since=3)  # the tutorial's client: no epoch
    assert [f["message"] for f in cy.history] == ["d", "e"]
    await ana.send_json_to({"message": "f"})
    assert (await next_json(bob))["id"] == 6
    for member in (ana, bob, cy):
        await member.disconnect()


@asyncio_test
async def test_since_from_another_epoch_replays_everything(fresh_layer):
    ana = await joined("epochs", name="ana")
    await ana.send_json_to({"message": "new numbering"})
    await next_json(ana)
    bob = await joined("epochs", since=40, epoch="gone")
    assert [f["message"] for f in bob.history] == ["new numbering"]
    assert bob.welcome["epoch"] != "gone"
    await ana.disconnect()
    await bob.disconnect()


@asyncio_test
async def test_a_message_that_overtakes_another_brings_it_from_history(fresh_layer):
    """Two processes posting at once: message n+1 may arrive before n."""
    ana = await joined("overtake", name="ana")
    first = await chat.rooms().post("overtake", chat.chat_frame("zed", "first"))
    second = await chat.rooms().post("overtake", chat.chat_frame("zed", "second"))
    event = chat.message_event(second)
    await fresh_layer.group_send(chat.group_name("overtake"), event)
    got = [await next_json(ana), await next_json(ana)]
    assert [f["id"] for f in got] == [first["id"], second["id"]]
    await fresh_layer.group_send(chat.group_name("overtake"), chat.message_event(first))
    assert await no_message_within(ana), "a message was delivered twice"
    await ana.disconnect()


@asyncio_test
async def test_a_reader_far_behind_waits_for_the_overtaken_message(fresh_layer):
    """When the history no longer holds the overtaken message, it is awaited."""
    ana = await joined("far-behind", name="ana")
    first = await chat.rooms().post("far-behind", chat.chat_frame("zed", "first"))
    second = await chat.rooms().post("far-behind", chat.chat_frame("zed", "second"))
    chat.rooms().room("far-behind").history.clear()  # as if trimmed long ago
    group = chat.group_name("far-behind")
    await fresh_layer.group_send(group, chat.message_event(second))
    assert await no_message_within(ana), "sent before the message it overtook"
    await fresh_layer.group_send(group, chat.message_event(first))
    got = [await next_json(ana), await next_json(ana)]
    assert [f["message"] for f in got] == ["first", "second"]
    await ana.disconnect()


@asyncio_test
async def test_rooms_keep_to_their_budget_the_least_recently_used_go_first(
    fresh_layer, monkeypatch
):
    """Past ROOMS_BUDGET (counted in UTF-8 bytes), rooms without members are
    forgotten, least recently used first; a room with members keeps its history."""
    monkeypatch.setattr(chat, "ROOMS_BUDGET", 400_000)
    store = chat.rooms()
    ana = await joined("lived-in", name="ana")
    for n in range(chat.HISTORY_SIZE):
        await ana.send_json_to({"message": f"kept {n}"})
        await next_json(ana)
    emoji = "\U0001f600" * (chat.MAX_MESSAGE_BYTES // 4)  # 4,000 bytes, 1,000 chars
    forgotten = []  # in the order they went
    for room in range(60):
        for _ in range(10):
            await store.post(f"flood-{room}", chat.chat_frame("zed", emoji))
        if room == 5:
            await store.position("flood-0")  # used again: it goes to the back
        kept = {**store.occupied, **store.unoccupied}
        forgotten += [
            f"flood-{r}"
            for r in range(room)
            if f"flood-{r}" not in kept and f"flood-{r}" not in forgotten
        ]
        assert store.size == sum(room.size for room in kept.values())
        assert store.size <= chat.ROOMS_BUDGET
    assert store.size > chat.ROOMS_BUDGET - 50_000
    assert forgotten[:7] == [f"flood-{r}" for r in (1, 2, 3, 4, 5, 0, 6)]
    bob = await joined("lived-in", name="bob")
    assert len(bob.history) == chat.HISTORY_SIZE  # the room with members kept it all
    for member in (ana, bob):
        await member.disconnect()


@asyncio_test
async def test_idle_rooms_are_forgotten_in_memory(fresh_layer, monkeypatch):
    ana = await joined("idle", name="ana")
    await ana.send_json_to({"message": "soon forgotten"})
    old = await next_json(ana)
    await ana.disconnect()
    monkeypatch.setattr(chat, "ROOM_IDLE", 0)
    assert "idle" not in dict(await chat.rooms().active())
    assert "idle" not in {**chat.rooms().occupied, **chat.rooms().unoccupied}
    bob = await joined("idle", name="bob", since=old["id"], epoch=old["epoch"])
    assert bob.history == [] and bob.welcome["epoch"] != old["epoch"]
    await bob.disconnect()


# --- What the speed relies on ---


@asyncio_test
async def test_a_message_is_encoded_once_for_all_members(fresh_layer, monkeypatch):
    members = [await joined("encode-once", name=f"m{n}") for n in range(5)]
    await frames_within(members[0], 2 * chat.PRESENCE_DELAY)  # presence settles
    encodes = []
    real_dumps = json.dumps

    def counting_dumps(*args, **kwargs):
        encodes.append(args[0])
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(chat.json, "dumps", counting_dumps)
    await members[0].send_json_to({"message": "once"})
    for member in members:
        assert (await next_json(member))["message"] == "once"
    monkeypatch.undo()
    messages = [
        e for e in encodes if isinstance(e, dict) and e.get("type") == "message"
    ]
    assert len(messages) == 2, encodes  # to keep in history, and for every member
    for member in members:
        await member.disconnect()


@asyncio_test
async def test_one_receiver_per_room_and_process(fresh_layer):
    members = [await joined("one-receiver") for _ in range(5)]
    assert len(fresh_layer.groups[chat.group_name("one-receiver")]) == 1
    for member in members:
        await member.disconnect()
    assert "one-receiver" not in chat.hubs


@asyncio_test
async def test_group_send_starts_no_task_per_receiver(fresh_layer, monkeypatch):
    """The in-memory layer hands a group's message to each receiver in turn; the
    original's task per receiver was a fifth of a burst's CPU."""
    receivers = [await fresh_layer.new_channel() for _ in range(3)]
    for channel in receivers:
        await fresh_layer.group_add("room.tasks", channel)
    tasks = []
    real_create_task = asyncio.create_task

    def counting_create_task(*args, **kwargs):
        tasks.append(args)
        return real_create_task(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(asyncio, "create_task", counting_create_task)
        await fresh_layer.group_send("room.tasks", {"type": "chat.frame", "text": "hi"})
    assert tasks == []
    for channel in receivers:
        assert (await fresh_layer.receive(channel))["text"] == "hi"


@asyncio_test
async def test_a_member_is_one_task_however_many_frames_it_sends(fresh_layer):
    """Each connection reads its socket in one task, with no task per frame (as
    Channels' own consumer loop would start): a sixth of a connection's memory."""
    members, tasks = [], []
    for _ in range(2):
        members += [await joined("one-task") for _ in range(5)]
        for member in members:
            await member.send_json_to({"type": "typing"})
        await frames_within(members[0], 2 * chat.PRESENCE_DELAY)  # all settled
        tasks.append(len(asyncio.all_tasks()))
    assert tasks[1] - tasks[0] == 5
    for member in members:
        await member.disconnect()


# --- Presence, renames, typing ---


@asyncio_test
async def test_join_and_leave_frames_say_what_changed_and_the_count(fresh_layer):
    ana = await joined("presence", name="ana")
    await next_json(ana, "join")  # her own arrival
    bob = await joined("presence", name="bob")
    assert sorted(bob.welcome["members"]) == ["ana", "bob"]  # the list, once
    join = await next_json(ana, "join")
    assert join["user"] == "bob" and join["users"] == ["bob"]
    assert join["count"] == 2 and "members" not in join
    assert "bob" in join["message"]
    await bob.disconnect()
    leave = await next_json(ana, "leave")
    assert leave["users"] == ["bob"] and leave["count"] == 1 and "members" not in leave
    await ana.disconnect()


@asyncio_test
async def test_presence_is_coalesced_when_many_join_at_once(fresh_layer):
    ana = await joined("crowd", name="ana")
    crowd = [await joined("crowd", name=f"m{n}") for n in range(60)]
    frames = await frames_within(ana, 1.0)
    joins = [f for f in frames if f["type"] == "join"]
    assert 1 <= len(joins) <= 4, f"{len(joins)} join frames for 61 arrivals"
    assert sum(len(f["users"]) for f in joins) == 61
    assert joins[-1]["count"] == 61
    for member in crowd:
        await member.disconnect()
    leaves = [f for f in await frames_within(ana, 1.0) if f["type"] == "leave"]
    assert 1 <= len(leaves) <= 4 and leaves[-1]["count"] == 1
    await ana.disconnect()


@asyncio_test
async def test_a_quick_reconnect_is_not_news(fresh_layer):
    ana = await joined("steady", name="ana")
    await next_json(ana, "join")  # her own arrival
    bob = await joined("steady", name="bob")
    await next_json(ana, "join")
    await bob.disconnect()
    bob = await joined("steady", name="bob")  # back within PRESENCE_DELAY
    frames = await frames_within(ana, 3 * chat.PRESENCE_DELAY)
    assert not [f for f in frames if f["type"] in ("join", "leave")], frames
    await ana.disconnect()
    await bob.disconnect()


@asyncio_test
async def test_a_big_rooms_presence_news_comes_less_often(fresh_layer, monkeypatch):
    """Every presence frame goes to every member: a room of 41 with PRESENCE_RATE 20
    hears of a newcomer after about 2 s, not PRESENCE_DELAY."""
    monkeypatch.setattr(chat, "PRESENCE_RATE", 20)
    ana = await joined("big-room", name="ana")
    crowd = [await joined("big-room", name=f"m{n}") for n in range(40)]
    while (await next_json(ana, "join"))["count"] < 41:
        pass
    zed = await joined("big-room", name="zed")
    early = await frames_within(ana, 1.0)
    assert not [f for f in early if "zed" in f.get("users", [])], early
    while "zed" not in (await next_json(ana, "join"))["users"]:
        pass
    for member in [ana, zed, *crowd]:
        await member.disconnect()


@asyncio_test
async def test_member_list_is_capped_but_count_is_exact(fresh_layer, monkeypatch):
    monkeypatch.setattr(chat, "MAX_LISTED", 3)
    members = [await joined("capped", name=f"m{n}") for n in range(5)]
    assert members[-1].welcome["count"] == 5
    assert len(members[-1].welcome["members"]) == 3
    for member in members:
        await member.disconnect()


@asyncio_test
async def test_rename_without_reconnecting(fresh_layer):
    ana, bob = await joined("rename", name="ana"), await joined("rename", name="bob")
    await ana.send_json_to({"type": "rename", "name": "  Anna  "})
    renamed = await next_json(bob, "rename")
    assert (renamed["old"], renamed["user"], renamed["count"]) == ("ana", "Anna", 2)
    await ana.send_json_to({"message": "it is me"})
    assert (await next_json(bob))["user"] == "Anna"
    await ana.send_json_to({"type": "rename", "name": 7})
    assert (await next_json(ana, "error"))["message"]
    await ana.send_json_to({"type": "rename", "name": "Ann"})  # too soon after
    too_soon = await next_json(ana, "error")
    assert too_soon["message"] == f"one new name every {chat.RENAME_INTERVAL} seconds"
    await ana.disconnect()
    await bob.disconnect()


@asyncio_test
async def test_typing_reaches_others_throttled_and_never_the_transcript(fresh_layer):
    ana, bob = await joined("typing", name="ana"), await joined("typing", name="bob")
    await ana.send_json_to({"type": "typing"})
    typing = await next_json(bob, "typing")
    assert typing["user"] == "ana" and "typing" in typing["message"]
    await ana.send_json_to({"type": "typing"})  # within TYPING_INTERVAL: dropped
    assert not [f for f in await frames_within(bob, 0.3) if f["type"] == "typing"]
    assert not [f for f in await frames_within(ana, 0.1) if f["type"] == "typing"]
    await ana.disconnect()
    await bob.disconnect()


# === HTTP tests ===


async def http_get(path: str, host: bytes = b"127.0.0.1:8000") -> dict:
    response = await HttpCommunicator(
        chat.application, "GET", path, headers=[(b"host", host)]
    ).get_response(timeout=TIMEOUT)
    response["headers"] = {
        k.decode().lower(): v.decode() for k, v in response["headers"]
    }
    response["text"] = response["body"].decode()
    return response


@asyncio_test
async def test_root_redirects_to_lobby():
    response = await http_get("/")
    assert response["status"] == 302
    assert response["headers"]["location"] == "/chat/"


@asyncio_test
async def test_lobby_has_the_tutorials_controls():
    response = await http_get("/chat/")
    assert response["status"] == 200
    for element in ('id="room-name-input"', 'id="room-name-submit"', "focus()"):
        assert element in response["text"]
    # Nothing from elsewhere: no script, style, font or image is fetched from another site.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", response["text"])
    assert "<script src" not in response["text"] and "@import" not in response["text"]


@asyncio_test
@pytest.mark.parametrize("room", ["room_1", "кафе-1", "東京", "café", "a" * 100])
async def test_room_page_for_any_script(room):
    response = await http_get(f"/chat/{quote(room)}/")
    assert response["status"] == 200
    for element in (
        'id="chat-log"',
        'id="chat-message-input"',
        'id="chat-message-submit"',
    ):
        assert element in response["text"]
    room_json = json.dumps(room).replace("<", "\\u003C")
    assert (
        f'<script id="room-name" type="application/json">{room_json}'
        in (response["text"])
    )


@asyncio_test
@pytest.mark.parametrize(
    "path",
    [
        "/chat/a%20b/",
        "/chat/" + "x" * 101 + "/",
        "/chat/a/b/",
        "/chat/%3Cb%3E/",
        "/nope",
        "/chat/%E3%85%A4/",  # U+3164, a letter that draws nothing
        "/chat/Z" + "%CC%B6" * 20 + "/",  # a stack of marks
    ],
)
async def test_bad_room_names_and_unknown_paths_are_plain_404s(path):
    response = await http_get(path)
    assert response["status"] == 404
    assert "Traceback" not in response["text"] and "urlpatterns" not in response["text"]


@asyncio_test
async def test_lobby_lists_active_rooms_with_counts(fresh_layer):
    one, two = await joined("busy"), await joined("busy")
    three = await joined("quiet")
    listed = json.loads((await http_get("/chat/rooms.json"))["body"])["rooms"]
    assert listed[:2] == [{"name": "busy", "count": 2}, {"name": "quiet", "count": 1}]
    for member in (one, two, three):
        await member.disconnect()
    assert json.loads((await http_get("/chat/rooms.json"))["body"])["rooms"] == []


@asyncio_test
@pytest.mark.parametrize("path", ["/chat/", "/chat/labels/"])
async def test_every_control_has_a_label_and_pages_fit_phones(path):
    page = (await http_get(path))["text"]
    assert '<meta name="viewport" content="width=device-width' in page
    assert "prefers-color-scheme: dark" in page
    for tag in re.findall(r"<(?:input|textarea)[^>]*>", page):
        if 'type="button"' in tag:
            assert 'value="' in tag, tag
            continue
        element_id = re.search(r'id="([^"]+)"', tag).group(1)
        assert f'for="{element_id}"' in page or "aria-label=" in tag, tag


@asyncio_test
async def test_healthz_reports_memory_layer_and_pid():
    response = await http_get("/healthz")
    assert response["status"] == 200
    assert json.loads(response["body"]) == {
        "status": "ok",
        "layer": "memory",
        "pid": os.getpid(),
    }


@asyncio_test
async def test_pages_send_security_headers():
    headers = (await http_get("/chat/lobby/"))["headers"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"]


@asyncio_test
@pytest.mark.parametrize("path", ["/chat/", "/chat/csp/", "/chat/no%20room/"])
async def test_pages_carry_a_nonce_policy_an_icon_and_a_description(path):
    response = await http_get(path)
    policy = dict(
        rule.strip().split(" ", 1)
        for rule in response["headers"]["content-security-policy"].split(";")
    )
    nonce = re.search(r"'nonce-([\w-]+)'", policy["script-src"]).group(1)
    assert policy["script-src"] == policy["style-src"] == f"'nonce-{nonce}'"
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert policy["connect-src"] == "'self' ws://127.0.0.1:8000 wss://127.0.0.1:8000"
    page = response["text"]
    tags = re.findall(r"<(?:script|style)\b[^>]*>", page)
    executable = [tag for tag in tags if "application/json" not in tag]
    assert executable and all(f'nonce="{nonce}"' in tag for tag in executable), tags
    assert (await http_get(path))["headers"]["content-security-policy"] != policy
    assert re.search(r'<link rel="icon" href="data:image/svg\+xml,', page)
    assert re.search(r'<meta name="description" content="[^"]{20,}">', page)


@asyncio_test
async def test_pages_are_compressed():
    response = await HttpCommunicator(
        chat.application,
        "GET",
        "/chat/gzip/",
        headers=[(b"host", b"127.0.0.1:8000"), (b"accept-encoding", b"gzip")],
    ).get_response(timeout=TIMEOUT)
    headers = {k.decode().lower(): v.decode() for k, v in response["headers"]}
    assert headers["content-encoding"] == "gzip"
    assert b'id="chat-log"' in gzip.decompress(response["body"])
    assert len(response["body"]) < len(gzip.decompress(response["body"])) / 2


@asyncio_test
async def test_unknown_host_is_refused():
    assert (await http_get("/chat/", host=b"evil.example"))["status"] == 400


def test_debug_off_and_no_database():
    assert chat.settings.DEBUG is False
    assert chat.settings.DATABASES["default"]["ENGINE"] == "django.db.backends.dummy"


def run_python(*args: str, check: bool = False, env: dict | None = None):
    """Python in chat.py's folder, run to the end, its output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        check=check,
        cwd=HERE,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def secret_key(env: dict) -> str:
    code = "import chat; chat.application; print(chat.settings.SECRET_KEY)"
    return run_python("-c", code, check=True, env=env).stdout.strip()


def test_secret_key_is_random_per_start_unless_given():
    first, second = secret_key({}), secret_key({})
    assert first != second and len(first) >= 50
    assert secret_key({"CHAT_SECRET_KEY": "given-key"}) == "given-key"


# === Real-server tests ===


def test_message_round_trip_through_a_real_server(live_server):
    with (
        live_server.websocket("round-trip") as alice,
        live_server.websocket("round-trip") as bob,
    ):
        post(alice, "hi from alice")
        assert next_frame(alice)["message"] == "hi from alice"
        assert next_frame(bob)["message"] == "hi from alice"


@pytest.mark.parametrize("origin", ["http://evil.example", None])
def test_real_server_refuses_foreign_and_missing_origin(live_server, origin):
    with pytest.raises(InvalidStatus) as refused:
        live_server.websocket("round-trip", origin=origin)
    assert refused.value.response.status_code == 403


def test_real_server_serves_pages_and_healthz(live_server):
    with urllib.request.urlopen(live_server.url + "/healthz", timeout=TIMEOUT) as r:
        health = json.load(r)
    assert health["status"] == "ok" and health["layer"] == "memory"
    assert health["pid"] == live_server.proc.pid
    with urllib.request.urlopen(live_server.url + "/", timeout=TIMEOUT) as r:
        assert r.url == live_server.url + "/chat/"


def test_banner_names_url_and_layer():
    server = ChatServer()
    assert server.url.startswith("http://127.0.0.1:")
    assert "in memory" in server.banner_layer
    server.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_stopping_closes_every_socket_with_1001_and_exits_0(sig):
    server = ChatServer()
    with (
        server.websocket("bye", name="a") as a,
        server.websocket("bye2", name="b") as b,
    ):
        next_frame(a, "welcome")
        next_frame(b, "welcome")
        started = time.monotonic()
        server.proc.send_signal(sig)
        for ws in (a, b):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=TIMEOUT)
            assert closed.value.rcvd.code == 1001
        assert server.proc.wait(5) == 0
        assert time.monotonic() - started < 5
    assert "Traceback" not in server.text, server.text


def test_one_process_listens_without_loading_twisted_plugins():
    """Daphne's fd: endpoint loads every Twisted plugin (0.9 MB and 21 ms at startup):
    one process lets Twisted's built-in tcp: endpoint bind the port it checked."""
    script = (
        "import sys, chat\n"
        "from daphne.server import Server\n"
        "from twisted.internet import reactor\n"
        "from twisted.internet.endpoints import serverFromString\n"
        "endpoint = chat.daphne_endpoint(chat.listen('127.0.0.1', 0), shared=False)\n"
        "serverFromString(reactor, endpoint)\n"
        "print(endpoint, 'twisted.plugins' in sys.modules)\n"
    )
    done = run_python("-c", script, check=True)
    endpoint, plugins_loaded = done.stdout.split()
    assert endpoint.startswith("tcp:port=") and plugins_loaded == "False"


def test_a_server_leaves_pyopenssl_out_of_its_memory():
    """Twisted and autobahn import pyOpenSSL (5 MiB) whenever it is installed, for TLS
    that chat.py never speaks. Imported (as by `daphne chat:application`), it keeps it."""
    server = ChatServer(env={"PYTHONPROFILEIMPORTTIME": "1"})  # each import, on stderr
    with server.websocket("tls", name="a") as ws:
        next_frame(ws, "welcome")
    assert server.stop() == 0
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in server.output
        if line.startswith("import time:")
    }
    assert {"daphne.server", "autobahn.exception", "twisted.internet.ssl"} <= imported
    assert "OpenSSL.crypto" not in imported  # asked for OpenSSL (above), refused
    done = run_python("-c", "import chat, sys; print(sys.modules['OpenSSL'].SSL)")
    assert "OpenSSL.SSL" in done.stdout  # imported, chat.py changes nothing


def test_taken_port_is_one_clear_line_and_exit_1(live_server):
    port = live_server.url.rsplit(":", 1)[1]
    done = run_python("chat.py", "--port", port)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Address already in use" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["--port", "eighty"],
        ["--redis", "redis://127.0.0.1:1/0"],
        ["--redis", "redis+sentinel://127.0.0.1:1/chat/0"],  # no sentinel there
        ["--workers", "2"],  # without Redis, workers could not share rooms
    ],
)
def test_bad_flag_or_unreachable_redis_is_one_clear_line(args):
    done = run_python("chat.py", "--port", "0", *args)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("chat.py: "), (
        done.stderr
    )
    assert done.stdout == ""


def test_help_documents_the_flags():
    done = run_python("chat.py", "--help")
    assert done.returncode == 0
    for flag in ("--host", "--port", "--redis", "--reload", "--workers", "--quiet"):
        assert flag in done.stdout


@pytest.mark.parametrize(
    "path",
    ["/ws/nope/", "/ws/chat/a/b/", "/ws/chat/a%2Fb/", "/ws/chat//", "/ws/chat/%ZZ/"],
)
def test_real_server_refuses_bad_websocket_paths_without_a_traceback(live_server, path):
    host = live_server.url.split("://", 1)[1]
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://{host}{path}", origin=live_server.url, open_timeout=5)
    assert refused.value.response.status_code == 403  # its log is checked at the end


@pytest.mark.parametrize("with_epoch", [True, False], ids=["epoch", "no-epoch"])
def test_resume_after_a_drop_gets_exactly_the_missed_messages(live_server, with_epoch):
    room = f"resume-real-{with_epoch}"
    with live_server.websocket(room, name="ana") as ana:
        with live_server.websocket(room, name="bob") as bob:
            post(ana, "before the drop")
            seen = next_frame(bob)
        for text in ("m1", "m2", "m3"):
            post(ana, text)
        frames_until(ana, lambda f: f.get("message") == "m3")
        query = {"name": "bob", "since": seen["id"]}
        if with_epoch:  # (the tutorial's client knows no epoch)
            query["epoch"] = seen["epoch"]
        with live_server.websocket(room, **query) as bob:
            replay = frames_until(bob, lambda f: f["type"] == "welcome")
            missed = [f for f in replay if f["type"] == "message"]
            assert [f["message"] for f in missed] == ["m1", "m2", "m3"]
            assert [f["id"] for f in missed] == [seen["id"] + n for n in (1, 2, 3)]
            post(ana, "live again")
            live = next_frame(bob)
            assert (live["message"], live["id"]) == ("live again", seen["id"] + 4)


def test_a_restarted_server_numbers_again_under_a_new_epoch():
    port = free_port()
    server = ChatServer(port=port)
    try:
        with server.websocket("restart", name="ana") as ana:
            for text in ("old 1", "old 2"):
                post(ana, text)
            seen = [next_frame(ana), next_frame(ana)][-1]
    finally:
        server.stop()
    server = ChatServer(port=port)
    try:
        query = {"since": seen["id"], "epoch": seen["epoch"]}
        with server.websocket("restart", name="ana", **query) as ana:
            welcome = next_frame(ana, "welcome")
            assert welcome["epoch"] != seen["epoch"]
            post(ana, "after the restart")
            fresh = next_frame(ana)
            assert fresh["id"] == 1 and fresh["epoch"] == welcome["epoch"]
    finally:
        server.stop()


def test_workshop_mode_lists_urls_and_serves_any_own_address():
    server = ChatServer("--host", "0.0.0.0")
    try:
        assert "http://127.0.0.1:" in " ".join(server.urls)
        assert len(server.urls) >= 1 and all(
            u.startswith("http://") for u in server.urls
        )
        second = server.url.replace("127.0.0.1", "127.0.0.2")
        with open_socket(second, "workshop", name="guest") as ws:
            assert next_frame(ws, "welcome")["user"] == "guest"
        with urllib.request.urlopen(second + "/chat/", timeout=TIMEOUT) as page:
            assert page.status == 200
        with pytest.raises(InvalidStatus):  # a page of the first address, on the second
            open_socket(second, "workshop", origin=server.url)
        with pytest.raises(InvalidStatus):  # a page of another site
            open_socket(second, "workshop", origin="http://evil.example")
        rebinding = urllib.request.Request(
            second + "/chat/", headers={"Host": "evil.example"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebinding, timeout=TIMEOUT)
        assert refused.value.code == 400
    finally:
        server.stop()


def test_allowed_host_flag_adds_a_name():
    server = ChatServer("--allowed-host", "chat.example")
    try:
        request = urllib.request.Request(
            server.url + "/chat/", headers={"Host": "chat.example"}
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT) as page:
            assert page.status == 200
    finally:
        server.stop()


def test_a_frame_far_over_the_limit_is_refused_with_1009(live_server):
    with live_server.websocket("huge") as ws:
        ws.send("x" * 1024 * 1024)
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(10):
                ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd.code == 1009
    with live_server.websocket("huge") as ws:  # and the server carries on
        post(ws, "still serving")
        assert next_frame(ws)["message"] == "still serving"


def test_debug_pages_only_with_the_debug_flag():
    for args, technical in (([], False), (["--debug"], True)):
        server = ChatServer(*args)
        try:
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(server.url + "/no/such/page", timeout=TIMEOUT)
            assert missing.value.code == 404
            assert ("URLconf" in missing.value.read().decode()) is technical
        finally:
            server.stop()


def test_daphne_serves_chat_application():
    port = free_port()
    daphne = Process(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
        + ["chat:application"]
    )
    try:
        wait_until(lambda: port_answers(port), what="daphne chat:application")
        with open_socket(f"http://127.0.0.1:{port}", "via-daphne") as ws:
            post(ws, "served by daphne")
            assert next_frame(ws)["message"] == "served by daphne"
    finally:
        daphne.stop()


def port_answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_script_header_lists_the_same_dependencies_as_requirements():
    import tomllib

    header = re.search(
        r"^# /// script\n(.*?)^# ///$", CHAT_SOURCE, re.DOTALL | re.MULTILINE
    ).group(1)
    metadata = tomllib.loads("".join(line[2:] + "\n" for line in header.splitlines()))
    requirements = (HERE / "requirements.txt").read_text().split()
    assert metadata["dependencies"] == requirements
    assert metadata["requires-python"] == ">=3.10"


CHAT_SOURCE = (HERE / "chat.py").read_text()
README = (HERE / "README.md").read_text()


def test_a_program_can_start_the_server_with_main():
    code = "import chat; chat.main(['--port', '0'])"
    server = Process([sys.executable, "-c", code])
    try:
        url = server.wait_for_line("chat.py: open ").split()[-1]
        with urllib.request.urlopen(url, timeout=TIMEOUT) as page:
            assert page.status == 200
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.text, server.text


def test_importing_chat_starts_nothing():
    code = "import sys, chat; print('twisted.internet.reactor' in sys.modules)"
    done = run_python("-c", code)
    assert done.stdout.strip() == "False", done.stderr


def test_uvicorn_serves_chat_application_too():
    pytest.importorskip("uvicorn")
    port = free_port()
    uvicorn = Process(
        [sys.executable, "-m", "uvicorn", "--port", str(port), "chat:application"]
    )
    try:
        wait_until(lambda: port_answers(port), what="uvicorn chat:application")
        assert http_status(f"http://127.0.0.1:{port}/chat/") == 200
        with open_socket(f"http://127.0.0.1:{port}", "via-uvicorn") as ws:
            post(ws, "served by uvicorn")
            assert next_frame(ws)["message"] == "served by uvicorn"
    finally:
        uvicorn.stop()
    assert "Traceback" not in uvicorn.text, uvicorn.text


def test_uv_runs_the_script_from_its_header(tmp_path):
    """The gist path: `uv run chat.py` installs what the header lists, by itself."""
    uv = need("uv")
    shutil.copy(HERE / "chat.py", tmp_path / "chat.py")
    server = Process(
        [uv, "run", "chat.py", "--port", "0"],
        cwd=tmp_path,
        env={"UV_CACHE_DIR": str(tmp_path / "cache"), "VIRTUAL_ENV": ""},
    )
    try:
        url = server.wait_for_line("chat.py: open ", timeout=300).split()[-1]
        assert http_status(url) == 200
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.text, server.text


def test_log_says_who_came_and_went_and_what_was_refused():
    server = ChatServer()
    try:
        with server.websocket("logged", name="ana") as ana:
            next_frame(ana, "welcome")
            server.wait_for_line("chat.py: room for about")  # the banner's last
            joined = server.wait_for_line("chat.py: ")
            assert re.fullmatch(
                r"chat\.py: \d\d:\d\d:\d\d ana joined 'logged' from 127\.0\.0\.1:\d+"
                r" \(1 here\)",
                joined,
            ), joined
        assert server.wait_for_line("chat.py: ").endswith("ana left 'logged': closed")
        with pytest.raises(InvalidStatus):
            server.websocket("logged", origin="http://evil.example")
        assert "refused 127.0.0.1:" in server.wait_for_line("chat.py: ")
        with pytest.raises(InvalidStatus):
            server.websocket("bad.room")
        assert "no room at '/ws/chat/bad.room/'" in server.wait_for_line("chat.py: ")
    finally:
        server.stop()

    quiet = ChatServer("--quiet")
    try:
        with quiet.websocket("logged", name="bob") as bob:
            next_frame(bob, "welcome")
    finally:
        quiet.stop()
    assert "bob" not in quiet.text and "limits:" in quiet.text, quiet.text


def test_reload_restarts_on_save_and_clients_chat_again(tmp_path):
    """Live coding: save chat.py, and the server comes back by itself."""
    script = tmp_path / "chat.py"
    script.write_text(CHAT_SOURCE)
    port = free_port()
    server = Process(
        [sys.executable, str(script), "--reload", "--port", str(port)], cwd=tmp_path
    )
    base = f"http://127.0.0.1:{port}"
    try:
        server.wait_for_line("chat.py: open ")
        with open_socket(base, "live") as ws:
            post(ws, "before the edit")
            assert next_frame(ws)["message"] == "before the edit"
            edited = CHAT_SOURCE.replace("MAX_NAME = 32", "MAX_NAME = 20")
            deadline = time.monotonic() + TIMEOUT
            with pytest.raises(ConnectionClosed):  # the old server goes away
                while time.monotonic() < deadline:
                    # Saved again each second: the reloader may not have taken
                    # its first look at the file yet when the test edits it.
                    script.write_text(edited)
                    with contextlib.suppress(TimeoutError):
                        ws.recv(timeout=1)
        server.wait_for_line("chat.py: open ")
        wait_until(lambda: port_answers(port), what="the server to come back")
        with open_socket(base, "live", name="x" * 30) as ws:
            assert next_frame(ws, "welcome")["user"] == "x" * 20  # the edited code
            post(ws, "after the edit")
            assert next_frame(ws)["message"] == "after the edit"
    finally:
        assert server.stop(signal.SIGINT) == 0  # Ctrl-C stops reloader and server
    assert "Traceback" not in server.text, server.text


@pytest.mark.parametrize(
    "recipe, sent, expected",
    [
        ("`/me waves`", "/me waves", [r"\* ana waves"]),
        ("a bot that answers", "!time", [r"!time", r"It is \d\d:\d\d here\."]),
    ],
)
def test_workshop_recipe_works_as_written(tmp_path, recipe, sent, expected):
    """The README's recipe, pasted over `post` as it says, in a copy of chat.py."""
    heading = re.escape(f"### Recipe: {recipe}")
    code = re.search(heading + r".*?```python\n(.*?)```", README, re.DOTALL).group(1)
    method = re.compile(
        r"    async def post\(self, content: dict\).*?(?=    async def )", re.DOTALL
    )
    assert len(method.findall(CHAT_SOURCE)) == 1
    script = tmp_path / "chat.py"
    script.write_text(method.sub(lambda _: code + "\n", CHAT_SOURCE))
    server = ChatServer("--rate-limit", "0", script=str(script))
    try:
        with server.websocket("recipes", name="ana") as ana:
            next_frame(ana, "welcome")
            post(ana, sent)
            for pattern in expected:
                assert re.fullmatch(pattern, next_frame(ana)["message"])
    finally:
        server.stop()
    assert "Traceback" not in server.text, server.text


# === Redis tests ===

IDLE = 10  # seconds: longer than redis-py's 5 s socket timeout


def test_two_processes_share_a_room_through_redis_even_after_idling(redis_server):
    one, two = ChatServer("--redis", redis_server), ChatServer("--redis", redis_server)
    try:
        assert "Redis" in one.banner_layer
        with one.websocket("shared") as alice, two.websocket("shared") as bob:
            post(alice, "across processes")
            assert next_frame(bob)["message"] == "across processes"
            assert next_frame(alice)["message"] == "across processes"

            time.sleep(IDLE)  # the scenario itself: both members sit idle

            post(bob, "still there after idling")
            assert next_frame(alice)["message"] == "still there after idling"
            assert next_frame(bob)["message"] == "still there after idling"
    finally:
        one.stop()
        two.stop()
    assert "Traceback" not in one.text + two.text, one.text + two.text


def test_redis_url_from_environment_and_healthz(redis_server):
    server = ChatServer(env={"REDIS_URL": redis_server})
    try:
        with urllib.request.urlopen(server.url + "/healthz", timeout=TIMEOUT) as r:
            assert json.load(r)["layer"] == "redis"
    finally:
        server.stop()


def test_healthz_is_503_when_redis_is_gone():
    import urllib.error

    redis = RedisServer()
    server = ChatServer("--redis", redis.url)
    try:
        redis.stop()
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(server.url + "/healthz", timeout=TIMEOUT)
        assert answer.value.code == 503
        assert json.load(answer.value)["status"] != "ok"
    finally:
        server.stop()
        redis.stop()


@pytest.fixture
def two_servers(redis_server):
    """Two chat.py processes sharing one Redis."""
    servers = [
        ChatServer("--redis", redis_server, "--rate-limit", "0") for _ in range(2)
    ]
    yield servers
    for server in servers:
        server.stop()
    for server in servers:
        assert "Traceback" not in server.text, server.text


def frames_until(ws, done, timeout: float = TIMEOUT) -> list[dict]:
    """Frames from a real socket until `done(frame)` is true for one of them."""
    frames, deadline = [], time.monotonic() + timeout
    while not frames or not done(frames[-1]):
        left = deadline - time.monotonic()
        assert left > 0, f"gave up after {timeout} s; got {frames[-5:]}"
        frames.append(json.loads(ws.recv(timeout=left)))
    return frames


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return json.load(response)


def test_presence_history_ids_and_lobby_are_shared_across_processes(two_servers):
    one, two = two_servers
    with (
        one.websocket("shared-2", name="ana") as ana,
        two.websocket("shared-2", name="bob") as bob,
    ):
        welcome = next_frame(bob, "welcome")
        assert welcome["count"] == 2 and sorted(welcome["members"]) == ["ana", "bob"]
        join = frames_until(ana, lambda f: f["type"] == "join" and "bob" in f["users"])
        assert join[-1]["count"] == 2

        post(ana, "from one")
        post(bob, "from two")
        for ws in (ana, bob):
            got = [next_frame(ws), next_frame(ws)]
            assert [f["id"] for f in got] == [1, 2]
            assert {f["message"] for f in got} == {"from one", "from two"}
        for server in two_servers:
            rooms = get_json(server.url + "/chat/rooms.json")["rooms"]
            assert {"name": "shared-2", "count": 2} in rooms

        with one.websocket("shared-2", name="cy") as cy:
            history = frames_until(cy, lambda f: f["type"] == "welcome")[:-1]
            assert [f["id"] for f in history] == [1, 2]


@asyncio_test
async def test_rooms_in_redis_keep_to_the_same_budget(redis_server, monkeypatch):
    import redis

    monkeypatch.setattr(chat, "ROOMS_BUDGET", 400_000)
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    client.flushdb()
    store = chat.RedisRooms(redis_server)
    sizes_key, bytes_key = store.SIZES, store.BYTES
    nickname, _ = await store.join("lived-in", "m1", "ana")
    for n in range(chat.HISTORY_SIZE):
        await store.post("lived-in", chat.chat_frame("ana", f"kept {n}"))
    emoji = "\U0001f600" * (chat.MAX_MESSAGE_BYTES // 4)
    for room in range(60):
        for _ in range(10):
            await store.post(f"flood-{room}", chat.chat_frame("zed", emoji))
        sizes = client.hgetall(sizes_key)
        assert int(client.get(bytes_key)) == sum(map(int, sizes.values()))
        assert int(client.get(bytes_key)) <= chat.ROOMS_BUDGET
    assert int(client.get(bytes_key)) > chat.ROOMS_BUDGET - 50_000
    history = store.keys("flood-0")[1]
    assert not client.exists(history) and client.exists(store.keys("flood-59")[1])
    assert len(await store.between("lived-in", 1, 1000)) == chat.HISTORY_SIZE
    await store.leave("lived-in", "m1", nickname)
    if store.keeper:
        store.keeper.cancel()
    await store.redis.aclose()


def test_two_processes_never_show_the_same_name(two_servers):
    one, two = two_servers
    with (
        one.websocket("same-name", name="ana") as ana,
        two.websocket("same-name", name="ana") as other,
    ):
        assert next_frame(ana, "welcome")["user"] == "ana"
        assert next_frame(other, "welcome")["user"] == "ana (2)"


def test_redis_keys_of_a_room_expire(two_servers, redis_server):
    import redis

    one, _ = two_servers
    with one.websocket("expiring", name="ana") as ana:
        post(ana, "kept for a while")
        next_frame(ana)
        client = redis.Redis.from_url(redis_server)
        keys = client.keys("chat:*")
        assert keys
        for key in keys:
            assert 0 < client.ttl(key) <= chat.ROOM_IDLE, key


def test_order_holds_when_two_processes_post_at_once(two_servers):
    one, two = two_servers
    count = 300
    with (
        one.websocket("race", name="s1") as s1,
        two.websocket("race", name="s2") as s2,
        one.websocket("race", name="r1") as r1,
        two.websocket("race", name="r2") as r2,
    ):
        for ws in (s1, s2, r1, r2):
            next_frame(ws, "welcome")

        def send_all(ws, who):
            for n in range(count):
                post(ws, f"{who}-{n}")

        senders = [
            threading.Thread(target=send_all, args=(s1, "s1")),
            threading.Thread(target=send_all, args=(s2, "s2")),
        ]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(TIMEOUT)
        for ws in (r1, r2, s1, s2):
            got = [next_frame(ws) for _ in range(2 * count)]
            ids = [f["id"] for f in got]
            assert ids == list(range(1, 2 * count + 1)), "out of order or missing"
            for who in ("s1", "s2"):
                mine = [
                    int(f["message"].split("-")[1]) for f in got if f["user"] == who
                ]
                assert mine == list(range(count)), f"{who}'s messages out of order"


def test_members_of_a_killed_process_vanish(two_servers):
    one, two = two_servers
    with (
        one.websocket("crash", name="ana") as ana,
        two.websocket("crash", name="bob"),
    ):
        frames_until(ana, lambda f: f["type"] == "join" and "bob" in f["users"])
        two.proc.kill()  # no goodbye: bob's process is simply gone
        leave = frames_until(
            ana, lambda f: f["type"] == "leave" and "bob" in f["users"], timeout=60
        )[-1]
        assert leave["users"] == ["bob"] and leave["count"] == 1
        rooms = get_json(one.url + "/chat/rooms.json")["rooms"]
        assert {"name": "crash", "count": 1} in rooms


def test_a_message_pub_sub_dropped_still_reaches_members(redis_server):
    """Pub/sub forgets what is published while a subscriber reconnects. Here the
    message goes only into the room's history, as if its PUBLISH had been lost:
    the hub's periodic check finds it there."""
    server = ChatServer("--redis", redis_server)

    async def post_without_publishing():
        await chat.RedisRooms(redis_server).post("lossy", chat.chat_frame("x", "lost"))

    try:
        with server.websocket("lossy", name="ana") as ana:
            next_frame(ana, "welcome")
            post(ana, "first")
            assert next_frame(ana)["id"] == 1
            asyncio.run(post_without_publishing())
            late = next_frame(ana)
            assert (late["id"], late["message"]) == (2, "lost")
            post(ana, "after")
            assert next_frame(ana)["id"] == 3
    finally:
        server.stop()
    assert "Traceback" not in server.text, server.text


def test_redis_outage_closes_sockets_then_the_chat_recovers():
    redis_server = RedisServer()
    server = ChatServer("--redis", redis_server.url, "--rate-limit", "0")
    try:
        with server.websocket("outage", name="ana") as ana:
            next_frame(ana, "welcome")
            redis_server.stop()
            gone = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ana.recv(timeout=TIMEOUT)
            assert closed.value.rcvd.code == chat.CLOSE_UNAVAILABLE
            # A member that does not post learns it at once (pub/sub noticed), not
            # at the keep-alive's next round.
            assert time.monotonic() - gone < 2
        wait_until(
            lambda: "ana left 'outage': Redis unavailable" in server.text,
            what="the departure and its reason in the log",
        )
        assert http_status(server.url + "/healthz") == 503
        assert http_status(server.url + "/chat/") == 200  # pages still load
        assert http_status(server.url + "/chat/outage/") == 200
        assert http_status(server.url + "/chat/rooms.json") == 503

        redis_server = RedisServer(port=redis_server.port)
        wait_until(lambda: chats_again(server), timeout=10, what="the chat to recover")
        assert http_status(server.url + "/healthz") == 200
    finally:
        server.stop()
        redis_server.stop()
    assert server.proc.returncode == 0
    assert "Traceback" not in server.text, server.text


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def chats_again(server) -> bool:
    try:
        with server.websocket("outage", name="bob") as bob:
            next_frame(bob, "welcome")
            post(bob, "back again")
            return next_frame(bob)["message"] == "back again"
    except (OSError, WebSocketException):
        return False


# --- A hostile client: what it can make the server read or hold is bounded ---


def raw_http(port: int, request: bytes, then: bytes = b"") -> bytes:
    """The server's answer to a request sent byte for byte (then more, if it still
    reads), up to the end of its head."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(request)
        answer = s.recv(4096)
        with contextlib.suppress(OSError):  # a refused body: the server hung up
            for start in range(0, len(then), 1 << 20):
                s.sendall(then[start : start + (1 << 20)])
        return answer


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


@pytest.mark.parametrize(
    "head, status",
    [
        (b"POST /chat/ HTTP/1.1\r\nContent-Length: 67108864\r\n", b"405"),
        (b"GET /chat/ HTTP/1.1\r\nContent-Length: 67108864\r\n", b"413"),
        (b"GET /chat/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", b"413"),
        (b"PUT /healthz HTTP/1.1\r\nContent-Length: 67108864\r\n", b"405"),
    ],
    ids=["POST", "GET-with-body", "chunked", "PUT"],
)
def test_a_64_mib_request_body_is_refused_before_it_is_read(live_server, head, status):
    pid = get_json(live_server.url + "/healthz")["pid"]
    before, started = rss_kib(pid), time.monotonic()
    request = head + b"Host: 127.0.0.1\r\n\r\n"
    answer = raw_http(port_of(live_server), request, then=b"x" * (64 << 20))
    assert answer.startswith(b"HTTP/1.1 " + status), answer
    assert time.monotonic() - started < 5
    assert rss_kib(pid) - before < 16 * 1024
    assert http_status(live_server.url + "/healthz") == 200


def test_only_the_methods_the_views_answer(live_server):
    port = port_of(live_server)
    for path in ("/", "/chat/", "/chat/lobby/", "/chat/rooms.json", "/healthz"):
        head = f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        assert raw_http(port, head).split()[1] in (b"200", b"302"), path
        small = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\nhi"
        )
        assert raw_http(port, small.encode()).split()[1] == b"405", path


@asyncio_test
@pytest.mark.parametrize("path", ["/chat/", "/chat/rooms.json", "/healthz"])
async def test_views_answer_405_to_other_methods_under_any_asgi_server(path):
    """(Without chat.py's own door, as under uvicorn: Django says 405 itself.)"""
    response = await HttpCommunicator(
        chat.application, "POST", path, body=b"x", headers=[(b"host", b"localhost")]
    ).get_response()
    assert response["status"] == 405


@pytest.mark.parametrize("host", [b"[::1", b"[::1]:x", b"\xff\xfe", b"a" * 5000])
def test_a_malformed_host_is_a_400_not_a_500(live_server, host):
    request = b"GET /chat/ HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    assert raw_http(port_of(live_server), request).split()[1] == b"400"


@pytest.mark.parametrize(
    "query",
    [
        {"since": "9" * 5000},
        {"since": "-1"},
        {"since": "１２"},
        {"name": "x" * 5000, "epoch": "\x00" * 100},
        {"since": "1e9", "epoch": "[::1"},
    ],
    ids=["5000-digits", "negative", "fullwidth", "long-name", "float"],
)
def test_odd_query_values_get_a_welcome_not_a_traceback(live_server, query):
    with live_server.websocket("odd-queries", **query) as ws:
        welcome = next_frame(ws, "welcome")
    assert len(welcome["user"]) <= chat.MAX_NAME
    # (live_server asserts at the end of the session that its log has no traceback)


def test_renamers_and_reconnects_on_redis_close_no_room(redis_server):
    """Members leave and rename while the keeper renews their rooms (every
    MEMBER_TTL / 3): that is no outage, and no room is closed."""
    server = ChatServer("--redis", redis_server, "--rate-limit", "0")
    host = server.url.split("://", 1)[1]

    async def churn(room: str, until: float) -> int:
        cycles = 0
        while time.monotonic() < until:
            uri = f"ws://{host}/ws/chat/{room}/?name=churner"
            async with asyncio_connect(uri, origin=server.url) as ws:
                while json.loads(await ws.recv())["type"] != "welcome":
                    pass
                for n in range(3):
                    await ws.send(json.dumps({"type": "rename", "name": f"c{n}"}))
                await ws.send(json.dumps({"message": "still here"}))
                while json.loads(await ws.recv())["type"] != "message":
                    pass
            cycles += 1
        return cycles

    async def scenario():
        honest = await asyncio_connect(
            f"ws://{host}/ws/chat/steady/?name=honest", origin=server.url
        )
        until = time.monotonic() + 2.5 * chat.MEMBER_TTL / 3 + 5
        cycles = await asyncio.gather(*(churn(f"churn-{i}", until) for i in range(20)))
        await honest.send(json.dumps({"message": "after the churn"}))
        while (frame := json.loads(await honest.recv()))["type"] != "message":
            pass
        assert frame["message"] == "after the churn"
        await honest.close()
        return sum(cycles)

    try:
        assert asyncio.run(scenario()) > 100
        rooms = get_json(server.url + "/chat/rooms.json")["rooms"]
        assert all(room["name"] != "steady" for room in rooms)
    finally:
        server.stop()
    assert "Redis failed" not in server.text and "Redis said" not in server.text
    assert "Traceback" not in server.text, server.text


def test_a_redis_error_that_is_no_outage_stays_with_its_member(redis_server):
    """Redis refusing one call (here a key of the wrong type) is no outage: one
    line with its cause, that member is closed (4500), and other rooms go on."""
    import redis

    server = ChatServer("--redis", redis_server, "--rate-limit", "0")
    members_key = chat.RedisRooms.prefix("broken") + ":members"
    redis.Redis.from_url(redis_server).set(members_key, "not a sorted set")
    try:
        with server.websocket("fine", name="ana") as ana:
            next_frame(ana, "welcome")
            with (
                server.websocket("broken") as broken,
                pytest.raises(ConnectionClosed) as closed,
            ):
                next_frame(broken, "welcome")
            assert closed.value.rcvd.code == chat.CLOSE_REFUSED
            post(ana, "still fine")
            assert next_frame(ana)["message"] == "still fine"
        wait_until(lambda: "Redis said: " in server.text)
    finally:
        server.stop()
        redis.Redis.from_url(redis_server).delete(members_key)
    assert "Redis failed" not in server.text and "Traceback" not in server.text


def test_the_lobby_lists_busy_rooms_whatever_happened_since(redis_server):
    server = ChatServer("--redis", redis_server, "--rate-limit", "0")
    try:
        with server.websocket("the-busy-room", name="ana") as ana:
            next_frame(ana, "welcome")
            for i in range(chat.LOBBY_SIZE + 10):  # each joins a fresh room, leaves
                with server.websocket(f"passing-{i}") as passer:
                    next_frame(passer, "welcome")
            wait_until(
                lambda: (
                    get_json(server.url + "/chat/rooms.json")["rooms"]
                    == [{"name": "the-busy-room", "count": 1}]
                ),
                what="the lobby to list the busy room alone",
            )
    finally:
        server.stop()


def redis_calls(url: str) -> Counter:
    """How many times the Redis at `url` has run each command (inside scripts too)."""
    stats = redis.Redis.from_url(url).info("commandstats")
    return Counter(
        {name.removeprefix("cmdstat_"): s["calls"] for name, s in stats.items()}
    )


def poll_lobby(port: int, source: str, times: int, every: float) -> list[dict]:
    """A lobby page left open, polling rooms.json from a loopback `source` address."""
    lobby = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    lobby.source_address = (source, 0)
    seen = []
    for _ in range(times):
        lobby.request("GET", "/chat/rooms.json", headers={"Host": f"127.0.0.1:{port}"})
        seen.append(json.loads(lobby.getresponse().read()))
        time.sleep(every)
    lobby.close()
    return seen


def test_open_lobbies_cost_redis_per_process_not_per_page():
    redis_server = RedisServer()  # (its own: no rooms of other tests in its lobby)
    server = ChatServer("--redis", redis_server.url, "--rate-limit", "0")
    try:
        members = [server.websocket(f"lobby-{n}", name="ana") for n in range(3)]
        for member in members:
            next_frame(member, "welcome")
            next_frame(member, "join")  # (the news of it: counted and sent)
        before = redis_calls(redis_server.url)
        started = time.monotonic()
        # 500 open lobbies polling every 3 s (LOBBY_REFRESH), from 50 addresses.
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            answers = [
                pool.submit(poll_lobby, port_of(server), f"127.0.0.{n + 2}", 20, 0.3)
                for n in range(50)
            ]
            answers = [answer for done in answers for answer in done.result()]
        seconds = time.monotonic() - started
        calls = redis_calls(redis_server.url) - before
        calls["info"] -= 1  # (ours)
        assert len(answers) == 1000
        listed = sorted(answers[-1]["rooms"], key=lambda room: room["name"])
        assert listed == [{"name": f"lobby-{n}", "count": 1} for n in range(3)]
        # The lobby: a list and a count of each room, once per LOBBY_REFRESH...
        refreshes = seconds // chat.LOBBY_REFRESH + 1
        assert calls["zrevrange"] <= refreshes and calls["zcount"] <= 3 * refreshes
        # ...and everything Redis ran meanwhile, the process's keep-alive included.
        assert calls.total() <= 10 * seconds, (calls, seconds)
        for member in members:
            member.close()
    finally:
        server.stop()
        redis_server.stop()


@contextlib.contextmanager
def redis_monitor(url: str):
    """The commands the Redis at `url` gets from its clients meanwhile (not those its
    scripts run): one per round trip of a client that does not pipeline. `.upto()`
    returns those received so far, and starts afresh."""
    monitor = redis.Redis.from_url(url).monitor()
    connection = monitor.__enter__()  # (MONITOR is on when this returns)
    seen: queue.Queue[str] = queue.Queue()

    def read():
        with contextlib.suppress(Exception):  # (until the connection closes)
            while True:
                command = connection.next_command()
                if command["client_type"] != "lua":
                    seen.put(command["command"])

    threading.Thread(target=read, daemon=True).start()
    marker = redis.Redis.from_url(url)

    def upto() -> list[str]:
        token = secrets.token_hex(8)
        marker.echo(token)
        commands = []
        while (command := seen.get(timeout=TIMEOUT)) != f"ECHO {token}":
            commands.append(command.split()[0].upper())
        return commands

    try:
        yield upto
    finally:
        monitor.__exit__(None, None, None)


def test_a_connect_costs_redis_one_round_trip_and_a_leave_one(redis_server):
    server = ChatServer("--redis", redis_server, "--rate-limit", "0")
    uri = server.url.replace("http", "ws") + "/ws/chat/trips/?name="
    stats = redis.Redis.from_url(redis_server)

    def round_trips() -> int:
        """Reads Redis made from its clients' sockets: pipelined commands come in one."""
        return stats.info("stats")["total_reads_processed"]

    try:
        with (
            server.websocket("trips", name="watcher") as watcher,
            redis_monitor(redis_server) as commands,
        ):
            next_frame(watcher, "welcome")
            commands()  # (what came before)
            before = round_trips()
            with contextlib.ExitStack() as members:
                for n in range(30):
                    member = connect(uri + f"m{n}", origin=server.url, max_queue=None)
                    next_frame(members.enter_context(member), "welcome")
                frames_until(watcher, lambda f: "m29" in f.get("users", []))
                arriving, after = commands(), round_trips()
            frames_until(watcher, lambda f: f["type"] == "leave" and f["count"] == 1)
            leaving, trips_leaving = commands(), round_trips() - after
        # Entering is one script (the room's first member in a process also has it
        # counted, in the same round trip); leaving is one script. The news of
        # arrivals and departures (a count, the lobby told, a publish) goes out for
        # many at once, and the keep-alive may take a round meanwhile. (Not counted:
        # opening a Redis connection.)
        setup = {"HELLO", "PING", "SCRIPT", "CLIENT", "SELECT"}
        for sent in (arriving, leaving):
            sent = [command for command in sent if command not in setup]
            assert len(sent) <= 30 + 12, Counter(sent)
        # Round trips: 30 and 30, besides those of the news and of opening connections
        # (a crowd leaving at once may have the pool open some: each reads a HELLO, a
        # CLIENT SETINFO or two that MONITOR does not show, and a first PING).
        opening = [4 * sent.count("HELLO") for sent in (arriving, leaving)]
        assert after - before - opening[0] <= 30 + 20
        assert trips_leaving - opening[1] <= 30 + 20
    finally:
        server.stop()


def redis_work(client) -> Counter:
    """What the Redis of `client` has done so far: microseconds of CPU (its main
    thread), reads from its clients' sockets (pipelined commands come in one, or a
    few for a long pipeline: round trips), and commands (inside scripts too). Its own
    INFO calls are left out."""
    cpu, stats, commands = (
        client.info(part) for part in ("cpu", "stats", "commandstats")
    )
    info = commands.pop("cmdstat_info")["calls"]
    return Counter(
        cpu_us=1e6
        * (cpu["used_cpu_user_main_thread"] + cpu["used_cpu_sys_main_thread"]),
        round_trips=stats["total_reads_processed"] - info,
        commands=sum(s["calls"] for s in commands.values()),
    )


def test_what_each_operation_costs_redis(capsys):
    """The capacity model's figures (README, "What each thing costs Redis"): the
    Redis CPU, round trips and commands of each operation, from one chat.py process
    against a Redis of its own, less what Redis does when idle. Printed with -s; the
    round trips are checked, the CPU only measured."""
    redis_server = RedisServer()
    client = redis.Redis.from_url(redis_server.url)
    flags = ("--rate-limit", "0", "--max-per-address", "0", "--quiet")
    server = ChatServer("--redis", redis_server.url, *flags)
    flags = {"origin": server.url, "max_queue": None, "open_timeout": 5}
    base = server.url.replace("http", "ws") + "/ws/chat/"
    n, rooms, costs = 200, 200, {}

    def measured(operation: str, times: int, action, most_trips: float) -> None:
        before, started = redis_work(client), time.monotonic()
        action()
        work = redis_work(client)
        work.subtract(before)
        work["cpu_us"] -= idle * (time.monotonic() - started) + asking
        costs[operation] = (
            {key: value / times for key, value in work.items()},
            most_trips,
        )

    before = redis_work(client)
    time.sleep(2)
    after = redis_work(client)
    idle = (after["cpu_us"] - before["cpu_us"]) / 2  # (its chores)
    asking = redis_work(client)["cpu_us"] - after["cpu_us"]  # (our INFO calls)
    try:
        with contextlib.ExitStack() as sockets:
            watcher = sockets.enter_context(server.websocket("big", name="watcher"))
            next_frame(watcher, "welcome")
            crowd = []

            def talk(first: int, count: int):
                text = "x" * 100  # (the benchmark's size)
                for m in range(first, first + count):
                    post(watcher, f"{m} {text}")
                last = f"{first + count - 1} {text}"
                frames_until(watcher, lambda f: f.get("message") == last)

            # POST, ACCOUNT, PUBLISH
            filling, full = chat.HISTORY_SIZE, 5 * chat.HISTORY_SIZE
            measured(
                "a message (history filling)", filling, lambda: talk(0, filling), 3.2
            )
            measured("a message (history full)", full, lambda: talk(filling, full), 3.2)

            def arrive():
                for m in range(n):
                    crowd.append(connect(f"{base}big/?name=m{m}", **flags))
                    next_frame(crowd[-1], "welcome")
                frames_until(watcher, lambda f: f.get("count") == n + 1)

            # ENTER (the news adds a little)
            measured(
                "a member connects (history, names), with the news", n, arrive, 1.2
            )

            for room in range(rooms):
                member = sockets.enter_context(server.websocket(f"r{room}", name="m"))
                next_frame(member, "welcome")
            time.sleep(chat.LOBBY_REFRESH)  # (the lobby's list goes stale)
            lobby = lambda: get_json(server.url + "/chat/rooms.json")
            # a list, the counts, the list told
            measured(f"the lobby is refreshed ({chat.LOBBY_SIZE} rooms)", 1, lobby, 3)
            alive = chat.RedisRooms.ALIVE
            score = client.zscore(alive, "r0")

            def keep_alive_round():
                nonlocal score
                wait_until(lambda: client.zscore(alive, "r0") != score, timeout=30)
                score = client.zscore(alive, "r0")

            keep_alive_round()  # (the next one begins MEMBER_TTL / 3 later)
            time.sleep(chat.MEMBER_TTL / 3 - 0.5)
            # one pipeline, read in a few pieces
            measured("a room kept alive, a round", rooms + 1, keep_alive_round, 0.2)

            keys = chat.RedisRooms.keys("big")
            kept = client.memory_usage(keys[1]) / chat.HISTORY_SIZE
            listed = sum(client.memory_usage(key) for key in keys[2:]) / (n + 1)

            def depart():
                for member in crowd:
                    member.close()
                frames_until(watcher, lambda f: f.get("count") == 1)

            measured("a member leaves, with the news", n, depart, 1.2)  # LEAVE
    finally:
        server.stop()
        redis_server.stop()
    with capsys.disabled():
        print(f"\nRedis idle: {idle:.0f} µs of CPU a second; INFO: {asking:.0f} µs")
        print(f"Redis memory: {kept:.0f} bytes a message kept, {listed:.0f} a member")
        print("| operation | Redis CPU | round trips | commands |")
        print("| --- | --- | --- | --- |")
        for operation, (each, _) in costs.items():
            print(
                f"| {operation} | {each['cpu_us']:.0f} µs | {each['round_trips']:.2f}"
                f" | {each['commands']:.1f} |"
            )
    for each, most_trips in costs.values():
        assert each["round_trips"] <= most_trips, costs


def test_rooms_keep_to_one_slot_as_a_redis_cluster_asks(monkeypatch, capsys):
    """On a Redis Cluster a script may touch the keys of one slot only (Redis 7
    refuses others in "#!lua" scripts), and a command the keys of one slot. A
    one-node cluster refuses what a bigger one would: entering, posting, renaming,
    leaving, the news, the lobby, the keep-alive and the budget letting rooms go
    all run on it without an error."""
    bus = str(free_port())  # (else the port + 10,000, which may be past 65,535)
    cluster = RedisServer(None, "", "--cluster-enabled", "yes", "--cluster-port", bus)
    try:
        work_on_a_one_node_cluster(cluster, monkeypatch, capsys)
    finally:
        cluster.stop()


def work_on_a_one_node_cluster(cluster, monkeypatch, capsys) -> None:
    client = redis.Redis.from_url(cluster.url, decode_responses=True)
    client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    state = lambda: "cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
    wait_until(state, what="a one-node Redis Cluster")
    server = ChatServer("--redis", cluster.url, "--rate-limit", "0")
    try:
        with server.websocket("one-slot", name="ana") as ana:
            next_frame(ana, "welcome")
            with server.websocket("one-slot", name="bob") as bob:
                next_frame(bob, "welcome")
                post(ana, "hello")
                assert next_frame(bob, "message")["message"] == "hello"
                bob.send(json.dumps({"type": "rename", "name": "rob"}))
                frames_until(ana, lambda f: f["type"] == "rename")
                rooms = lambda: get_json(server.url + "/chat/rooms.json")["rooms"]
                wait_until(lambda: rooms() == [{"name": "one-slot", "count": 2}])
            frames_until(ana, lambda f: f["type"] == "leave" and f["count"] == 1)
    finally:
        server.stop()
    for trouble in ("Redis said", "Redis failed", "Redis refused", "Traceback"):
        assert trouble not in server.text, server.text

    monkeypatch.setattr(chat, "ROOMS_BUDGET", 100_000)
    emoji = "\U0001f600" * (chat.MAX_MESSAGE_BYTES // 4)

    async def budget_and_keep_alive():
        store = chat.RedisRooms(cluster.url)
        await store.join("lived-in", "m1", "ana")
        for room in range(30):
            for _ in range(10):
                await store.post(f"flood-{room}", chat.chat_frame("zed", emoji))
        await store.keep_rooms()
        store.keeper.cancel()
        await store.redis.aclose()
        return store

    store = asyncio.run(budget_and_keep_alive())
    assert int(client.get(store.BYTES)) <= chat.ROOMS_BUDGET
    assert not client.exists(*store.keys("flood-0")) and client.exists(
        store.keys("flood-29")[1]
    )
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "url, expected",
    [
        (
            "redis+sentinel://127.0.0.1:26379,127.0.0.2:26380/chat/1",
            ([("127.0.0.1", 26379), ("127.0.0.2", 26380)], "chat", 1),
        ),
        (
            "redis+sentinel://sentinel.local/chat",
            ([("sentinel.local", 26379)], "chat", 0),
        ),
        ("redis+sentinel://[::1]:26381/chat/0", ([("::1", 26381)], "chat", 0)),
        ("redis://127.0.0.1:6379/0", None),
    ],
)
def test_a_sentinel_url_names_sentinels_master_and_database(url, expected):
    assert chat.sentinel_of(url) == expected


def test_a_sentinel_failover_keeps_the_chat_going(tmp_path):
    master = RedisServer()
    replica = RedisServer(None, "", "--replicaof", "127.0.0.1", str(master.port))
    config = tmp_path / "sentinel.conf"  # (a sentinel rewrites its own file)
    config.write_text(
        f"sentinel monitor chat 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds chat 1000\n"
        "sentinel failover-timeout chat 5000\n"
    )
    sentinel = RedisServer(None, str(config), "--sentinel")
    servers = [master, replica, sentinel]
    watch = redis.Redis(port=sentinel.port, decode_responses=True)
    wait_until(
        lambda: watch.sentinel_slaves("chat"), what="the sentinel to see the replica"
    )
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/chat/0"
    chat_server = ChatServer("--redis", url, "--rate-limit", "0")
    servers.append(chat_server)
    uri = chat_server.url.replace("http", "ws") + "/ws/chat/failover/?name=ana"
    try:
        with connect(uri, origin=chat_server.url, max_queue=None) as ana:
            welcome = next_frame(ana, "welcome")
            for text in ("one", "two", "three"):
                post(ana, text)
            acknowledged = [next_frame(ana) for _ in range(3)]
            assert [f["id"] for f in acknowledged] == [1, 2, 3]
            wait_until(  # (replication is asynchronous: the README says what it means)
                lambda: (
                    redis.Redis(port=replica.port).info("replication")[
                        "master_repl_offset"
                    ]
                    >= redis.Redis(port=master.port).info("replication")[
                        "master_repl_offset"
                    ]
                ),
                what="the replica to have the messages",
            )
            master.stop(signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ana.recv(timeout=TIMEOUT)
            assert closed.value.rcvd.code == chat.CLOSE_UNAVAILABLE
        # A page that had shown only "one" resumes with since=1, as the page would.
        with contextlib.ExitStack() as attempts:
            resumed = None
            while resumed is None and time.monotonic() - killed < 10:
                query = f"&since=1&epoch={welcome['epoch']}"
                with contextlib.suppress(WebSocketException, OSError, TimeoutError):
                    ana = attempts.enter_context(
                        connect(uri + query, origin=chat_server.url, max_queue=None)
                    )
                    frames = frames_until(ana, lambda f: f["type"] == "welcome", 2)
                    resumed, missed = frames[-1], frames[:-1]
                if resumed is None:
                    time.sleep(0.5)
            assert resumed, "the chat did not come back within 10 s of the failover"
            assert resumed["last_id"] == 3 and resumed["epoch"] == welcome["epoch"]
            assert [(f["id"], f["message"]) for f in missed] == [
                (2, "two"),
                (3, "three"),
            ]
            post(ana, "after the failover")
            assert next_frame(ana)["id"] == 4  # ids continue
        assert get_json(chat_server.url + "/healthz")["status"] == "ok"
    finally:
        for server in reversed(servers):
            server.stop()
    assert "Traceback" not in chat_server.text, chat_server.text


def from_address(server, source: str, room: str, **query):
    """A WebSocket to `server` from another loopback address of this machine."""
    port = port_of(server)
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0)
    )
    query_string = "&".join(f"{k}={quote(str(v))}" for k, v in query.items())
    uri = f"ws://127.0.0.1:{port}/ws/chat/{room}/?{query_string}"
    return connect(uri, sock=sock, origin=server.url, open_timeout=5)


def test_max_per_address_caps_one_address_and_lets_another_in():
    server = ChatServer("--max-per-address", "3", "--rate-limit", "0")
    try:
        three = [server.websocket("capped") for _ in range(3)]
        for ws in three:
            next_frame(ws, "welcome")
        with (
            server.websocket("capped") as fourth,
            pytest.raises(ConnectionClosed) as closed,
        ):
            error = next_frame(fourth, "error")
            next_frame(fourth, "welcome")
        assert error["message"] == "at most 3 connections per address"
        assert closed.value.rcvd.code == chat.CLOSE_TOO_MANY
        wait_until(lambda: "3 sockets from there already" in server.text)
        with from_address(server, "127.0.0.2", "capped") as other:
            assert next_frame(other, "welcome")["count"] == 4
        three.pop().close()
        with server.websocket("capped") as again:
            next_frame(again, "welcome")

        # Below the WebSockets, TCP connections of any kind: twice the cap.
        port = port_of(server)
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for s in slow:
            s.sendall(b"GET /chat/ HTTP/1.1\r\n")  # ...and the rest never comes
        assert raw_http(port, b"GET /healthz HTTP/1.1\r\n\r\n").split()[1] == b"429"
        with socket.create_connection(
            ("127.0.0.1", port), source_address=("127.0.0.2", 0)
        ) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(4096).split()[1] == b"200"
        for s in slow + three:
            s.close()
    finally:
        server.stop()
    assert "Traceback" not in server.text, server.text


def test_behind_a_proxy_the_cap_counts_the_forwarded_address():
    server = ChatServer(
        "--max-per-address", "1", "--proxy-headers", "--rate-limit", "0"
    )

    def visitor(address: str):
        host = server.url.split("://", 1)[1]
        headers = {"X-Forwarded-For": address}
        uri = f"ws://{host}/ws/chat/proxied/"
        return connect(uri, origin=server.url, additional_headers=headers)

    try:
        with visitor("203.0.113.7") as first, visitor("203.0.113.8") as second:
            next_frame(first, "welcome")
            assert next_frame(second, "welcome")["count"] == 2  # two visitors
            with visitor("203.0.113.7") as again, pytest.raises(ConnectionClosed):
                assert next_frame(again, "error")["message"].startswith("at most 1")
                next_frame(again, "welcome")
    finally:
        server.stop()
    assert "refused 203.0.113.7:" in server.text


def test_reconnecting_does_not_refill_the_rate():
    server = ChatServer("--rate-limit", "5", "--max-per-address", "0")
    accepted, started = 0, time.monotonic()
    try:
        for _ in range(4):
            with server.websocket("rated") as ws:
                next_frame(ws, "welcome")
                for n in range(5):
                    post(ws, f"message {n}")
                kinds = [
                    frames_until(ws, lambda f: f["type"] in ("message", "error"))[-1]
                    for _ in range(5)
                ]
                accepted += sum(f["type"] == "message" for f in kinds)
    finally:
        server.stop()
    # A fresh bucket per connection would have taken all 20.
    assert accepted <= 5 + 5 * (time.monotonic() - started) + 1 < 20


def test_the_open_file_limit_is_raised_and_the_banner_says_how_many():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024:
        pytest.skip("the hard open-file limit is 1024 already")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        server = ChatServer()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        line = server.wait_for_line("chat.py: room for about")
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
        files = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
        assert files.group(1) == files.group(2) == str(hard)
        assert f"open-file limit {hard:,}" in line
    finally:
        server.stop()


def test_a_renamer_in_a_crowd_costs_the_members_little(server):
    """One member renames as often as the rate lets it, with long emoji names, in a
    room of 50 with long emoji names: the others receive < 50 KB/s in all."""
    emoji = "\U0001f600" * (chat.MAX_NAME - 2)
    host = server.url.split("://", 1)[1]

    async def member(n: int):
        uri = f"ws://{host}/ws/chat/crowded/?name={quote(emoji + f'{n:02}')}"
        ws = await asyncio_connect(uri, origin=server.url, max_queue=None)
        while json.loads(await ws.recv())["type"] != "welcome":
            pass
        return ws

    async def count_bytes(ws, until: float) -> int:
        received = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(until - time.monotonic()):
                while True:
                    received += len((await ws.recv()).encode())
        return received

    async def scenario():
        members = [await member(n) for n in range(50)]
        renamer, others = members[0], members[1:]
        await asyncio.sleep(2 * chat.PRESENCE_DELAY + 0.5)  # the joins go out
        for ws in others:
            while not await no_messages_at_all(ws, 0.05):
                pass
        seconds = 2 * chat.RENAME_INTERVAL
        until = time.monotonic() + seconds
        counting = [asyncio.ensure_future(count_bytes(ws, until)) for ws in others]
        n = 0
        while time.monotonic() < until - 0.2:  # as often as the rate limit allows
            n += 1
            rename = {"type": "rename", "name": emoji + f"{n % 100:02}"}
            await renamer.send(json.dumps(rename))
            await asyncio.sleep(1 / chat.RATE_LIMIT)
        total = sum(await asyncio.gather(*counting))
        for ws in members:
            await ws.close()
        return total / seconds

    per_second = asyncio.run(scenario())
    assert 0 < per_second < 50_000, f"{per_second:.0f} bytes/s"


async def no_messages_at_all(ws, seconds: float) -> bool:
    """True when no frame at all arrives within `seconds`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await ws.recv()
            return False
    return True


def test_frames_are_utf8_json_not_escapes(live_server):
    with live_server.websocket("utf8", name="\U0001f600 ana") as ws:
        welcome = ws.recv(timeout=TIMEOUT)
        while json.loads(welcome)["type"] != "welcome":
            welcome = ws.recv(timeout=TIMEOUT)
        post(ws, "café \U0001f600")
        raw = ws.recv(timeout=TIMEOUT)
    assert "\U0001f600 ana" in welcome and "\\u" not in welcome
    assert "café \U0001f600" in raw and "\\u" not in raw


def redis_used_memory(url: str) -> int:
    import redis

    return redis.Redis.from_url(url).info("memory")["used_memory"]


def test_a_room_flood_levels_off_within_the_budget(redis_server):
    """A hostile client visits fresh rooms and fills each history with the biggest
    messages allowed, from many connections at once, for two minutes, against an
    in-memory server and one on Redis: what each keeps levels off within
    ROOMS_BUDGET (the last minute grows < 16 MB), and an honest member in another
    room loses nothing."""
    flags = ("--rate-limit", "0", "--max-per-address", "0", "--quiet")
    memory = ChatServer(*flags)
    on_redis = ChatServer(*flags, "--redis", redis_server)
    emoji = "\U0001f600" * (chat.MAX_MESSAGE_BYTES // 4)
    seconds, rooms = 120, itertools.count()

    async def flooder(server, until: float) -> None:
        host = server.url.split("://", 1)[1]
        while time.monotonic() < until:
            uri = f"ws://{host}/ws/chat/flood-{next(rooms)}/"
            async with asyncio_connect(uri, origin=server.url, max_queue=None) as ws:
                for _ in range(chat.HISTORY_SIZE // 10):  # ten at a time
                    for _ in range(10):
                        await ws.send(json.dumps({"message": emoji}))
                    await messages_of(ws, 10, timeout=60)

    async def honest(server, until: float) -> list[int]:
        host = server.url.split("://", 1)[1]
        uri = f"ws://{host}/ws/chat/honest/?name=honest"
        ids = []
        async with asyncio_connect(uri, origin=server.url) as ws:
            while time.monotonic() < until:
                await ws.send(json.dumps({"message": "still here"}))
                ids.append((await messages_of(ws, 1))[0]["id"])
                await asyncio.sleep(0.5)
        return ids

    def measure() -> tuple[int, int]:
        return rss_kib(memory.proc.pid) * 1024, redis_used_memory(redis_server)

    async def scenario():
        start = time.monotonic()
        until = start + seconds
        work = [
            flooder(server, until) for server in (memory, on_redis) for _ in range(8)
        ]
        flooding = asyncio.gather(*work, honest(memory, until), honest(on_redis, until))
        await asyncio.sleep(seconds / 2)
        halfway = measure()
        results = await flooding
        return halfway, results[-2:]

    try:
        before = measure()
        halfway, honest_ids = asyncio.run(scenario())
        after = measure()
    finally:
        memory.stop()
        on_redis.stop()
    print(f"flood: before {before}, halfway {halfway}, after {after} bytes")
    for ids in honest_ids:
        assert ids == list(range(1, len(ids) + 1)) and len(ids) > seconds
    assert next(rooms) > 100  # (rooms flooded, on both servers)
    budget, slack = chat.ROOMS_BUDGET, 16 * 1024 * 1024
    assert after[0] - halfway[0] < slack and after[1] - halfway[1] < slack
    # What is counted, and what the allocators add to it: glibc's keeps the gaps
    # between the messages kept (Python's own allocations grow by the budget, as
    # tracemalloc shows), Redis's rounds each message up to its size classes.
    assert after[0] - before[0] < 2 * budget + slack
    assert after[1] - before[1] < 1.3 * budget + slack
    for server in (memory, on_redis):
        assert "Traceback" not in server.text, server.text


# --- Load, churn and crowds (small versions; chatbench runs the big ones) ---


async def crowd(base_url: str, room: str, count: int, **query) -> list:
    """`count` members of a room, connected 20 at a time, each welcomed."""
    host = base_url.split("://", 1)[1]
    uri = f"ws://{host}/ws/chat/{quote(room)}/"
    if query:
        uri += "?" + "&".join(f"{k}={quote(str(v))}" for k, v in query.items())
    gate = asyncio.Semaphore(20)

    async def member():
        async with gate:
            ws = await asyncio_connect(
                uri, origin=base_url, open_timeout=TIMEOUT, max_queue=None
            )
            while json.loads(await ws.recv())["type"] != "welcome":
                pass
            return ws

    return list(await asyncio.gather(*(member() for _ in range(count))))


async def messages_of(ws, count: int, timeout: float = 30) -> list[dict]:
    """The next `count` message frames a member receives (other frames skipped)."""
    got = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            frame = json.loads(await ws.recv())
            if frame["type"] == "message":
                got.append(frame)
    return got


async def no_messages(ws, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while json.loads(await ws.recv())["type"] != "message":
                pass
            return False
    return True


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


@pytest.fixture
def server():
    """A chat.py of a test's own, without a rate limit or a cap on sockets from one
    address (the test's); its log must show no traceback."""
    server = ChatServer("--rate-limit", "0", "--max-per-address", "0")
    yield server
    server.stop()
    assert "Traceback" not in server.text, server.text


@pytest.mark.parametrize("layer", ["memory", "redis"])
def test_a_burst_loses_nothing(layer, request):
    extra = (
        ["--redis", request.getfixturevalue("redis_server")] if layer == "redis" else []
    )
    server = ChatServer("--rate-limit", "0", "--max-per-address", "0", *extra)
    senders, each = 20, 50

    async def burst():
        room, elsewhere = (
            await crowd(server.url, "burst", senders),
            await crowd(server.url, "burst-other", 2),
        )

        async def send_all(n, ws):
            for k in range(each):
                await ws.send(json.dumps({"message": f"{n}:{k}"}))

        await asyncio.gather(*(send_all(n, ws) for n, ws in enumerate(room)))
        for ws in room:
            got = await messages_of(ws, senders * each)
            assert len({f["id"] for f in got}) == senders * each, "a duplicate"
            for n in range(senders):
                mine = [
                    int(f["message"].split(":")[1])
                    for f in got
                    if f["message"].startswith(f"{n}:")
                ]
                assert mine == list(range(each)), f"sender {n}'s messages out of order"
            ids = [f["id"] for f in got]
            assert ids == sorted(ids)
        for ws in elsewhere:
            assert await no_messages(ws, 0.3), "a message leaked into another room"
        for ws in room + elsewhere:
            await ws.close()

    try:
        asyncio.run(burst())
    finally:
        server.stop()
    assert "Traceback" not in server.text, server.text


def test_connection_churn_leaks_nothing(server):

    async def churn(cycles: int):
        for start in range(0, cycles, 50):
            batch = await crowd(server.url, "churn", 50, name="passer")
            for n, ws in enumerate(batch):
                if n % 2:
                    ws.transport.abort()  # dropped without a close frame
                else:
                    await ws.close()

    async def scenario():
        stayers = await crowd(server.url, "churn", 5, name="stayer")
        await churn(500)
        settled = rss_kib(server.proc.pid)
        await churn(500)
        grown = rss_kib(server.proc.pid) - settled
        assert grown < 15 * 1024, f"RSS grew by {grown} KiB over the second 500 cycles"

        listed = []

        def only_stayers_listed():
            listed[:] = get_json(server.url + "/chat/rooms.json")["rooms"]
            return {"name": "churn", "count": 5} in listed

        try:
            await asyncio.to_thread(wait_until, only_stayers_listed, what="5 listed")
        except AssertionError:
            raise AssertionError(f"the lobby lists {listed}, not 5 members") from None
        await stayers[0].send(json.dumps({"message": "who is still here?"}))
        for ws in stayers:
            assert [f["message"] for f in await messages_of(ws, 1)] == [
                "who is still here?"
            ]
            assert await no_messages(ws, 0.3), "delivered twice"
        for ws in stayers:
            await ws.close()

    asyncio.run(scenario())


def test_a_thousand_connections_in_ten_rooms_all_hear_their_room(server):

    async def scenario():
        rooms = [await crowd(server.url, f"hall-{n}", 100) for n in range(10)]
        for n, members in enumerate(rooms):
            await members[0].send(json.dumps({"message": f"hello hall {n}"}))
        for n, members in enumerate(rooms):
            for ws in members:
                assert (await messages_of(ws, 1))[0]["message"] == f"hello hall {n}"
        for members in rooms:
            for ws in members:
                await ws.close()

    asyncio.run(scenario())


def test_a_reader_that_never_reads_harms_nobody_and_is_dropped(server):
    port = int(server.url.rsplit(":", 1)[1])
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    slow.sendall(
        b"GET /ws/chat/slow/?name=slowpoke HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\n".encode()
        + b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )  # ...and never reads a byte

    async def scenario():
        readers = await crowd(server.url, "slow", 10)

        async def send_all(ws):
            for k in range(50):
                await ws.send(json.dumps({"message": f"busy {k}" + "x" * 200}))

        await asyncio.gather(*(send_all(ws) for ws in readers))
        for ws in readers:
            assert len(await messages_of(ws, 500)) == 500
        # Daphne pings every PING_INTERVAL; a peer that never answers is dropped.
        limit = chat.PING_INTERVAL + chat.PING_TIMEOUT + 10
        async with asyncio.timeout(limit):
            while True:
                frame = json.loads(await readers[0].recv())
                if frame["type"] == "leave" and "slowpoke" in frame["users"]:
                    break
        for ws in readers:
            await ws.close()

    try:
        asyncio.run(scenario())
    finally:
        slow.close()


def test_a_reader_too_far_behind_is_closed_with_4008_and_resumes_losing_nothing(server):
    port = int(server.url.rsplit(":", 1)[1])
    uri = f"ws://127.0.0.1:{port}/ws/chat/lagging/"

    async def scenario():
        tiny = socket.socket()
        tiny.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        tiny.connect(("127.0.0.1", port))
        # max_queue=1: the client stops reading its socket until we call recv()
        lagger = await asyncio_connect(uri, origin=server.url, sock=tiny, max_queue=1)
        async with asyncio_connect(uri, origin=server.url, max_queue=None) as writer:
            for k in range(3000):  # ~6 MB: more than the kernel's buffers hold
                await writer.send(json.dumps({"message": f"{k} " + "x" * 1900}))
            await messages_of(writer, 3000, timeout=60)
            await asyncio.sleep(chat.SLOW_READER_GRACE + 3)  # the scenario: not reading
            got = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frame = json.loads(await lagger.recv())
                    if frame["type"] == "message":
                        got.append(frame)
            assert closed.value.rcvd.code == chat.CLOSE_TOO_SLOW
            await writer.send(json.dumps({"message": "while it was away"}))
            query = f"?since={got[-1]['id']}&epoch={got[-1]['epoch']}"
            async with asyncio_connect(uri + query, origin=server.url) as back:
                missed = []
                while (frame := json.loads(await back.recv()))["type"] != "welcome":
                    missed.append(frame["message"])
        ids = [f["id"] for f in got]
        assert ids == list(range(ids[0], ids[0] + len(ids))), "a gap before the close"
        assert got[-1]["message"].startswith("2999 ")
        assert missed == ["while it was away"]

    asyncio.run(scenario())


def test_workers_share_one_port_and_the_rooms(redis_server):
    server = ChatServer("--workers", "2", "--redis", redis_server)
    try:
        assert "2 worker processes" in server.banner_layer
        pids: set[int] = set()
        wait_until(
            lambda: pids.add(get_json(server.url + "/healthz")["pid"]) or len(pids) > 1,
            what="answers from both workers",
        )
        with contextlib.ExitStack() as stack:
            by_worker: dict[int, tuple[str, object]] = {}
            for i in itertools.count():  # members until there is one on each worker
                ws = stack.enter_context(server.websocket("by-workers", name=f"m{i}"))
                next_frame(ws, "welcome")
                by_worker.setdefault(worker_of(ws, pids), (f"m{i}", ws))
                if len(by_worker) == 2:
                    break
            (_, first), (second_name, second) = by_worker.values()
            frames_until(first, lambda f: second_name in f.get("users", []))
            post(second, "across workers")
            assert next_frame(first)["message"] == "across workers"
            with server.websocket("by-workers") as late:
                assert next_frame(late)["message"] == "across workers"  # history
    finally:
        assert server.stop(signal.SIGINT) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert "Traceback" not in server.text, server.text


def worker_of(ws, pids: set[int]) -> int:
    """Which worker process holds the server's end of a client's connection."""
    client_port, inode = ws.socket.getsockname()[1], None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].rsplit(":", 1)[1], 16) == client_port and fields[9] != "0":
            inode = fields[9]  # (inode 0: an earlier connection's TIME_WAIT)
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
    raise AssertionError(f"no worker holds the connection from port {client_port}")


def test_nginx_from_the_readme_spreads_two_processes(redis_server, tmp_path):
    """The README's nginx configuration, as written, on loopback ports."""
    nginx = need("nginx")
    ports = [free_port(), free_port()]
    flags = ["--redis", redis_server, "--allowed-host", "chat.example.org"]
    servers = [ChatServer(*flags, "--proxy-headers", port=port) for port in ports]
    proxy_port = free_port()
    config = re.search(r"```nginx\n(.*?)```", README, re.DOTALL).group(1)
    config = config.replace("listen 80;", f"listen 127.0.0.1:{proxy_port};")
    config = config.replace(":8001;", f":{ports[0]};").replace(
        ":8002;", f":{ports[1]};"
    )
    (tmp_path / "chat.conf").write_text(config)
    (tmp_path / "nginx.conf").write_text(
        f"daemon off; pid {tmp_path}/nginx.pid; error_log stderr;\n"
        f"events {{}}\nhttp {{ access_log off; include {tmp_path}/chat.conf; }}\n"
    )
    proxy = Process([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")])
    host = f"chat.example.org:{proxy_port}"
    try:
        wait_until(lambda: port_answers(proxy_port), what="nginx to listen")
        pids = {get_json_via(proxy_port, host, "/healthz")["pid"] for _ in range(4)}
        assert len(pids) == 2, "nginx should spread requests over both processes"
        with (
            via_proxy(proxy_port, host, "ana") as ana,
            via_proxy(proxy_port, host, "bob") as bob,
        ):
            next_frame(ana, "welcome")
            assert next_frame(bob, "welcome")["count"] == 2
            post(ana, "through nginx")
            assert next_frame(bob)["message"] == "through nginx"

        def joined() -> list[str]:
            lines = servers[0].output + servers[1].output
            return [line for line in lines if " joined " in line]

        wait_until(lambda: len(joined()) == 2, what="both arrivals in the logs")
        assert all("from 127.0.0.1:" in line for line in joined()), joined()
    finally:
        proxy.stop()
        for server in servers:
            server.stop()
    assert "Traceback" not in servers[0].text + servers[1].text


def get_json_via(port: int, host: str, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    request.add_header("Host", host)
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.loads(response.read())


def via_proxy(port: int, host: str, name: str):
    """A WebSocket to the proxy on loopback, from a page of http://<host>, with a
    forged client address (the proxy must replace it)."""
    return connect(
        f"ws://{host}/ws/chat/proxied/?name={name}",
        sock=socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT),
        origin=f"http://{host}",
        additional_headers={"X-Forwarded-For": "203.0.113.9"},
        open_timeout=TIMEOUT,
    )


def test_hundreds_leaving_redis_at_once_leave_no_membership_behind(redis_server):
    import redis

    server = ChatServer(
        "--redis", redis_server, "--rate-limit", "0", "--max-per-address", "0"
    )
    client = redis.Redis.from_url(redis_server)
    group = f"asgi__group__{chat.group_name('exodus')}"  # the pub/sub channel

    def subscribers() -> int:
        return client.pubsub_numsub(group)[0][1]

    async def scenario():
        members = await crowd(server.url, "exodus", 300)
        assert subscribers() == 1  # the room's hub in this process
        await asyncio.gather(*(ws.close() for ws in members))

    try:
        asyncio.run(scenario())
        wait_until(lambda: subscribers() == 0, what="the room's subscription to end")
        wait_until(  # (departures wait for REDIS_CONNECTIONS in turn)
            lambda: all(
                room["name"] != "exodus"
                for room in get_json(server.url + "/chat/rooms.json")["rooms"]
            ),
            what="the lobby to forget the room",
        )
    finally:
        server.stop()
    assert "Traceback" not in server.text and "MaxConnections" not in server.text


# --- Embedded: in a host project, under a prefix, and from a program ---


def test_import_chat_configures_nothing():
    code = "import chat; from django.conf import settings; print(settings.configured)"
    assert run_python("-c", code, check=True).stdout.strip() == "False"


def readme_block(first_line: str) -> str:
    """The README's Python block that starts with this comment line, as written."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    return next(block for block in blocks if block.startswith(first_line + "\n"))


HOST_SETTINGS = """\
# What a project like the Channels tutorial's has before the chat comes.
SECRET_KEY = "the host's own key"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["daphne", "django.contrib.staticfiles", "channels", "myapp"]
ROOT_URLCONF = "mysite.urls"
ASGI_APPLICATION = "mysite.asgi.application"
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates"}]
HOST_MARK = "the host's settings rule"
"""

HOST_APP = {
    "myapp/__init__.py": "",
    "myapp/urls.py": """\
from django.conf import settings
from django.http import HttpResponse
from django.urls import path

def home(request):
    return HttpResponse(f"{settings.HOST_MARK} ({settings.ROOT_URLCONF})")

urlpatterns = [path("home/", home)]
""",
    "myapp/routing.py": """\
from channels.generic.websocket import WebsocketConsumer
from django.urls import path

class Echo(WebsocketConsumer):
    def receive(self, text_data=None, bytes_data=None):
        self.send(text_data="echo: " + text_data)

websocket_urlpatterns = [path("ws/echo/", Echo.as_asgi())]
""",
}


def host_project(folder: Path, prefix: str = "", extra_settings: str = "") -> Path:
    """A project made of the README's snippets, as written, around its own app,
    with chat.py beside manage.py."""
    under = ", the chat under /demo/" if prefix else ""
    files = {
        **HOST_APP,
        "manage.py": "import os, sys\n"
        'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n'
        "from django.core.management import execute_from_command_line\n"
        "execute_from_command_line(sys.argv)\n",
        "mysite/__init__.py": "",
        "mysite/settings.py": HOST_SETTINGS
        + readme_block("# mysite/settings.py: add")
        + extra_settings,
        "mysite/urls.py": readme_block("# mysite/urls.py" + under),
        "mysite/asgi.py": readme_block("# mysite/asgi.py" + under),
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    shutil.copy(HERE / "chat.py", folder / "chat.py")
    return folder


def manage(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        check=False,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )


def serve_host(folder: Path, how: str) -> tuple[Process, str]:
    """The host project served by `manage.py runserver` (Daphne's) or `daphne`."""
    port = free_port()
    args = {
        "runserver": [sys.executable, "manage.py", "runserver", "--noreload"],
        "daphne": [shutil.which("daphne") or "daphne", "-b", "127.0.0.1", "-p"],
    }[how]
    if how == "runserver":
        args.append(f"127.0.0.1:{port}")
    else:
        args += [str(port), "mysite.asgi:application"]
    server = Process(args, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: port_answers(port), what=f"{how} on port {port}")
    return server, url


@pytest.mark.parametrize("layer", ["memory", "redis"])
@pytest.mark.parametrize("how", ["runserver", "daphne"])
def test_the_chat_inside_a_host_project_from_the_readme(tmp_path, how, layer, request):
    extra = ""
    if layer == "redis":
        extra = f"CHAT_REDIS_URL = {request.getfixturevalue('redis_server')!r}\n"
    folder = host_project(tmp_path, extra_settings=extra)
    settings = folder / "mysite/settings.py"
    with_chat = settings.read_text()
    assert 'INSTALLED_APPS += ["chat"]' in with_chat  # (as the README has it)
    for text in (with_chat + 'INSTALLED_APPS.remove("chat")\n', with_chat):
        settings.write_text(text)
        checked = manage(folder, "check")
        assert checked.returncode == 0, checked.stderr

    server, url = serve_host(folder, how)
    try:
        with urllib.request.urlopen(url + "/home/", timeout=TIMEOUT) as home:
            assert home.read().decode() == "the host's settings rule (mysite.urls)"
        for path in ("/chat/", "/chat/hosted/", "/chat/rooms.json"):
            assert http_status(url + path) == 200, path
        assert get_json(url + "/healthz")["layer"] == layer
        with open_socket(url, "hosted", name="ana") as ana:
            assert next_frame(ana, "welcome")["user"] == "ana"
            post(ana, "hello, host")
            assert next_frame(ana)["message"] == "hello, host"
            wait_until(  # (on Redis the lobby's list is a few seconds old at most)
                lambda: (
                    {"name": "hosted", "count": 1}
                    in get_json(url + "/chat/rooms.json")["rooms"]
                ),
                what="the room in the lobby's list",
            )
        with connect(url.replace("http", "ws") + "/ws/echo/", origin=url) as echo:
            echo.send("hi")
            assert echo.recv(timeout=TIMEOUT) == "echo: hi"
        with pytest.raises(InvalidStatus):  # the host's ALLOWED_HOSTS rule
            open_socket(url, "hosted", origin="http://evil.example")
    finally:
        server.stop()
    assert "Traceback" not in server.text, server.text


def test_the_chat_under_a_prefix_in_the_browser(tmp_path, browser):
    folder = host_project(tmp_path, prefix="demo/")
    server, url = serve_host(folder, "daphne")
    try:
        assert http_status(url + "/chat/") == 404  # only under the prefix
        browser.get(url + "/demo/chat/")
        room_input = browser.find_element(By.ID, "room-name-input")
        room_input.send_keys("prefixed", Keys.ENTER)
        wait_in_browser(
            browser, lambda d: d.current_url == url + "/demo/chat/prefixed/"
        )
        wait_in_browser(browser, lambda d: text_of(d, "status").startswith("connected"))
        say(browser, "under the prefix")
        wait_in_browser(
            browser,
            lambda d: "under the prefix" in text_of(d, "chat-log"),
            what="message",
        )
        link = browser.find_element(By.LINK_TEXT, "all rooms").get_attribute("href")
        assert link == url + "/demo/chat/"
        socket_url = url.replace("http", "ws") + "/demo/ws/chat/prefixed/"
        with connect(socket_url, origin=url) as stays:  # so the lobby lists the room
            next_frame(stays, "welcome")
            browser.get(url + "/demo/chat/")
            wait_in_browser(
                browser,
                lambda d: (
                    d.find_element(By.LINK_TEXT, "prefixed").get_attribute("href")
                    == url + "/demo/chat/prefixed/"
                ),
                what="the lobby's link under the prefix",
            )
    finally:
        server.stop()
    assert "Traceback" not in server.text, server.text


def test_start_gives_fresh_servers_that_stop_with_1001(tmp_path):
    async def inside_a_running_loop():  # as in a notebook
        return chat.start("--quiet")

    servers = [chat.start(), chat.start("--rate-limit", "0")]
    servers.append(asyncio.run(inside_a_running_loop()))
    try:
        assert len({server.url for server in servers}) == 3
        for server in servers:
            assert get_json(server.url + "/healthz")["pid"] == server.process.pid
            with open_socket(server.url, "started") as ws:
                next_frame(ws, "welcome")
                assert server.stop() == 0
                with pytest.raises(ConnectionClosed) as closed:
                    next_frame(ws)
            assert closed.value.rcvd.code == 1001
            assert not port_answers(int(server.url.rsplit(":", 1)[1]))
    finally:
        for server in servers:
            server.stop()
    with chat.start() as server:
        assert http_status(server.url + "/chat/") == 200
    assert not port_answers(int(server.url.rsplit(":", 1)[1]))
    with pytest.raises(RuntimeError, match="--nope"):
        chat.start("--nope")


def test_main_refuses_a_second_run_and_a_running_loop_in_one_line():
    code = "import chat; chat.main(['--port', '0']); chat.main(['--port', '0'])"
    twice = Process([sys.executable, "-c", code])
    twice.wait_for_line("chat.py: room for")
    twice.proc.send_signal(signal.SIGTERM)
    assert twice.proc.wait(TIMEOUT) == 1
    assert twice.text.count("chat.py: open") == 1
    assert twice.text.strip().endswith("use chat.start()"), twice.text

    code = (
        "import asyncio, signal, chat\n"
        "before = signal.getsignal(signal.SIGINT)\n"
        "async def notebook():\n"
        "    chat.main(['--port', '0'])\n"
        "try:\n"
        "    asyncio.run(notebook())\n"
        "except SystemExit as stop:\n"
        "    print('exit', stop.code, signal.getsignal(signal.SIGINT) is before)\n"
    )
    done = run_python("-c", code)
    assert done.stdout == "exit 1 True\n" and "chat.py: open" not in done.stdout
    assert done.stderr.count("\n") == 1 and "use chat.start()" in done.stderr


# === Build it live: the README's steps, each run as written ===


def readme_steps() -> dict[int, str]:
    """The code of each step of the README's "Build it live", as written there."""
    section = README.split("\n## Build it live\n", 1)[1].split("\n## ", 1)[0]
    steps = {}
    for part in section.split("\n### Step ")[1:]:
        number = int(part.split(":", 1)[0])
        steps[number] = part.split("```python\n", 1)[1].split("\n```", 1)[0] + "\n"
    return steps


STEPS = readme_steps()


class StepServer(Process):
    """`python stepN.py PORT`, in a folder of its own, as a workshop runs it."""

    def __init__(self, number: int, env: dict | None = None):
        folder = Path(tempfile.mkdtemp(prefix=f"chat-step{number}-"))
        (folder / f"step{number}.py").write_text(STEPS[number])
        self.port = free_port()
        argv = [sys.executable, f"step{number}.py", str(self.port)]
        super().__init__(argv, env=env, cwd=folder, group=True)
        self.url = f"http://127.0.0.1:{self.port}"
        up = lambda: port_answers(self.port) and http_status(self.url + "/chat/") == 200
        wait_until(up, what=f"step {number} on port {self.port}")

    def websocket(self, room: str):
        return open_socket(self.url, room)


def test_build_it_live_has_six_whole_steps_short_enough_to_type():
    assert sorted(STEPS) == [1, 2, 3, 4, 5, 6]
    for number, code in STEPS.items():
        compile(code, f"step{number}.py", "exec")  # (whole files, not fragments)
        assert len(code.splitlines()) <= 120, number
    assert len(STEPS[1].splitlines()) <= 75
    for number in range(1, 6):
        assert 'if __name__ == "__main__":' in STEPS[number]


def test_step_1_serves_the_lobby_and_a_room_page():
    step = StepServer(1)
    try:
        lobby = urllib.request.urlopen(step.url + "/chat/", timeout=TIMEOUT).read()
        room = urllib.request.urlopen(step.url + "/chat/lobby/", timeout=TIMEOUT).read()
        assert b'id="room-name-input"' in lobby and b'id="room-name-submit"' in lobby
        assert b'id="chat-log"' in room and b'id="chat-message-input"' in room
        assert (
            b'<script id="room-name" type="application/json">"lobby"</script>' in room
        )
    finally:
        step.stop()


def test_step_2_echoes_a_frame():
    step = StepServer(2)
    try:
        with step.websocket("echo") as ws:
            ws.send(json.dumps({"message": "hello"}))
            assert json.loads(ws.recv(timeout=TIMEOUT)) == {"message": "hello"}
    finally:
        step.stop()


def chat_in_rooms(one: StepServer, other: StepServer) -> None:
    """Two members of a room (one on each server) both get its message; a member
    of another room gets only its own."""
    room = f"room{secrets.token_hex(3)}"
    with (
        one.websocket(room) as ana,
        other.websocket(room) as bob,
        one.websocket(room + "x") as cy,
    ):
        wait_until(lambda: post_and_hear(ana, bob, "hello"), what="the room's group")
        cy.send(json.dumps({"message": "world"}))
        assert json.loads(cy.recv(timeout=TIMEOUT)) == {"message": "world"}


def post_and_hear(sender, listener, text: str) -> bool:
    """Post; True once both hear it (a member joins its group as it connects)."""
    sender.send(json.dumps({"message": text}))
    assert json.loads(sender.recv(timeout=TIMEOUT)) == {"message": text}
    with contextlib.suppress(TimeoutError):
        while json.loads(listener.recv(timeout=0.5)) != {"message": text}:
            pass
        return True
    return False


@pytest.mark.parametrize("number", [3, 4])
def test_steps_3_and_4_keep_rooms_apart(number):
    step = StepServer(number)
    try:
        chat_in_rooms(step, step)
    finally:
        step.stop()


def test_step_5_shares_rooms_between_two_processes_through_redis():
    redis_server = RedisServer()
    env = {"REDIS_URL": redis_server.url}
    steps = []
    try:
        steps = [StepServer(5, env=env), StepServer(5, env=env)]
        chat_in_rooms(*steps)
    finally:
        for step in steps:
            step.stop()
        redis_server.stop()


@pytest.mark.parametrize("number", [3, 4, 5])
def test_the_tutorials_browser_tests_pass_against_steps_3_to_5(number, chrome_driver):
    """Step 6 of the README, run against each step in the suite's browser."""
    path = Path(tempfile.mkdtemp(prefix="chat-step6-")) / "test_step.py"
    path.write_text(STEPS[6])
    spec = importlib.util.spec_from_file_location("test_step", path)
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    redis_server = RedisServer() if number == 5 else None
    step = StepServer(
        number, env={"REDIS_URL": redis_server.url} if redis_server else {}
    )
    try:

        class AgainstStep(tests.ChatTests):
            live_server_url = step.url

            @classmethod
            def setUpClass(cls):
                cls.driver = chrome_driver  # (the suite's, not a browser of its own)

            @classmethod
            def tearDownClass(cls):
                pass

        suite = unittest.defaultTestLoader.loadTestsFromTestCase(AgainstStep)
        result = unittest.TextTestRunner(stream=io.StringIO()).run(suite)
        assert result.testsRun == 2 and result.wasSuccessful(), result.failures
    finally:
        step.stop()
        if redis_server:
            redis_server.stop()


def test_the_map_at_the_top_names_every_banner_in_order():
    """chat.py is read aloud: its docstring's map has a line for each banner section,
    in the order they come, so that a reader can jump to one."""
    source = (HERE / "chat.py").read_text()
    banners = re.findall(r"^# (.+?) #{3,}$", source, flags=re.MULTILINE)
    docstring = source.split('"""')[1]
    the_map = docstring.split("The map:", 1)[1].split("\n\n", 1)[1]
    named = [re.split(r"\s{2,}", line.strip())[0] for line in the_map.splitlines()]
    assert len(banners) >= 10
    assert named == banners


# === Browser tests: the Channels tutorial's own, as it wrote them ===


@pytest.fixture(scope="class")
def tutorial_test_case(request, live_server, chrome_driver):
    """What ChannelsLiveServerTestCase gave the tutorial's tests."""
    request.cls.live_server_url = live_server.url
    request.cls.driver = chrome_driver


@pytest.mark.usefixtures("tutorial_test_case")
class ChatTests(unittest.TestCase):
    def test_when_chat_message_posted_then_seen_by_everyone_in_same_room(self):
        try:
            self._enter_chat_room("room_1")

            self._open_new_window()
            self._enter_chat_room("room_1")

            self._switch_to_window(0)
            self._post_message("hello")
            WebDriverWait(self.driver, 2).until(
                lambda _: "hello" in self._chat_log_value,
                "Message was not received by window 1 from window 1",
            )
            self._switch_to_window(1)
            WebDriverWait(self.driver, 2).until(
                lambda _: "hello" in self._chat_log_value,
                "Message was not received by window 2 from window 1",
            )
        finally:
            self._close_all_new_windows()

    def test_when_chat_message_posted_then_not_seen_by_anyone_in_different_room(self):
        try:
            self._enter_chat_room("room_1")

            self._open_new_window()
            self._enter_chat_room("room_2")

            self._switch_to_window(0)
            self._post_message("hello")
            WebDriverWait(self.driver, 2).until(
                lambda _: "hello" in self._chat_log_value,
                "Message was not received by window 1 from window 1",
            )

            self._switch_to_window(1)
            self._post_message("world")
            WebDriverWait(self.driver, 2).until(
                lambda _: "world" in self._chat_log_value,
                "Message was not received by window 2 from window 2",
            )
            self.assertTrue(
                "hello" not in self._chat_log_value,
                "Message was improperly received by window 2 from window 1",
            )
        finally:
            self._close_all_new_windows()

    # === Utility ===

    def _enter_chat_room(self, room_name):
        self.driver.get(self.live_server_url + "/chat/")
        ActionChains(self.driver).send_keys(room_name, Keys.ENTER).perform()
        WebDriverWait(self.driver, 2).until(
            lambda _: room_name in self.driver.current_url
        )

    def _open_new_window(self):
        self.driver.execute_script('window.open("about:blank", "_blank");')
        self._switch_to_window(-1)

    def _close_all_new_windows(self):
        while len(self.driver.window_handles) > 1:
            self._switch_to_window(-1)
            self.driver.execute_script("window.close();")
        if len(self.driver.window_handles) == 1:
            self._switch_to_window(0)

    def _switch_to_window(self, window_index):
        self.driver.switch_to.window(self.driver.window_handles[window_index])

    def _post_message(self, message):
        ActionChains(self.driver).send_keys(message, Keys.ENTER).perform()

    @property
    def _chat_log_value(self):
        return self.driver.find_element(
            by=By.CSS_SELECTOR, value="#chat-log"
        ).get_property("value")


def test_chat_room_e2e(live_server, chrome_driver):
    driver = chrome_driver

    # Open the room form
    driver.get(f"{live_server.url}/chat/")

    # Type a room name and enter it
    ActionChains(driver).send_keys("room_pytest", Keys.ENTER).perform()
    WebDriverWait(driver, 3).until(lambda d: "room_pytest" in d.current_url)

    # Send a message with Enter
    ActionChains(driver).send_keys("hello from pytest", Keys.ENTER).perform()

    # The message shows up in the log
    def _has_message(d):
        val = d.find_element(By.CSS_SELECTOR, "#chat-log").get_property("value")
        return "hello from pytest" in val

    WebDriverWait(driver, 3).until(_has_message)


def test_unicode_room_in_the_browser(live_server, chrome_driver):
    driver = chrome_driver
    driver.get(f"{live_server.url}/chat/")
    ActionChains(driver).send_keys("кафе-1", Keys.ENTER).perform()
    WebDriverWait(driver, 3).until(lambda d: quote("кафе-1") in d.current_url)
    WebDriverWait(driver, 3).until(
        lambda d: d.find_element(By.ID, "status").text.startswith("connected")
    )
    ActionChains(driver).send_keys("привет", Keys.ENTER).perform()
    WebDriverWait(driver, 3).until(
        lambda d: "привет" in d.find_element(By.ID, "chat-log").get_property("value")
    )


# --- Browser tests of the features beyond the tutorial ---


def enter_room(driver, base_url: str, room: str, name: str = "") -> None:
    """Through the lobby, as a person would: a name (optional), a room, Enter."""
    driver.get(base_url + "/chat/")
    name_input = driver.find_element(By.ID, "name-input")
    name_input.clear()
    name_input.send_keys(name)
    driver.find_element(By.ID, "room-name-input").send_keys(room, Keys.ENTER)
    wait_in_browser(driver, lambda d: text_of(d, "status").startswith("connected"))


def wait_in_browser(driver, condition, timeout: float = TIMEOUT, what: str = ""):
    return WebDriverWait(driver, timeout).until(condition, what)


def text_of(driver, element_id: str) -> str:
    element = driver.find_element(By.ID, element_id)
    return element.get_property("value") if element_id == "chat-log" else element.text


def say(driver, text: str) -> None:
    driver.find_element(By.ID, "chat-message-input").send_keys(text, Keys.ENTER)


@pytest.fixture
def browser(chrome_driver):
    """The shared browser, left with one window and a desktop size afterwards."""
    yield chrome_driver
    while len(chrome_driver.window_handles) > 1:
        chrome_driver.switch_to.window(chrome_driver.window_handles[-1])
        chrome_driver.close()
    chrome_driver.switch_to.window(chrome_driver.window_handles[0])
    chrome_driver.set_window_size(1200, 900)
    chrome_driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def new_window(driver) -> None:
    driver.switch_to.new_window("window")


def test_room_shows_names_members_status_and_local_time(live_server, browser):
    enter_room(browser, live_server.url, "names-room", name="ana")
    assert text_of(browser, "status").startswith("connected as ana")
    ana_window = browser.current_window_handle
    new_window(browser)
    bob_window = browser.current_window_handle
    enter_room(browser, live_server.url, "names-room", name="bob")
    wait_in_browser(
        browser, lambda d: {"ana", "bob"} <= set(text_of(d, "members").split())
    )
    say(browser, "hi all")

    browser.switch_to.window(ana_window)
    wait_in_browser(browser, lambda d: "→ bob joined" in text_of(d, "chat-log"))
    log = wait_in_browser(
        browser,
        lambda d: "bob: hi all" in text_of(d, "chat-log") and text_of(d, "chat-log"),
    )
    assert re.search(r"^\d\d:\d\d bob: hi all$", log, re.MULTILINE), log
    assert "bob" in text_of(browser, "members")
    announced = browser.find_element(By.ID, "announcer").get_property("textContent")
    said = [line for line in log.splitlines() if ": " in line]
    assert announced == said[-1], "screen readers hear each new message"

    name_input = browser.find_element(By.ID, "name-input")
    name_input.clear()
    name_input.send_keys("anna", Keys.TAB)  # a change of name, without a reload
    wait_in_browser(
        browser, lambda d: text_of(d, "status").startswith("connected as anna")
    )
    browser.switch_to.window(bob_window)
    wait_in_browser(browser, lambda d: "anna" in text_of(d, "members").split())
    assert "ana is now anna" in text_of(browser, "chat-log")
    assert "ana" not in text_of(browser, "members").split()  # the old name went

    browser.switch_to.window(ana_window)
    browser.find_element(By.LINK_TEXT, "all rooms").click()  # anna leaves the room
    browser.switch_to.window(bob_window)
    wait_in_browser(browser, lambda d: text_of(d, "members").split() == ["bob"])
    assert text_of(browser, "member-count") == "1 online:"
    browser.switch_to.window(ana_window)
    browser.back()  # ...and comes back (the page may come from the browser's cache)
    wait_in_browser(browser, lambda d: text_of(d, "status").startswith("connected"))
    browser.switch_to.window(bob_window)
    wait_in_browser(browser, lambda d: "anna" in text_of(d, "members").split())


def test_typing_shows_in_the_room_but_not_in_the_transcript(live_server, browser):
    enter_room(browser, live_server.url, "typing-room", name="writer")
    writer = browser.current_window_handle
    new_window(browser)
    enter_room(browser, live_server.url, "typing-room", name="reader")
    reader = browser.current_window_handle
    browser.switch_to.window(writer)
    browser.find_element(By.ID, "chat-message-input").send_keys("still writi")
    browser.switch_to.window(reader)
    wait_in_browser(browser, lambda d: "writer is typing" in text_of(d, "typing"))
    assert "typing" not in text_of(browser, "chat-log")


def test_page_reconnects_after_a_restart_and_sends_what_was_typed_offline(browser):
    port = free_port()
    server = ChatServer(port=port)
    try:
        enter_room(browser, server.url, "restarts", name="ana")
        say(browser, "before the restart")
        wait_in_browser(
            browser, lambda d: "ana: before the restart" in text_of(d, "chat-log")
        )
        server.stop()
        wait_in_browser(browser, lambda d: "offline" in text_of(d, "status"))
        say(browser, "typed while offline")
        wait_in_browser(browser, lambda d: "1 waiting" in text_of(d, "status"))
        server = ChatServer(port=port)
        wait_in_browser(
            browser,
            lambda d: "ana: typed while offline" in text_of(d, "chat-log"),
            timeout=30,
            what="the page did not come back",
        )
        say(browser, "after the restart")
        wait_in_browser(
            browser, lambda d: "ana: after the restart" in text_of(d, "chat-log")
        )
        log = text_of(browser, "chat-log")
        assert log.count("typed while offline") == 1, log
        assert log.count("before the restart") == 1, log
        assert text_of(browser, "status") == "connected as ana"
    finally:
        server.stop()


def test_lobby_lists_active_rooms_without_a_reload(live_server, browser):
    browser.get(live_server.url + "/chat/")
    lobby = browser.current_window_handle
    new_window(browser)
    enter_room(browser, live_server.url, "lobby-live", name="visitor")
    browser.switch_to.window(lobby)
    wait_in_browser(
        browser,
        lambda d: "lobby-live — 1 online" in text_of(d, "rooms"),
        timeout=5,
        what="the lobby did not show the new room within 5 s",
    )


def test_a_window_through_another_loopback_address_chats(browser):
    server = ChatServer("--host", "0.0.0.0")
    try:
        second = server.url.replace("127.0.0.1", "127.0.0.2")
        enter_room(browser, server.url, "workshop", name="teacher")
        teacher = browser.current_window_handle
        new_window(browser)
        enter_room(browser, second, "workshop", name="student")
        say(browser, "hello from 127.0.0.2")
        browser.switch_to.window(teacher)
        wait_in_browser(
            browser, lambda d: "student: hello from 127.0.0.2" in text_of(d, "chat-log")
        )
    finally:
        server.stop()


def test_room_fits_a_phone_with_the_input_visible(live_server, browser):
    browser.set_window_size(390, 844)
    enter_room(browser, live_server.url, "phone", name="pocket")
    for n in range(40):  # a long transcript must not push the input away
        say(browser, f"line {n}")
    wait_in_browser(browser, lambda d: "pocket: line 39" in text_of(d, "chat-log"))
    fits = browser.execute_script(
        """const box = document.querySelector('#chat-message-input').getBoundingClientRect();
           return [box.top >= 0 && box.bottom <= window.innerHeight,
                   document.documentElement.scrollWidth <= window.innerWidth];"""
    )
    assert fits == [True, True], "the input is off screen, or the page scrolls sideways"


def test_page_resumes_exactly_once_after_its_process_restarts_on_redis(
    redis_server, browser
):
    port = free_port()
    home, other = ChatServer("--redis", redis_server, port=port), None
    try:
        other = ChatServer("--redis", redis_server)
        enter_room(browser, home.url, "resume-redis", name="ana")
        say(browser, "before")
        wait_in_browser(browser, lambda d: "ana: before" in text_of(d, "chat-log"))
        home.stop()
        wait_in_browser(browser, lambda d: "offline" in text_of(d, "status"))
        with other.websocket("resume-redis", name="bob") as bob:
            for text in ("while away 1", "while away 2"):
                post(bob, text)
            frames_until(bob, lambda f: f.get("message") == "while away 2")
        home = ChatServer("--redis", redis_server, port=port)
        wait_in_browser(
            browser,
            lambda d: "bob: while away 2" in text_of(d, "chat-log"),
            timeout=30,
            what="the page did not resume",
        )
        log = text_of(browser, "chat-log")
        lines = [line.split(" ", 1)[1] for line in log.splitlines() if ": " in line]
        assert lines == ["ana: before", "bob: while away 1", "bob: while away 2"], log
    finally:
        home.stop()
        if other:
            other.stop()


def test_page_resumes_when_it_notices_a_gap_in_ids(live_server, browser):
    enter_room(browser, live_server.url, "gaps")  # a guest, who keeps its name
    guest = text_of(browser, "status").removeprefix("connected as ")
    browser.execute_script(  # the page misses the next message, as if it were lost
        """const show = handlers.message;
           handlers.message = function () { handlers.message = show; };"""
    )
    with live_server.websocket("gaps", name="bob") as bob:
        post(bob, "lost in transit")
        post(bob, "the next one")
        wait_in_browser(
            browser, lambda d: "bob: the next one" in text_of(d, "chat-log")
        )
    log = text_of(browser, "chat-log")
    lines = [line.split(" ", 1)[1] for line in log.splitlines() if ": " in line]
    assert lines == ["bob: lost in transit", "bob: the next one"], log
    assert text_of(browser, "status") == f"connected as {guest}"


def test_everything_typed_is_shown_as_text(live_server, browser):
    trap = "<img src=x onerror=alert(1)>"  # an alert would fail the test
    enter_room(browser, live_server.url, "escape", name=trap)
    say(browser, trap)
    wait_in_browser(browser, lambda d: f"{trap}: {trap}" in text_of(d, "chat-log"))
    assert trap in text_of(browser, "members")
    assert not browser.find_elements(By.CSS_SELECTOR, "img")


# --- The page as a person sees it: styles, the transcript, scrolling, the lobby ---

# Reads in the page: WCAG contrast of what is drawn, against the background under it.
CONTRAST = """
const rgb = (text) => text.match(/[\\d.]+/g).map(Number);
function luminance(colour) {
  const [r, g, b] = colour.slice(0, 3).map(function (c) {
    c /= 255;
    return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}
function contrast(a, b) {
  const [light, dark] = [luminance(rgb(a)), luminance(rgb(b))].sort((x, y) => y - x);
  return (light + 0.05) / (dark + 0.05);
}
function backgroundOf(element) {
  for (let e = element; e; e = e.parentElement) {
    const colour = getComputedStyle(e).backgroundColor;
    if ((rgb(colour)[3] ?? 1) > 0) return colour;
  }
  return null;  // the page paints nothing: the browser's default shows
}
"""

# Everything drawn with too little contrast: text (4.5:1, large text 3:1), placeholders
# (4.5:1) and the borders of text boxes (3:1).
POOR_CONTRAST = (
    CONTRAST
    + """
const poor = [];
for (const element of document.querySelectorAll('body *')) {
  const box = element.getBoundingClientRect(), style = getComputedStyle(element);
  if (box.width <= 1 || box.height <= 1 || style.visibility === 'hidden') continue;
  const background = backgroundOf(element);
  if (!background) { poor.push('no background under ' + element.tagName); continue; }
  const large = parseFloat(style.fontSize) >= 24 ||
    (parseFloat(style.fontSize) >= 18.66 && Number(style.fontWeight) >= 700);
  const texts = [...element.childNodes].some((n) => n.nodeType === 3 && n.data.trim());
  const value = element.matches('input[type=button]') ? element.value : '';
  if ((texts || value) && contrast(style.color, background) < (large ? 3 : 4.5))
    poor.push(element.tagName + '#' + element.id + '.' + element.className + ' text ' +
              contrast(style.color, background).toFixed(2));
  if (element.matches('input[type=text], textarea')) {
    const hint = getComputedStyle(element, '::placeholder').color;
    if (element.placeholder && contrast(hint, background) < 4.5)
      poor.push('placeholder of #' + element.id + ' ' + contrast(hint, background).toFixed(2));
    const around = backgroundOf(element.parentElement);
    if (contrast(style.borderTopColor, around) < 3)
      poor.push('border of #' + element.id + ' ' + contrast(style.borderTopColor, around).toFixed(2));
  }
}
return poor;
"""
)


def dark_mode(driver, on: bool = True) -> None:
    feature = {"name": "prefers-color-scheme", "value": "dark" if on else "light"}
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [feature]})


def style_of(driver, selector: str, prop: str, pseudo: str | None = None) -> str:
    return driver.execute_script(
        "return getComputedStyle(document.querySelector(arguments[0]), arguments[2])"
        ".getPropertyValue(arguments[1])",
        selector,
        prop,
        pseudo,
    )


def test_pages_apply_their_css_in_light_and_dark(live_server, browser):
    enter_room(browser, live_server.url, "styled", name="ana")
    assert "system-ui" in style_of(browser, "body", "font-family")
    assert style_of(browser, "body", "font-size") == "18px"  # large type
    assert style_of(browser, "#members li", "content", "::before") == '"● "'
    for on in (False, True):
        dark_mode(browser, on)
        painted = style_of(browser, "html", "background-color")
        assert painted == ("rgb(20, 22, 27)" if on else "rgb(255, 255, 255)")


def test_pages_log_no_errors_in_the_console(live_server, browser):
    browser.get_log("browser")  # (what earlier tests left)
    for path in ("/chat/", "/chat/console/"):
        browser.get(live_server.url + path)
        wait_in_browser(
            browser,
            lambda d: d.execute_script("return document.readyState === 'complete'"),
        )
    enter_room(browser, live_server.url, "console")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], "console errors: CSP, favicon …"


def test_transcript_tells_authors_own_lines_notices_and_mentions_apart(
    live_server, browser
):
    enter_room(browser, live_server.url, "transcript", name="ana")
    with live_server.websocket("transcript", name="bob") as bob:
        wait_in_browser(browser, lambda d: "→ bob joined" in text_of(d, "chat-log"))
        post(bob, "first")
        post(bob, "second, a minute later at most")
        post(bob, "@ana look")
        say(browser, "mine")
        wait_in_browser(browser, lambda d: "ana: mine" in text_of(d, "chat-log"))
    wait_in_browser(browser, lambda d: "← bob left" in text_of(d, "chat-log"))
    messages = browser.find_elements(By.CSS_SELECTOR, "#chat-log .message")
    first, second, mention, mine = messages
    author = first.find_element(By.CSS_SELECTOR, ".author")
    assert (
        author.text == "bob" and int(author.value_of_css_property("font-weight")) >= 700
    )
    heading = second.find_element(By.CSS_SELECTOR, ".meta").size
    assert heading["width"] <= 1, "a second message within minutes joins the first"
    plain = first.value_of_css_property("background-color")
    assert mine.value_of_css_property("background-color") != plain
    assert mention.value_of_css_property("background-color") not in (
        plain,
        mine.value_of_css_property("background-color"),
    )
    notice = browser.find_element(By.CSS_SELECTOR, "#chat-log .notice")
    text = first.find_element(By.CSS_SELECTOR, ".text")
    assert notice.value_of_css_property("color") != text.value_of_css_property("color")
    assert float(notice.value_of_css_property("font-size")[:-2]) < float(
        text.value_of_css_property("font-size")[:-2]
    )
    days = browser.find_elements(By.CSS_SELECTOR, "#chat-log .day")
    assert len(days) == 1 and days[0].location["y"] < first.location["y"]


def test_a_new_day_gets_a_line_with_its_date(live_server, browser):
    enter_room(browser, live_server.url, "days", name="ana")
    browser.execute_script(  # two messages a day apart, as a long-lived page sees them
        """const day = 24 * 3600 * 1000, last = lastId;
           handlers.message({type: 'message', id: last + 1, epoch: epoch, user: 'bob',
                             message: 'yesterday', ts: new Date(Date.now() - day).toISOString()});
           handlers.message({type: 'message', id: last + 2, epoch: epoch, user: 'bob',
                             message: 'today', ts: new Date().toISOString()});"""
    )
    days = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#chat-log .day")]
    assert len(days) == 2 and days[0] != days[1], days
    lines = [
        line.split(" ", 1)[1] for line in text_of(browser, "chat-log").splitlines()
    ]
    assert lines == ["bob: yesterday", "bob: today"], "date lines are not events"


def test_name_colours_read_well_in_light_and_dark(live_server, browser):
    enter_room(browser, live_server.url, "colours", name="reader")
    names = [f"name{n}" for n in range(24)] + ["ana", "Зоя", "東京", "بشير"]
    for name in names:
        with live_server.websocket("colours", name=name) as member:
            post(member, "hi")  # (read the history, or the close waits behind it)
            frames_until(member, lambda f, name=name: f.get("user") == name)
    wait_in_browser(browser, lambda d: "بشير: hi" in text_of(d, "chat-log"))
    for on in (False, True):
        dark_mode(browser, on)
        ratios = browser.execute_script(
            CONTRAST
            + """return [...document.querySelectorAll('#chat-log .author')].map((a) =>
                 contrast(getComputedStyle(a).color, backgroundOf(a)));"""
        )
        assert len(ratios) == len(names) and min(ratios) >= 4.5, (on, ratios)
        colours = browser.execute_script(
            """return new Set([...document.querySelectorAll('#chat-log .author')]
                 .map((a) => getComputedStyle(a).color)).size"""
        )
        assert colours >= 6, "names should not all look alike"


def test_links_are_links_and_nothing_else_is(live_server, browser):
    enter_room(browser, live_server.url, "links", name="ana")
    say(
        browser,
        "see https://example.org/Ada_(language). or http://example.com/x?y=1, "
        "not javascript:alert(1) nor <a href=https://evil.example>this</a>",
    )
    wait_in_browser(browser, lambda d: "ana: see" in text_of(d, "chat-log"))
    links = browser.find_elements(By.CSS_SELECTOR, "#chat-log .text a")
    assert [link.get_attribute("href") for link in links] == [
        "https://example.org/Ada_(language)",
        "http://example.com/x?y=1",
        "https://evil.example/",  # as text of the message, made a link: not markup
    ]
    assert links[2].text == "https://evil.example"
    for link in links:
        assert link.get_attribute("target") == "_blank"
        assert link.get_attribute("rel") == "noopener noreferrer nofollow"
    text = browser.find_element(By.CSS_SELECTOR, "#chat-log .message .text").text
    assert "javascript:alert(1)" in text and "<a href=" in text


def test_right_to_left_names_and_text_keep_their_order(live_server, browser):
    enter_room(browser, live_server.url, "rtl", name="ana")
    with live_server.websocket("rtl", name="بشير") as member:
        wait_in_browser(browser, lambda d: "→ بشير joined" in text_of(d, "chat-log"))
        post(member, "مرحبا بالجميع")
        wait_in_browser(browser, lambda d: "مرحبا" in text_of(d, "chat-log"))
    wait_in_browser(browser, lambda d: "← بشير left" in text_of(d, "chat-log"))
    text = browser.find_element(By.CSS_SELECTOR, "#chat-log .message .text")
    assert text.value_of_css_property("direction") == "rtl"
    order = browser.execute_script(
        """const line = [...document.querySelectorAll('#chat-log .notice')].pop();
           const name = line.querySelector('bdi').getBoundingClientRect();
           const range = document.createRange();
           range.selectNodeContents(line.lastChild);  // " left"
           return [name.right <= range.getBoundingClientRect().left,
                   getComputedStyle(line.querySelector('bdi')).unicodeBidi];"""
    )
    assert order == [True, "isolate"], "the name, then ' left', left to right"


def test_shift_enter_breaks_the_line_and_enter_sends(live_server, browser):
    enter_room(browser, live_server.url, "lines", name="ana")
    box = browser.find_element(By.ID, "chat-message-input")
    one_line = box.size["height"]
    box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert box.get_property("value") == "first line\nsecond line"
    assert box.size["height"] > one_line, "the box grows with its lines"
    box.send_keys(Keys.ENTER)
    wait_in_browser(browser, lambda d: "second line" in text_of(d, "chat-log"))
    assert "ana: first line\nsecond line\n" in text_of(browser, "chat-log")
    shown = browser.find_element(By.CSS_SELECTOR, "#chat-log .message .text")
    assert shown.text == "first line\nsecond line" and shown.size["height"] > 40
    assert box.get_property("value") == "" and box.size["height"] == one_line


def test_enter_while_an_input_method_composes_sends_nothing(live_server, browser):
    enter_room(browser, live_server.url, "ime", name="ana")
    browser.find_element(By.ID, "chat-message-input").click()
    browser.execute_cdp_cmd(
        "Input.imeSetComposition",
        {"text": "にほん", "selectionStart": 3, "selectionEnd": 3},
    )
    for kind in ("rawKeyDown", "keyUp"):  # Enter confirms the word...
        browser.execute_cdp_cmd(
            "Input.dispatchKeyEvent",
            {
                "type": kind,
                "key": "Enter",
                "code": "Enter",
                "windowsVirtualKeyCode": 13,
            },
        )
    browser.execute_cdp_cmd("Input.insertText", {"text": "日本"})
    say(browser, "語")  # ...and the next Enter sends
    wait_in_browser(browser, lambda d: "ana: 日本語" in text_of(d, "chat-log"))
    assert text_of(browser, "chat-log").count("ana:") == 1


def test_reading_older_lines_is_not_interrupted(live_server, browser):
    enter_room(browser, live_server.url, "scrolling", name="ana")
    with live_server.websocket("scrolling", name="bob") as bob:
        for n in range(40):
            post(bob, f"line {n}")
        wait_in_browser(browser, lambda d: "bob: line 39" in text_of(d, "chat-log"))
        at_bottom = "const l = document.querySelector('#chat-log'); return l.scrollHeight - l.scrollTop - l.clientHeight < 2"
        assert browser.execute_script(at_bottom), (
            "new lines keep a reader at the bottom"
        )
        browser.execute_script("document.querySelector('#chat-log').scrollTop = 100")
        post(bob, "while you read")
        wait_in_browser(browser, lambda d: "while you read" in text_of(d, "chat-log"))
        button = browser.find_element(By.ID, "new-messages")
        wait_in_browser(browser, lambda d: button.is_displayed())
        assert (
            browser.execute_script(
                "return document.querySelector('#chat-log').scrollTop"
            )
            == 100
        )
        assert button.text == "1 new message ↓"
        post(bob, "and another")
        wait_in_browser(browser, lambda d: button.text == "2 new messages ↓")
        frames_until(bob, lambda f: f.get("message") == "and another")  # (read all)
        button.click()
        assert browser.execute_script(at_bottom) and not button.is_displayed()


def test_a_hidden_tab_counts_what_arrived_in_its_title(live_server, browser):
    enter_room(browser, live_server.url, "unread", name="ana")
    assert browser.title == "unread · chat"
    browser.minimize_window()
    wait_in_browser(browser, lambda d: d.execute_script("return document.hidden"))
    with live_server.websocket("unread", name="bob") as bob:
        for text in ("one", "two", "three"):
            post(bob, text)
        wait_in_browser(browser, lambda d: "bob: three" in text_of(d, "chat-log"))
    assert browser.title == "(3) unread · chat"
    browser.maximize_window()
    wait_in_browser(browser, lambda d: d.title == "unread · chat")


# How often the page's live regions (what a screen reader speaks) change.
COUNT_SPOKEN = """
window.spoken = [];
const live = '[aria-live]:not([aria-live=off]), [role=status], [role=alert], [role=log]:not([aria-live=off])';
new MutationObserver(function (changes) {
  for (const change of changes) {
    const region = (change.target.nodeType === 1 ? change.target : change.target.parentElement).closest(live);
    if (region) spoken.push(region.id + ': ' + region.textContent);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@contextlib.contextmanager
def script_on_every_page(driver, source: str):
    added = driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": source}
    )
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", added)


def test_history_is_not_read_out_but_new_messages_are(live_server, browser):
    with live_server.websocket("spoken", name="bob") as bob:
        for n in range(40):
            post(bob, f"earlier {n}")
        frames_until(bob, lambda f: f.get("message") == "earlier 39")
        with script_on_every_page(browser, COUNT_SPOKEN):
            enter_room(browser, live_server.url, "spoken", name="ana")
        # History came before "connected": the page has shown all it will.
        assert "earlier 39" in text_of(browser, "chat-log")
        spoken = browser.execute_script("return spoken")
        assert len(spoken) <= 2 and not any("earlier" in s for s in spoken), spoken
        post(bob, "now")
        wait_in_browser(
            browser,
            lambda d: any("bob: now" in s for s in d.execute_script("return spoken")),
        )


def test_lobby_updates_rooms_in_place_keeping_focus(live_server, browser):
    with live_server.websocket("focus-a", name="a1"):
        browser.get(live_server.url + "/chat/")
        wait_in_browser(browser, lambda d: "focus-a — 1 online" in text_of(d, "rooms"))
        link = browser.find_element(By.LINK_TEXT, "focus-a")
        browser.execute_script("arguments[0].focus()", link)
        with (
            live_server.websocket("focus-b", name="b1"),
            live_server.websocket("focus-b", name="b2"),
        ):  # a busier room now comes first
            wait_in_browser(
                browser,
                lambda d: re.search(
                    "focus-b — 2.*focus-a", text_of(d, "rooms"), re.DOTALL
                ),
            )
            focused = browser.switch_to.active_element
            assert focused == link and focused.text == "focus-a"


def test_a_bad_room_name_is_explained_beside_the_box(live_server, browser):
    browser.get(live_server.url + "/chat/")
    box = browser.find_element(By.ID, "room-name-input")
    box.send_keys("my room!", Keys.ENTER)
    error = browser.find_element(By.ID, "room-name-error")
    wait_in_browser(browser, lambda d: error.is_displayed())
    assert "letters, digits" in error.text
    assert browser.current_url == live_server.url + "/chat/"
    assert box.get_attribute("aria-invalid") == "true"
    assert browser.switch_to.active_element == box
    assert box.get_attribute("aria-describedby") == "room-name-error"
    box.send_keys(Keys.BACKSPACE)
    assert not error.is_displayed()


def test_no_such_room_offers_the_way_back(live_server, browser):
    browser.get(live_server.url + "/chat/my%20room!/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "No such room"
    browser.find_element(By.LINK_TEXT, "Back to the lobby").click()
    wait_in_browser(browser, lambda d: d.current_url == live_server.url + "/chat/")
    assert browser.switch_to.active_element.get_attribute("id") == "room-name-input"


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_everything_drawn_has_enough_contrast(live_server, browser, dark):
    dark_mode(browser, dark)
    browser.get(live_server.url + "/chat/")
    box = browser.find_element(By.ID, "room-name-input")
    box.send_keys("bad name!", Keys.ENTER)  # the error line shows too
    assert browser.execute_script(POOR_CONTRAST) == []
    enter_room(browser, live_server.url, "contrast", name="ana")
    with live_server.websocket("contrast", name="bob") as bob:
        post(bob, "@ana see https://example.org")
        say(browser, "mine")
        wait_in_browser(browser, lambda d: "ana: mine" in text_of(d, "chat-log"))
        bob.send("not json")
        next_frame(bob, "error")
    browser.execute_script("document.querySelector('#new-messages').hidden = false")
    browser.execute_script(
        "document.querySelector('#new-messages').textContent = '1 new'"
    )
    assert browser.execute_script(POOR_CONTRAST) == []
    browser.get(live_server.url + "/chat/no%20such/")
    assert browser.execute_script(POOR_CONTRAST) == []


def test_keyboard_focus_is_visible(live_server, browser):
    enter_room(browser, live_server.url, "keyboard", name="ana")
    ActionChains(browser).send_keys(Keys.TAB).perform()  # from the message box
    focused = browser.switch_to.active_element
    assert focused.get_attribute("id") == "chat-message-submit"
    assert focused.value_of_css_property("outline-style") == "solid"
    assert float(focused.value_of_css_property("outline-width")[:-2]) >= 2


def test_pages_speak_russian_to_a_russian_browser(live_server, browser):
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders",
        {"headers": {"Accept-Language": "ru-RU,ru;q=0.9,en;q=0.5"}},
    )
    try:
        browser.get(live_server.url + "/chat/")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Комнаты чата"
        assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "ru"
        browser.find_element(By.ID, "name-input").clear()
        browser.find_element(By.ID, "name-input").send_keys("Зоя")
        browser.find_element(By.ID, "room-name-input").send_keys(
            "по-русски", Keys.ENTER
        )
        wait_in_browser(browser, lambda d: text_of(d, "status") == "вы в чате как Зоя")
        with live_server.websocket("по-русски", name="Ива") as member:
            wait_in_browser(browser, lambda d: "→ Ива: вход" in text_of(d, "chat-log"))
            wait_in_browser(
                browser, lambda d: text_of(d, "member-count") == "в сети: 2"
            )
            assert next_frame(member, "welcome")["message"].startswith("Welcome")
        box = browser.find_element(By.ID, "chat-message-input")
        assert box.get_attribute("placeholder").startswith("Сообщение")
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
        browser.execute_cdp_cmd("Network.disable", {})


# --- Workshop join: the address to open, and its QR code ---

# segno's compact terminal code: each character is two modules, top and bottom;
# the block's ink is the light part of the code.
HALF_BLOCKS = {"█": (1, 1), "▀": (1, 0), "▄": (0, 1), " ": (0, 0)}


def qr_of_terminal(text: str) -> str:
    """What the QR code printed in a terminal says."""
    rows = [
        line for line in text.splitlines() if line and set(line) <= set(HALF_BLOCKS)
    ]
    assert rows, f"no QR code in:\n{text}"
    image = Image.new("L", (len(rows[0]), 2 * len(rows)))
    for y, row in enumerate(rows):
        for x, ch in enumerate(row):
            top, bottom = HALF_BLOCKS[ch]
            image.putpixel((x, 2 * y), 255 * top)
            image.putpixel((x, 2 * y + 1), 255 * bottom)
    return qr_of_image(image.resize((image.width * 8, image.height * 8), Image.NEAREST))


def qr_of_image(image) -> str:
    found = zxingcpp.read_barcodes(image)
    assert len(found) == 1, f"{len(found)} codes found"
    return found[0].text


def test_workshop_mode_shows_the_address_to_open_with_a_qr_code(browser):
    server = ChatServer("--host", "0.0.0.0")
    try:
        address = server.urls[0] + "/chat/"  # the first one printed
        server.wait_for_line("chat.py: people in the room can scan this")
        wait_until(lambda: "▀" in server.text.rsplit("scan this", 1)[1], what="QR")
        assert qr_of_terminal(server.text.rsplit("scan this", 1)[1]) == address
        browser.get(server.url + "/chat/")  # the teacher's own screen, on loopback
        shown = browser.find_element(By.ID, "join-url")
        assert shown.text == address
        assert float(shown.value_of_css_property("font-size")[:-2]) >= 24  # large
        code = browser.find_element(By.CSS_SELECTOR, "#join svg")
        assert code.size["width"] >= 150
        assert qr_of_image(Image.open(io.BytesIO(code.screenshot_as_png))) == address
        dark_mode(browser)  # the code stays dark on light, as scanners expect
        assert qr_of_image(Image.open(io.BytesIO(code.screenshot_as_png))) == address
    finally:
        server.stop()


def test_no_qr_code_without_workshop_mode(live_server, browser):
    browser.get(live_server.url + "/chat/")
    assert not browser.find_elements(By.ID, "join")
    assert "scan this" not in live_server.text


def test_screenshot_of_two_windows_chatting(live_server, browser, tmp_path):
    """The README's picture: two windows side by side. Refresh it with
    `CHAT_SCREENSHOT=.github/screenshot.png python -m pytest -k screenshot`."""
    windows = []
    for name in ("ana", "bob"):
        if windows:
            new_window(browser)
        browser.set_window_size(560, 720)
        enter_room(browser, live_server.url, "workshop", name=name)
        windows.append(browser.current_window_handle)
    wait_in_browser(browser, lambda d: text_of(d, "member-count") == "2 online:")
    for window, line in [
        (0, "Hi! Can everyone read this?"),
        (1, "Loud and clear."),
        (1, "The slides: https://example.org/slides"),
        (0, "@bob thanks!"),
    ]:
        browser.switch_to.window(windows[window])
        say(browser, line)
        wait_in_browser(browser, lambda d, line=line: line in text_of(d, "chat-log"))
    shots = []
    for handle in windows:
        browser.switch_to.window(handle)
        wait_in_browser(browser, lambda d: "@bob thanks!" in text_of(d, "chat-log"))
        wait_in_browser(browser, lambda d: not text_of(d, "typing"))  # (it fades)
        shots.append(browser.get_screenshot_as_base64())
    # Composed on a blank page: the room's Content-Security-Policy forbids data: URLs.
    new_window(browser)
    side_by_side = browser.execute_async_script(SIDE_BY_SIDE, *shots)
    png = base64.b64decode(side_by_side.split(",", 1)[1])
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    Path(os.environ.get("CHAT_SCREENSHOT") or tmp_path / "two.png").write_bytes(png)


def test_screenshot_of_a_phone_in_dark_mode(live_server, browser, tmp_path):
    """The README's second picture. Refresh it with
    `CHAT_PHONE_SCREENSHOT=.github/phone-dark.png python -m pytest -k screenshot`."""
    browser.set_window_size(390, 780)
    dark_mode(browser)
    enter_room(browser, live_server.url, "phone-dark", name="Зоя")
    with live_server.websocket("phone-dark", name="بشير") as other:
        wait_in_browser(browser, lambda d: "بشير" in text_of(d, "members"))
        post(other, "مرحبا! Hello from a phone")
        post(other, "@Зоя the room list: https://example.org/rooms")
        say(browser, "Привет! Dark mode, large type.")
        wait_in_browser(browser, lambda d: "Привет" in text_of(d, "chat-log"))
    png = browser.get_screenshot_as_png()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    Path(os.environ.get("CHAT_PHONE_SCREENSHOT") or tmp_path / "phone.png").write_bytes(
        png
    )


SIDE_BY_SIDE = """
const [left, right, done] = arguments;
const load = (b64) => new Promise((ok) => {
  const image = new Image();
  image.onload = () => ok(image);
  image.src = 'data:image/png;base64,' + b64;
});
Promise.all([load(left), load(right)]).then(([a, b]) => {
  const gap = 16, canvas = document.createElement('canvas');
  canvas.width = a.width + gap + b.width;
  canvas.height = Math.max(a.height, b.height);
  const context = canvas.getContext('2d');
  context.fillStyle = '#8a8f99';
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.drawImage(a, 0, 0);
  context.drawImage(b, a.width + gap, 0);
  done(canvas.toDataURL('image/png'));
});
"""
