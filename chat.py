# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "Django>=4.2,<6.1",
#     "channels>=4.2,<5",
#     "daphne>=4.2.2,<5",
#     "channels-redis>=4.2,<5",
#     "segno>=1.5,<2",
# ]
# ///
"""chat.py — a real-time chat in one file: Django + Channels + Daphne.

    pip install -r requirements.txt && python chat.py      # then open the URL it prints
    pip install -r requirements.txt pytest pytest-asyncio selenium websockets pillow zxing-cpp && python -m pytest

A lobby at /chat/, rooms at /chat/<room>/, each room's WebSocket at /ws/chat/<room>/.
It needs no database and no Redis: rooms live in Channels' in-memory layer. Give it a Redis
URL (--redis URL or REDIS_URL) and any number of chat.py processes share the same rooms.
`daphne chat:application` serves it too. Inside a Django project, `import chat`
configures nothing: `include("chat")` and `chat.websocket_urlpatterns` mount it there
(README, "Embed it"), and `chat.start()` runs one beside a program.

The map: one line for each banner below, in order.

    Imports
    Configuration                              the limits, a constant each
    Configuration: Django's settings, in code  settings.configure, the channel layer
    What this process holds                    the module's state, a line each
    The consumer                               connect, disconnect, receive, handlers
    The consumer: its frames and limits        what it sends; what it accepts
    How a message crosses: one hub per room    group_send, RoomHub, in id order
    How a message crosses: presence news       joins and leaves, a frame for many
    Routing and application                    websocket_urlpatterns, Host, application
    HTTP views                                 lobby, room, rooms.json; urlpatterns
    Where rooms live                           rooms(), room names and nicknames
    Where rooms live: in memory                history, members, budget: this process
    Where rooms live: Redis's scripts          the same in Lua, a round trip each
    Where rooms live: in Redis                 RedisRooms: every process shares them
    The pages: what they say                   WORDS, in English and Russian
    The pages: how they look                   STYLE: one stylesheet, every page
    The pages: templates                       base, lobby, 404 and a room
    The pages: a room's script                 the room's page at work
    Serving: Daphne                            serve(), signals, stopping, slow readers
    Serving: the door                          what a connection may make it read
    Serving: workers, and from a program       --workers N, chat.start()
    Command line                               the flags, the banner, main()
"""


# Imports #####################################################################

import argparse
import asyncio
import contextlib
import functools
import hashlib
import importlib.util
import ipaddress
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

# chat.py speaks http:// and ws:// (TLS belongs to a proxy in front, see the README).
# Twisted and autobahn load pyOpenSSL whenever it is installed, 5 MiB and 30 ms a
# process; without it they run as they are designed to, minus TLS.
if __name__ == "__main__":
    sys.modules.setdefault("OpenSSL", None)

import django
from autobahn.exception import Disconnected
from channels.consumer import get_handler_name
from channels.exceptions import ChannelFull, StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer, get_channel_layer
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import HttpResponse, JsonResponse
from django.template import Context, Engine
from django.urls import path, re_path, reverse
from django.utils import autoreload
from django.utils.cache import patch_vary_headers
from django.views.decorators.gzip import gzip_page
from django.views.decorators.http import require_safe
from django.views.generic import RedirectView
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

# Configuration ###############################################################

MAX_MESSAGE = 2000  #: characters per chat message...
MAX_MESSAGE_BYTES = 4000  #: ...and bytes of UTF-8 (2,000 emoji would be 8,000)
MAX_LINES = 20  #: lines per message (Shift+Enter), so that one cannot fill the screen
MAX_NAME = 32  #: characters per nickname
MAX_ROOM_NAME = 100  #: characters per room name
MAX_LISTED = 100  #: names in a member list (the count is always exact)
MAX_MARKS = 2  #: combining marks on one character of a name ("Zalgo" stacks dozens)
HISTORY_SIZE = 100  #: messages kept per room for late joiners and reconnects
#: Bytes all rooms together may keep (messages, members, bookkeeping, as UTF-8 text,
#: in memory or in Redis). Past it, the least recently used rooms without members
#: are forgotten: a flood of rooms levels off, and rooms with members keep theirs.
ROOMS_BUDGET = 32 * 1024 * 1024
ROOM_BYTES = 1024  #: what a room's bookkeeping counts for...
ENTRY_BYTES = 64  #: ...and that of each message and member, besides its text
ROOM_IDLE = 6 * 3600  #: seconds after which an unused room's history is forgotten
PRESENCE_DELAY = 0.25  #: seconds joins and leaves are gathered into one frame...
PRESENCE_RATE = 400  #: ...or longer in a big room: presence frames a second it may cost
TYPING_INTERVAL = 2  #: seconds between "is typing" frames of one member
RENAME_INTERVAL = 5  #: seconds between renames of one member (each goes to everyone)
MEMBER_TTL = 20  #: seconds a member of a vanished process stays listed (Redis)
LOBBY_SIZE = 50  #: rooms listed in the lobby
LOBBY_REFRESH = 3  #: seconds between the lobby's updates
CHANNEL_CAPACITY = 20_000  #: messages waiting for a room's hub before the layer drops
#: Seconds a message may wait in the channel layer. Channels' default, 60 s, lost the tail
#: of a 500,000-delivery burst (and the in-memory layer then drops the hub's groups).
LAYER_EXPIRY = 300
RATE_LIMIT = 5  #: frames a second per connection and per address (--rate-limit)
MAX_PER_ADDRESS = 64  #: WebSockets open from one client address (--max-per-address);
#: TCP connections from one address (pages, fetches, sockets): twice as many
MAX_FRAME = 64 * 1024  #: bytes per WebSocket frame; bigger ones close the socket (1009)
MAX_BODY = 1024  #: bytes of an HTTP request's body (the pages send none): else 413
MAX_HEAD = 16 * 1024  #: bytes of a request's line and headers (Twisted's limit)
PING_INTERVAL = 10  #: seconds between pings to each browser...
PING_TIMEOUT = 10  #: ...and how long a pong may take before the connection is dropped
SLOW_READER_GRACE = 5  #: seconds a browser may leave its send buffer full...
CATCH_UP_TIME = 30  #: ...then it is closed, and has this long to read what was queued
CLOSE_TOO_SLOW = 4008  #: the close code for a reader too far behind
CLOSE_UNAVAILABLE = 4503  #: the close code when Redis fails ("try again", as HTTP 503)
CLOSE_TOO_MANY = 4429  #: the close code past MAX_PER_ADDRESS (as HTTP 429)
CLOSE_REFUSED = 4500  #: the close code when Redis refuses a call (as HTTP 500)
SHUTDOWN_GRACE = 3  #: seconds members get to close their sockets when the server stops

#: How chat.py talks to Redis: a dead server is noticed by health checks and keepalive.
REDIS_OPTIONS = {
    "socket_connect_timeout": 5,
    "socket_keepalive": True,
    "health_check_interval": 10,
    # The channel layer's publishes in flight each take a connection: redis-py 8's
    # default of 100 fails the 101st (MaxConnectionsError) when a crowd posts at once.
    "max_connections": 5000,
}
#: Connections to Redis for the rooms, per process: a crowd leaving at once waits
#: for them in turn, instead of opening one each (a TCP handshake and a HELLO).
REDIS_CONNECTIONS = 32


# Configuration: Django's settings, in code ###################################


def knob(name: str, default):
    """One of chat's own settings: CHAT_<name> where the settings give one (a host
    project may), else chat's default."""
    return getattr(settings, f"CHAT_{name}", default)


def has_a_host() -> bool:
    """Is chat inside a Django project? Then its settings rule: they are configured
    already, or DJANGO_SETTINGS_MODULE names a module that can be imported."""
    module = os.environ.get("DJANGO_SETTINGS_MODULE")
    if settings.configured or not module:
        return settings.configured
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def configure_alone() -> None:
    """Chat on its own (python chat.py, daphne chat:application): Django configured
    in code, with no database. `import chat` alone configures nothing."""
    settings.configure(
        DEBUG=False,
        # A fresh key per start is fine: nothing signed outlives the process.
        SECRET_KEY=os.environ.get("CHAT_SECRET_KEY") or secrets.token_urlsafe(50),
        # HostCheck (below) checks the Host of HTTP and WebSocket requests alike, and
        # knows that every loopback address is this machine's: it replaces Django's check.
        ALLOWED_HOSTS=["*"],
        CHAT_HOSTS=own_host_names(),
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[
            "django.middleware.security.SecurityMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.clickjacking.XFrameOptionsMiddleware",
        ],
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates"}],
    )
    use_redis(os.environ.get("REDIS_URL") or None)
    django.setup()
    # On its own, the site's root leads to the lobby (a host keeps its own root).
    root = RedirectView.as_view(
        pattern_name="chat-lobby", http_method_names=["get", "head"]
    )
    urlpatterns.insert(0, path("", root))


def own_host_names() -> list[str]:
    """The names and addresses a browser may use for this machine (see HostCheck)."""
    hostname = socket.gethostname().lower()
    return ["localhost", hostname, f"{hostname}.local", *machine_addresses()]


def machine_addresses() -> list[str]:
    """The IPv4 addresses other machines may reach this one at: those its host name
    resolves to, and the one its default route uses (connecting a UDP socket sends
    nothing; it only picks the route)."""
    found = {"127.0.0.1"}
    with contextlib.suppress(OSError):
        hostname = socket.gethostname()
        found |= {i[4][0] for i in socket.getaddrinfo(hostname, None, socket.AF_INET)}
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
    ):
        s.connect(("192.0.2.1", 9))  # a documentation address (RFC 5737)
        found.add(s.getsockname()[0])
    return sorted(found, key=lambda address: (address.startswith("127."), address))


def use_redis(redis_url: str | None) -> None:
    """Choose the channel layer and where rooms live: Redis with a URL, else memory."""
    settings.CHAT_REDIS_URL = redis_url
    settings.CHANNEL_LAYERS = channel_layers(redis_url)
    if redis_url:
        watch_redis()


def channel_layers(redis_url: str | None) -> dict:
    """Channels' in-process layer by default (RoomLayer, below, a small subclass);
    channels-redis when given a Redis URL."""
    if not redis_url:
        backend = {"BACKEND": f"{__name__}.RoomLayer"}
        backend["CONFIG"] = {"capacity": CHANNEL_CAPACITY, "expiry": LAYER_EXPIRY}
    else:
        # Pub/sub: one PUBLISH per message, pushed to each process's room hub (below),
        # which takes from the history whatever pub/sub dropped. Half the CPU and
        # latency of RedisChannelLayer's per-channel queues, measured (README).
        backend = {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer"}
        host = {"address": redis_url}
        if sentinel := sentinel_of(redis_url):
            sentinels, master, db = sentinel
            host = {"sentinels": sentinels, "master_name": master, "db": db}
        backend["CONFIG"] = {"hosts": [{**host, **REDIS_OPTIONS}]}
    return {"default": backend}


def sentinel_of(redis_url: str) -> tuple[list[tuple[str, int]], str, int] | None:
    """A Redis that Sentinel keeps: redis+sentinel://HOST:PORT,HOST:PORT/MASTER/DB
    names its sentinels, the master's name and the database (redis-py has no such
    URL). None for any other URL."""
    parts = urlsplit(redis_url)
    if parts.scheme != "redis+sentinel":
        return None
    sentinels = []
    for address in parts.netloc.split(","):
        host, _, port = address.rpartition(":")  # (port 26379 unless given)
        sentinels.append((host.strip("[]"), int(port)) if host else (address, 26379))
    master, _, db = parts.path.strip("/").partition("/")
    return sentinels, master, int(db or 0)


def watch_redis() -> None:
    """Rooms live in Redis: its outages are noticed as soon as the channel layer's
    receiver notices them (notice_outage)."""
    logging.getLogger("channels_redis.pubsub").addFilter(notice_outage)


def store_errors() -> tuple[type[Exception], ...]:
    """What a failing store raises: OSError, and redis-py's errors where it is loaded
    (an in-memory chat never loads it, and saves 60 ms and 7 MB)."""
    redis = sys.modules.get("redis")
    return (redis.RedisError, OSError) if redis else (OSError,)


def outages() -> tuple[type[Exception], ...]:
    """Those of the store's errors that mean it cannot be reached."""
    redis = sys.modules.get("redis")
    return (redis.ConnectionError, redis.TimeoutError, OSError) if redis else (OSError,)


def notice_outage(record: logging.LogRecord) -> bool:
    """channels-redis's pub/sub receiver logs a traceback a second while Redis is
    down. The first tells of the outage at once: the rooms close (4503, "try
    again") and their pages come back when Redis does. The tracebacks are left out."""
    if record.exc_info and isinstance(record.exc_info[1], outages()):
        close_rooms(record.exc_info[1])
        return False
    return True


# What this process holds #####################################################

# All else lives in the rooms' store (memory or Redis) or on a connection's consumer.

hubs: "dict[str, RoomHub]" = {}  # room -> its one receiver of events here
open_sockets: "set[ChatConsumer]" = set()  # every member here (shutdown says goodbye)
pending_news: dict[str, dict[str, list[str]]] = {}  # room -> joins, leaves to tell
running_tasks: set[asyncio.Task] = set()  # spawn()'s (asyncio holds tasks weakly)
# Client addresses: one student's script may not take the sockets and the rate of
# a whole workshop. Reconnecting does not refill an address's rate.
sockets_per_address: Counter[str] = Counter()  # address -> its open WebSockets
address_rates: "dict[str, RateLimit]" = {}  # address -> the rate its sockets share
behind_since = weakref.WeakKeyDictionary()  # a slow reader -> when it fell behind
main_ran = False  # main() runs once per process (Twisted's reactor does)


# The consumer ################################################################


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """One member's WebSocket, as in the tutorial: connect, disconnect, receive (as
    receive_json), and a handler for each kind of frame.

    Where it departs from the tutorial: a member does not group_add its own
    channel. There, every consumer joins the room's group, so the channel layer
    carries each message once per member. Here the room's hub (How a message
    crosses, below) joins the group once per process and hands each message to the
    room's members in this process, in order; the layer carries it once per process."""

    room_name: str | None = None  # set once the handshake is accepted

    async def connect(self):
        room_name = self.scope["url_route"]["kwargs"].get("room_name", "")
        if not is_valid_room(room_name):
            log(f"refused {client_of(self.scope)}: no room at {self.scope['path']!r}")
            await self.close()  # before accept(): the handshake is refused (403)
            return
        self.address = (self.scope.get("client") or ["?"])[0]
        if not room_for_one_more(self.address):
            cap = knob("MAX_PER_ADDRESS", MAX_PER_ADDRESS)
            log(f"refused {client_of(self.scope)}: {cap} sockets from there already")
            await self.accept()  # (so that it can be told why; Daphne sends no reason)
            await self.send_json(error_frame(f"at most {cap} connections per address"))
            await self.close(CLOSE_TOO_MANY)
            return
        name, since, epoch = query_params(self.scope)
        self.room_name, self.room_group_name = room_name, group_name(room_name)
        sockets_per_address[self.address] += 1
        self.user = clean_name(name)
        self.member_id = secrets.token_hex(8)  # tells apart members of the same name
        self.last_typing = self.last_rename = 0.0
        self.rate_limit = RateLimit(knob("RATE_LIMIT", RATE_LIMIT))
        self.address_rate = rate_of_address(self.address)  # shared by its sockets
        self.backlog: list[dict] | None = []  # what arrives while history is replayed
        await self.accept()
        open_sockets.add(self)
        await enter_hub(self)
        arrival = await rooms().enter(
            self.room_name, since, epoch, self.member_id, self.user
        )
        self.user, presence = arrival.name, arrival.presence
        await self.send_history(arrival)
        last_id = self.next_id - 1
        welcome = welcome_frame(
            self.room_name, self.user, presence, self.epoch, last_id
        )
        await self.send_json(welcome)
        while self.backlog:
            await self.send_event(self.backlog.pop(0))
        self.backlog = None
        announce(self.room_name, "join", self.user)
        log(
            f"{self.user} joined {self.room_name!r} from {client_of(self.scope)}"
            f" ({presence.count} here)"
        )

    async def send_history(self, arrival: "Arrival") -> None:
        """Replay what the member missed, then expect the message after it."""
        self.epoch = arrival.epoch
        for event in arrival.missed:
            await self.send(text_data=event["text"])
        self.next_id = max([arrival.last_id] + [e["id"] for e in arrival.missed]) + 1

    async def disconnect(self, close_code):
        await self.leave_room(CLOSE_REASONS.get(close_code, f"code {close_code}"))

    async def leave_room(self, why: str) -> None:
        """Out of the room's hub, its member list and the open sockets: once."""
        if self.room_name:
            room, self.room_name = self.room_name, None
            log(f"{self.user} left {room!r}: {why}")
            open_sockets.discard(self)
            leave_address(self.address)
            leave_hub(room, self)
            await rooms().leave(room, self.member_id, self.user)
            announce(room, "leave", self.user)

    # Frames from the browser: anything malformed is answered, never relayed.
    async def receive(self, text_data=None, bytes_data=None):
        if not (self.rate_limit.allows() and self.address_rate.allows()):
            limit = knob("RATE_LIMIT", RATE_LIMIT)
            await self.send_json(error_frame(f"slow down: at most {limit:g} a second"))
            return
        if text_data is None:
            await self.send_json(
                error_frame("binary frames are not supported; send JSON text")
            )
            return
        try:
            content = await self.decode_json(text_data)
        except (ValueError, RecursionError):
            await self.send_json(error_frame("not valid JSON"))
            return
        await self.receive_json(content)

    async def receive_json(self, content):
        kind = content.get("type", "message") if isinstance(content, dict) else None
        handlers = {"message": self.post, "typing": self.typing, "rename": self.rename}
        try:
            if kind not in handlers:
                raise Refused('expected a JSON object like {"message": "hello"}')
            await handlers[kind](content)
        except Refused as why:
            await self.send_json(error_frame(str(why)))

    @classmethod
    async def encode_json(cls, content) -> str:
        return encode(content)

    async def post(self, content: dict) -> None:
        frame = await rooms().post(
            self.room_name, chat_frame(self.user, message_text(content))
        )
        await get_channel_layer().group_send(self.room_group_name, message_event(frame))

    async def typing(self, content: dict) -> None:
        if time.monotonic() - self.last_typing < TYPING_INTERVAL:
            return  # the page sends one every few seconds; more is noise
        self.last_typing = time.monotonic()
        event = frame_event(typing_frame(self.user), sender=self.member_id)
        await get_channel_layer().group_send(self.room_group_name, event)

    async def rename(self, content: dict) -> None:
        if not isinstance(content.get("name"), str):
            raise Refused('expected {"type": "rename", "name": "new name"}')
        if time.monotonic() - self.last_rename < RENAME_INTERVAL:
            raise Refused(f"one new name every {RENAME_INTERVAL} seconds")
        self.last_rename = time.monotonic()
        old, new = self.user, clean_name(content["name"])
        if new != old:
            self.user, presence = await rooms().rename(
                self.room_name, self.member_id, old, new
            )
        if self.user != old:  # (not when "ana (2)" asks to be "ana" again)
            event = frame_event(rename_frame(old, self.user, presence))
            await get_channel_layer().group_send(self.room_group_name, event)

    # Events from the room, handed over by its hub: each frame is encoded once, as "text".
    async def deliver(self, event: dict) -> None:
        if self.backlog is not None:
            self.backlog.append(event)  # after the history and the welcome
        else:
            await self.send_event(event)

    async def send_event(self, event: dict) -> None:
        if event["type"] == "chat.message":
            if event["epoch"] == self.epoch and event["id"] < self.next_id:
                return  # in the history this member was sent
            self.epoch, self.next_id = event["epoch"], event["id"] + 1
        elif event.get("sender") == self.member_id:
            return  # one's own typing
        await self.send(text_data=event["text"])

    # Under the methods above: Channels' plumbing, leaner for a chat.
    async def __call__(self, scope, receive, send):
        """The whole life of a connection. However it ends, the member leaves its
        room: also when the browser vanished while we were sending to it, or when
        Redis went away (then the close code says so, and the page comes back when
        Redis does) — with a line in the log, not a traceback."""
        # A member gets its room's events from the room's hub (below), so it needs
        # no channel of its own and only reads its socket: one plain loop. Channels'
        # own __call__ (await_many_dispatch) would keep a second task per connection
        # and start a new one for each frame: a sixth of a connection's memory.
        self.scope, self.base_send = scope, send  # as AsyncConsumer.__call__ does
        why = "connection lost"  # unless disconnect() learns the close code first
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass  # websocket_disconnect() ends the loop this way
        except Disconnected:
            pass  # the socket closed while a frame was on its way to it
        except outages() as error:
            print(f"chat.py: closing a socket, Redis failed: {error}", file=sys.stderr)
            why = CLOSE_REASONS[CLOSE_UNAVAILABLE]
            with contextlib.suppress(Exception):
                await self.close(code=CLOSE_UNAVAILABLE, reason="Redis is unavailable")
        except store_errors() as error:  # Redis refused one call: this member goes
            print(f"chat.py: closing a socket, Redis said: {error}", file=sys.stderr)
            why = "Redis refused a call"
            with contextlib.suppress(Exception):
                await self.close(code=CLOSE_REFUSED, reason="server error")
        finally:
            with contextlib.suppress(*store_errors()):
                await self.leave_room(why)

    async def dispatch(self, message):
        """Straight to the handler. (Channels 4.2+ first closes stale database
        connections, through a thread, before every handler: we have no database.)"""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)


# The consumer: its frames and limits #########################################


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def log(message: str) -> None:
    """One line in the server's log per arrival, departure or refusal (--quiet:
    none). Problems go to stderr whatever the flag."""
    if not knob("QUIET", False):
        print(f"chat.py: {time.strftime('%H:%M:%S')} {message}", flush=True)


def client_of(scope) -> str:
    host, port = scope.get("client") or ("?", 0)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


CLOSE_REASONS = {
    None: "closed",
    1000: "closed",
    1001: "going away",
    1005: "closed",
    1006: "connection lost",
    1009: "frame too big",
    CLOSE_TOO_SLOW: "too far behind",
    CLOSE_UNAVAILABLE: "Redis unavailable",
}


def chat_frame(user: str, text: str) -> dict:
    """A message as posted; the room's store adds its "id" and "epoch"."""
    return {"type": "message", "message": text, "user": user, "ts": now()}


def presence_frame(kind: str, names: list[str], presence: "Presence") -> dict:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    shown = ", ".join(names[:3]) + more
    return {
        "type": kind,
        "message": f"{shown} {'joined' if kind == 'join' else 'left'}",
        "user": names[0],
        "users": names[:MAX_LISTED],
        "count": presence.count,
    }


def welcome_frame(
    room: str, user: str, presence: "Presence", epoch: str, last_id: int
) -> dict:
    return {
        "type": "welcome",
        "message": f"Welcome to {room}, {user}! {presence.count} online.",
        "user": user,
        "count": presence.count,
        "members": presence.names,
        "epoch": epoch,
        "last_id": last_id,  # the newest message so far: a later gap means one was missed
    }


def rename_frame(old: str, new: str, presence: "Presence") -> dict:
    return {
        "type": "rename",
        "message": f"{old} is now {new}",
        "user": new,
        "old": old,
        "count": presence.count,
    }


def typing_frame(user: str) -> dict:
    return {"type": "typing", "message": f"{user} is typing…", "user": user}


def error_frame(why: str) -> dict:
    return {"type": "error", "message": why}


def encode(frame: dict) -> str:
    """JSON as UTF-8 text: "é" is 2 bytes on the wire, not the 6 of "\\u00e9"."""
    return json.dumps(frame, ensure_ascii=False)


def message_event(frame: dict) -> dict:
    """A message for the room's group, encoded once for all its members."""
    return history_event(frame["id"], frame["epoch"], encode(frame))


def frame_event(frame: dict, sender: str = "") -> dict:
    return {"type": "chat.frame", "text": encode(frame), "sender": sender}


class Refused(Exception):
    """A client frame the server will not act on; its text says why."""


def message_text(content: dict) -> str:
    """The text of a client's {"message": ...} frame, or Refused saying what is wrong."""
    text = content.get("message")
    if not isinstance(text, str):
        raise Refused('expected a JSON object like {"message": "hello"}')
    if not text.strip():
        raise Refused("empty message")
    if len(text) > MAX_MESSAGE:
        raise Refused(f"message longer than {MAX_MESSAGE} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text if ch != "\n"):
        raise Refused("message contains control characters")
    if text.count("\n") >= MAX_LINES:
        raise Refused(f"message longer than {MAX_LINES} lines")
    if len(text.encode()) > MAX_MESSAGE_BYTES:
        raise Refused(f"message longer than {MAX_MESSAGE_BYTES} bytes of UTF-8")
    return text


def query_params(scope) -> tuple[str, int, str]:
    """?name=, ?since= and ?epoch= of the WebSocket's URL."""
    query = parse_qs(scope["query_string"].decode("latin-1"))
    name, since, epoch = (query.get(key, [""])[0] for key in ("name", "since", "epoch"))
    # (int() refuses over 4,300 digits; no id of ours has 19.)
    is_id = since.isascii() and since.isdigit() and len(since) < 19
    return name, int(since) if is_id else 0, epoch


class RateLimit:
    """A token bucket: `rate` frames a second, in bursts of up to `rate` (0: no limit)."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.updated = rate, rate, time.monotonic()

    def is_full(self) -> bool:
        return time.monotonic() - self.updated >= 1  # (refilled within a second)

    def allows(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.rate and self.tokens < 1:
            return False
        self.tokens -= 1
        return True


# Per client address: how many sockets, and the rate they share (the counts are
# among what this process holds).
def room_for_one_more(address: str) -> bool:
    cap = knob("MAX_PER_ADDRESS", MAX_PER_ADDRESS)
    return not cap or sockets_per_address[address] < cap


def rate_of_address(address: str) -> RateLimit:
    rate = address_rates.get(address)
    if not rate:
        rate = address_rates[address] = RateLimit(knob("RATE_LIMIT", RATE_LIMIT))
    return rate


def leave_address(address: str) -> None:
    sockets_per_address[address] -= 1
    if not sockets_per_address[address]:
        del sockets_per_address[address]
        asyncio.get_running_loop().call_later(1, forget_address, address)


def forget_address(address: str) -> None:
    """An address without sockets whose rate is full again is as good as new."""
    rate = address_rates.get(address)
    if rate and address not in sockets_per_address:
        if rate.is_full():
            del address_rates[address]
        else:
            asyncio.get_running_loop().call_later(1, forget_address, address)


# How a message crosses: one hub per room #####################################
# post() above keeps a message in the room's history, which numbers it, then
# group_sends it. In each process, one hub per room receives it from the group and
# hands it to the room's members there, in id order.


class RoomLayer(InMemoryChannelLayer):
    """Channels' in-memory layer, handing a group's message to each of its channels
    in turn. (The original starts a task per channel and first sweeps every channel
    for expired messages: with one receiver per room, that was a fifth of the CPU of
    a burst, measured. receive() still sweeps them.)"""

    async def group_send(self, group: str, message: dict) -> None:
        self.require_valid_group_name(group)
        for channel in list(self.groups.get(group, ())):
            # As in the original, a channel that is full misses the message (a hub
            # then takes it from the history).
            with contextlib.suppress(ChannelFull):
                await self.send(channel, message)
        # As the original does too, the sender then lets the receivers run, so that
        # a burst is written out as it comes, not once every post is handled.
        await asyncio.sleep(0)


class RoomHub:
    """This process's one receiver for a room: it joins the room's group once and
    hands each event to the room's members here, in id order (as channels-redis's
    pub/sub layer does), so the layer carries a message once per process, not
    once per member.

    Messages can overtake each other when two processes post at once: the ones
    overtaken are then taken from the history, or, when the history no longer has
    them, awaited."""

    def __init__(self, room: str):
        self.room, self.members = room, set()
        self.channel: str | None = None
        self.task: asyncio.Future | None = None
        self.started = asyncio.ensure_future(self.start())

    async def start(self) -> None:
        layer = get_channel_layer()
        self.channel = await layer.new_channel()
        await layer.group_add(group_name(self.room), self.channel)
        self.epoch, last_id = await rooms().position(self.room)
        self.next_id, self.waiting = last_id + 1, {}
        self.task = asyncio.ensure_future(self.run(layer))

    async def run(self, layer) -> None:
        try:
            while True:
                event = await layer.receive(self.channel)
                for ready in await self.in_order(event):
                    for member in list(self.members):
                        with contextlib.suppress(Disconnected):
                            await member.deliver(ready)
        except store_errors() as error:
            await self.close_room(error)

    async def close_room(self, error: Exception) -> None:
        """Redis failed: the members are closed with a code that says "try again"."""
        print(
            f"chat.py: closing room {self.room}, Redis failed: {error}", file=sys.stderr
        )
        if hubs.get(self.room) is self:
            del hubs[self.room]
        for member in list(self.members):
            with contextlib.suppress(Exception):
                await member.close(code=CLOSE_UNAVAILABLE, reason="Redis failed")
        spawn(self.stop())

    async def catch_up(self, last_id: int) -> None:
        """Pub/sub drops what is published while a subscriber reconnects: a hub
        behind the room's last id hands itself that message, and in_order fetches
        the rest from the history."""
        if self.task and last_id >= self.next_id:
            for missed in await rooms().between(self.room, last_id, last_id):
                await get_channel_layer().send(self.channel, missed)

    async def in_order(self, event: dict) -> list[dict]:
        if event["type"] != "chat.message":
            return [event]
        if event["epoch"] != self.epoch:  # the room started over: follow it
            self.epoch, self.next_id, self.waiting = event["epoch"], event["id"], {}
        if event["id"] < self.next_id:
            return []  # already handed out
        if event["id"] > self.next_id and not self.waiting:
            for missed in await rooms().between(self.room, self.next_id, event["id"]):
                self.waiting[missed["id"]] = missed
        self.waiting[event["id"]] = event
        if self.next_id not in self.waiting and len(self.waiting) > HISTORY_SIZE:
            self.next_id = min(self.waiting)  # the layer lost it; pages will notice
        ready = []
        while self.next_id in self.waiting:
            ready.append(self.waiting.pop(self.next_id))
            self.next_id += 1
        return ready

    async def stop(self) -> None:
        self.started.cancel()  # (if its last member left before it had started)
        if self.task:
            self.task.cancel()
        if self.channel:
            with contextlib.suppress(*store_errors()):
                await get_channel_layer().group_discard(
                    group_name(self.room), self.channel
                )


async def enter_hub(member: ChatConsumer) -> None:
    """Hand the room's events to a member, starting the room's hub if need be."""
    hub = hubs.get(member.room_name) or hubs.setdefault(
        member.room_name, RoomHub(member.room_name)
    )
    hub.members.add(member)
    try:
        await hub.started
    except BaseException:
        hubs.pop(member.room_name, None)  # the next member tries afresh
        raise


def leave_hub(room: str, member: ChatConsumer) -> None:
    hub = hubs.get(room)
    if hub and member in hub.members:
        hub.members.discard(member)
        if not hub.members:
            del hubs[room]
            spawn(hub.stop())


def close_rooms(error: Exception) -> None:
    """Redis is gone: every room here closes (pub/sub alone would just wait)."""
    for hub in list(hubs.values()):
        spawn(hub.close_room(error))


# How a message crosses: presence news ########################################
# Joins and leaves of a room within PRESENCE_DELAY (longer in a big room) go out
# together, so 1,000 members arriving cost a few frames per member rather than 1,000.


def announce(room: str, kind: str, nickname: str) -> None:
    """Queue a "join" or "leave" of a room; it is sent with others after a moment.
    Someone who leaves and comes back within it (a page reconnecting) is not news."""
    if room not in pending_news:
        pending_news[room] = {"leave": [], "join": []}
        asyncio.get_running_loop().call_later(news_delay(room), send_news_soon, room)
    news = pending_news[room]
    opposite = news["leave" if kind == "join" else "join"]
    if nickname in opposite:
        opposite.remove(nickname)
    else:
        news[kind].append(nickname)


def news_delay(room: str) -> float:
    """Each piece of news goes to every member of the room here, so a big room gets
    it less often: presence costs at most PRESENCE_RATE frames a second, however
    many come and go (1,000 members: every 2.5 s)."""
    members_here = len(hubs[room].members) if room in hubs else 0
    return max(PRESENCE_DELAY, members_here / PRESENCE_RATE)


def send_news_soon(room: str) -> None:
    if room in pending_news:  # (at shutdown it may have gone out already)
        spawn(send_news(room, pending_news.pop(room)))


async def send_news(room: str, news: dict[str, list[str]]) -> None:
    try:
        presence = await rooms().presence(room)
        for kind, names in news.items():
            if names:
                event = frame_event(presence_frame(kind, names, presence))
                await get_channel_layer().group_send(group_name(room), event)
    except store_errors() as error:
        print(f"chat.py: presence news of {room} lost: {error}", file=sys.stderr)


def spawn(coroutine) -> None:
    """Run a coroutine on its own, keeping it referenced until it is done (asyncio
    keeps only weak references to tasks)."""
    task = asyncio.ensure_future(coroutine)
    running_tasks.add(task)
    task.add_done_callback(running_tasks.discard)


# Routing and application #####################################################

# What a host project's URLRouter mounts, at its root or under a prefix.
websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<room_name>[^/]+)/$", ChatConsumer.as_asgi()),
]


def netloc_of(url: str) -> str:
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return "?"


def is_own_host(host: str) -> bool:
    """Does a Host header name this machine? A page that a DNS trick points at us
    ("DNS rebinding") still names its own site, and is turned away."""
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:  # a broken IPv6 address, like "[::1"
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name in knob("HOSTS", ())
    return address.is_loopback or name in knob("HOSTS", ())


class HostCheck:
    """Serve only requests addressed to this machine, and WebSockets only from pages
    it served: their Origin must be the host the browser connected to, so another
    site's page cannot open a socket in a visitor's name."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        refusal = self.refusal(scope)
        if not refusal:
            return await self.app(scope, receive, send)
        log(f"refused {client_of(scope)}: {refusal}")
        if scope["type"] == "websocket":
            return await WebsocketDenier.as_asgi()(scope, receive, send)
        return await refuse_http(send, 400, b"Bad Request: unknown host\n")

    @staticmethod
    def refusal(scope) -> str | None:
        """Why a request is refused, or None. (A function of its own, so that the
        headers it reads are not kept as long as the connection lasts.)"""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").lower()
        origin = netloc_of(headers.get(b"origin", b"").decode("latin-1"))
        if scope["type"] == "websocket" and (origin != host or not is_own_host(host)):
            return f"Origin {origin!r} for Host {host!r}"
        if scope["type"] == "http" and not is_own_host(host):
            return f"unknown Host {host!r}"
        return None


async def refuse_http(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@functools.cache
def whole_chat() -> ProtocolTypeRouter:
    """`chat.application`: the pages and the sockets, for Daphne or any ASGI server.
    (Alone, any other socket path reaches the consumer without a room, and is
    refused there, with a line in the log.)"""
    if not has_a_host():
        configure_alone()
    sockets = [*websocket_urlpatterns, re_path(r"", ChatConsumer.as_asgi())]
    return ProtocolTypeRouter(
        {
            "http": HostCheck(get_asgi_application()),
            "websocket": HostCheck(URLRouter(sockets)),
        }
    )


def __getattr__(name: str):
    """`chat.application` is made when first asked for (`daphne chat:application`
    asks), so that `import chat`, in a host project, configures nothing."""
    if name == "application":
        return whole_chat()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# HTTP views ##################################################################


@require_safe
@gzip_page
def lobby(request):
    join = knob("JOIN_URL", None)  # (workshop mode)
    return page(
        request,
        "lobby.html",
        join_url=join,
        join_qr=join and qr_code(join).svg_inline(scale=6, omitsize=False),
        max_room=MAX_ROOM_NAME,
        max_name=MAX_NAME,
        lobby_refresh_ms=LOBBY_REFRESH * 1000,
    )


@require_safe
async def active_rooms(request):
    """The lobby's list: active rooms, busiest first, with their member counts."""
    try:
        active = sorted(await rooms().active(), key=lambda room: -room[1])
    except store_errors():
        return JsonResponse({"rooms": [], "error": "Redis is unavailable"}, status=503)
    rooms_json = [{"name": n, "count": c} for n, c in active[:LOBBY_SIZE]]
    return JsonResponse({"rooms": rooms_json})


@require_safe
@gzip_page
def room(request, room_name: str):
    if not is_valid_room(room_name):
        return no_such_page(request)
    return page(
        request,
        "room.html",
        room_name=room_name,
        max_message=MAX_MESSAGE,
        max_name=MAX_NAME,
        typing_interval_ms=TYPING_INTERVAL * 1000,
    )


@gzip_page
def no_such_page(request, exception=None):
    """A 404 that shows the way back to the lobby."""
    return page(request, "404.html", status=404)


@require_safe
async def healthz(request):
    """200 while the channel layer works, 503 when its Redis is unreachable."""
    reachable, redis_url = True, knob("REDIS_URL", None)
    if redis_url:
        try:
            reachable = await asyncio.wait_for(rooms().redis.ping(), timeout=2)
        except (asyncio.TimeoutError, *store_errors()):
            reachable = False
    body = {
        "status": "ok" if reachable else "unavailable",
        "layer": "redis" if redis_url else "memory",
        "pid": os.getpid(),
    }
    return JsonResponse(body, status=200 if reachable else 503)


# What include("chat") gives a host project, at its root or under a prefix.
urlpatterns = [
    path("chat/", lobby, name="chat-lobby"),
    path("chat/rooms.json", active_rooms, name="chat-rooms"),
    path("chat/<str:room_name>/", room, name="chat-room"),
    path("healthz", healthz, name="chat-healthz"),
]
handler404 = no_such_page  # (when chat is the site: a host project has its own)


def language_of(request) -> str:
    """The first language of the visitor's Accept-Language that the pages speak."""
    ranked = []
    for entry in request.headers.get("Accept-Language", "").split(","):
        tag, _, quality = entry.strip().partition(";q=")
        with contextlib.suppress(ValueError):
            ranked.append((-float(quality or 1), tag.split("-")[0].lower()))
    return next((tag for _, tag in sorted(ranked) if tag in WORDS), "en")


@functools.cache
def engine() -> Engine:
    """Chat's own template engine, whatever templates a host project has."""
    return Engine(loaders=[("django.template.loaders.locmem.Loader", PAGES)])


def page(request, name: str, status: int = 200, **context) -> HttpResponse:
    """A page of the chat in the visitor's language, with the prefix its links and
    sockets start with: "/", or where a host project mounted the chat ("/demo/")."""
    language, nonce = language_of(request), secrets.token_urlsafe(16)
    context |= {
        "language": language,
        "words": WORDS[language],
        "prefix": reverse("chat-lobby").removesuffix("chat/"),
        "style": STYLE,
        "favicon": FAVICON,
        "nonce": nonce,
    }
    response = HttpResponse(
        engine().get_template(name).render(Context(context)), status=status
    )
    response["Content-Language"] = language
    response["Content-Security-Policy"] = content_security_policy(request, nonce)
    patch_vary_headers(response, ["Accept-Language"])
    return response


def content_security_policy(request, nonce: str) -> str:
    """Only this response's own script and style run (an injected one would lack
    the nonce); the page talks to its own host only, and no site may frame it."""
    host = request.get_host()
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src 'nonce-{nonce}'",
            f"style-src 'nonce-{nonce}'",
            "img-src data:",
            f"connect-src 'self' ws://{host} wss://{host}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


# Where rooms live ############################################################


@functools.cache
def rooms() -> "MemoryRooms | RedisRooms":
    """This process's rooms: in Redis when the chat has a Redis URL, else in memory."""
    url = knob("REDIS_URL", None)
    if url:
        watch_redis()
    return RedisRooms(url) if url else MemoryRooms()


def is_valid_room(name: str) -> bool:
    """1-100 letters (any script, with at most MAX_MARKS marks each), digits, '_'
    or '-', and not only letters that draw nothing."""
    return (
        0 < len(name) <= MAX_ROOM_NAME
        and all(ch in "_-" or unicodedata.category(ch)[0] in "LMN" for ch in name)
        and without_mark_stacks(name) == name
        and is_visible(name)
    )


# Letters that draw nothing (Hangul and halfwidth fillers, the blank Braille cell):
# a name of these alone would be invisible.
FILLERS = "\u115f\u1160\u3164\uffa0\u2800"


def is_visible(text: str) -> bool:
    return any(
        ch not in FILLERS
        and not ch.isspace()
        and unicodedata.category(ch)[0] not in "MC"
        for ch in text
    )


def without_mark_stacks(text: str) -> str:
    """At most MAX_MARKS combining marks on each character: a stack of dozens draws
    over the lines above and below."""
    kept, marks = [], 0
    for ch in text:
        marks = marks + 1 if unicodedata.category(ch)[0] == "M" else 0
        if marks <= MAX_MARKS:
            kept.append(ch)
    return "".join(kept)


def group_name(room: str) -> str:
    """Channels group names must be short ASCII: hash the room's exact name.

    Hashing keeps look-alike names ('cafe' with a Cyrillic 'с', or 'é' vs 'e') apart.
    """
    return "room." + room_key(room)


def room_key(room: str) -> str:
    return hashlib.sha256(room.encode()).hexdigest()[:32]


def clean_name(raw: str) -> str:
    """A nickname on one line, without control or format characters or stacks of
    marks, at most MAX_NAME long; one that shows nothing becomes a guest's."""
    kept = "".join(
        ch
        for ch in unicodedata.normalize("NFC", raw)
        if ch.isspace() or unicodedata.category(ch)[0] != "C"
    )
    name = " ".join(without_mark_stacks(kept).split())[:MAX_NAME].strip()
    return name if is_visible(name) else guest_name()


def guest_name() -> str:
    return f"guest-{secrets.randbelow(9000) + 1000}"


def new_epoch() -> str:
    return secrets.token_hex(4)


@dataclass
class Presence:
    count: int
    names: list[str]  # at most MAX_LISTED of them


@dataclass
class Arrival:
    """What a member learns on entering a room (rooms().enter)."""

    epoch: str
    last_id: int
    missed: list[dict]  # the kept messages after the member's `since`
    name: str  # the name it got
    presence: Presence


def unused_name(nickname: str, taken) -> str:
    """The nickname, or "nickname (2)", "(3)"...: the first no one in the room has,
    so that nobody can pass for someone else by name."""
    name, n = nickname, 1
    while name in taken:
        n += 1
        name = f"{nickname} ({n})"
    return name


def history_event(message_id: int, epoch: str, text: str) -> dict:
    """A message for the room's group, as encoded once for all its members."""
    return {"type": "chat.message", "id": message_id, "epoch": epoch, "text": text}


# Where rooms live: in memory #################################################


@dataclass
class MemoryRoom:
    epoch: str = field(default_factory=new_epoch)
    last_id: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_SIZE))
    members: dict[str, str] = field(default_factory=dict)  # nickname -> member id
    used: float = field(default_factory=time.monotonic)
    size: int = 0  # the bytes it counts for against ROOMS_BUDGET

    def events(self, first: int, last: int) -> list[dict]:
        """Its kept messages with ids from first to last. (History holds the last
        messages, each as UTF-8 JSON: the ids are the last ones, in order.)"""
        oldest = self.last_id - len(self.history) + 1
        first = max(first, oldest)
        kept = itertools.islice(self.history, first - oldest, max(last - oldest + 1, 0))
        return [
            history_event(first + n, self.epoch, text.decode())
            for n, text in enumerate(kept)
        ]


class MemoryRooms:
    """Rooms of a single process: bounded history, members, and the ids of messages.

    What they keep is counted in bytes. Past ROOMS_BUDGET, rooms without members
    are forgotten, least recently used first (and any unused for ROOM_IDLE): they
    wait in order of use, so finding them walks no other room."""

    def __init__(self):
        self.occupied: dict[str, MemoryRoom] = {}
        self.unoccupied: OrderedDict[str, MemoryRoom] = OrderedDict()  # oldest first
        self.size = 0  # bytes counted, all rooms together

    def room(self, name: str) -> MemoryRoom:
        room = self.occupied.get(name) or self.unoccupied.get(name)
        if room is None:
            room = self.unoccupied[name] = MemoryRoom()
            self.resize(room, ROOM_BYTES + len(name.encode()))
        elif name in self.unoccupied:
            self.unoccupied.move_to_end(name)  # the last to be forgotten now
        room.used = time.monotonic()
        return room

    def resize(self, room: MemoryRoom, change: int) -> None:
        room.size += change
        self.size += change

    async def post(self, name: str, frame: dict) -> dict:
        room = self.room(name)
        room.last_id += 1
        frame = {**frame, "id": room.last_id, "epoch": room.epoch}
        if len(room.history) == HISTORY_SIZE:  # the oldest goes
            self.resize(room, -ENTRY_BYTES - len(room.history[0]))
        text = encode(frame).encode()
        room.history.append(text)
        self.resize(room, ENTRY_BYTES + len(text))
        self.forget_rooms()
        return frame

    async def position(self, name: str) -> tuple[str, int]:
        """The room's epoch and the id of its last message."""
        room = self.room(name)
        return room.epoch, room.last_id

    async def enter(
        self, name: str, since: int, epoch: str, member: str, nickname: str
    ) -> Arrival:
        """Into the room: its epoch and last id, its kept messages after `since`
        (all of them if `epoch` is another numbering's), the name the member got,
        and who is here."""
        room = self.room(name)
        since = 0 if epoch and epoch != room.epoch else since
        missed = room.events(since + 1, room.last_id)
        nickname, presence = await self.join(name, member, nickname)
        return Arrival(room.epoch, room.last_id, missed, nickname, presence)

    async def between(self, name: str, first: int, last: int) -> list[dict]:
        return self.room(name).events(first, last)

    async def join(self, name: str, member: str, nickname: str) -> tuple[str, Presence]:
        """The member is in the room, under the name returned."""
        room = self.room(name)
        self.occupied[name] = self.unoccupied.pop(name, room)
        nickname = unused_name(nickname, room.members)
        room.members[nickname] = member
        self.resize(room, ENTRY_BYTES + len(nickname.encode()))
        self.forget_rooms()
        return nickname, await self.presence(name)

    async def leave(self, name: str, member: str, nickname: str) -> None:
        room = self.room(name)
        if room.members.get(nickname) == member:
            del room.members[nickname]
            self.resize(room, -ENTRY_BYTES - len(nickname.encode()))
            if not room.members:
                self.unoccupied[name] = self.occupied.pop(name)

    async def rename(
        self, name: str, member: str, old: str, nickname: str
    ) -> tuple[str, Presence]:
        await self.leave(name, member, old)
        return await self.join(name, member, nickname)

    async def presence(self, name: str) -> Presence:
        members = self.room(name).members
        return Presence(len(members), list(itertools.islice(members, MAX_LISTED)))

    async def active(self) -> list[tuple[str, int]]:
        self.forget_rooms()
        return [(name, len(room.members)) for name, room in self.occupied.items()]

    def forget_rooms(self) -> None:
        """Forget the rooms without members that were unused for ROOM_IDLE, and
        past ROOMS_BUDGET the least recently used: they come first in the queue."""
        idle_since = time.monotonic() - ROOM_IDLE
        while self.unoccupied:
            name, room = next(iter(self.unoccupied.items()))
            if self.size <= ROOMS_BUDGET and room.used >= idle_since:
                break
            del self.unoccupied[name]
            self.size -= room.size


# Where rooms live: Redis's scripts ###########################################


class RedisScripts:
    """The Lua scripts of RedisRooms (below). Redis runs each one whole, with
    nothing in between, so each is one round trip that leaves a room consistent."""

    # Each script starts with "#!lua": then Redis 7 refuses (in a cluster) any key
    # outside the slot of the keys it is given, so a mistake shows at once.
    # One script, so an id is never handed out without its message being in history:
    # whoever sees message n can always find n-1 there. It says how many bytes the
    # room grew by (ACCOUNT counts them).
    POST = r"""#!lua
        redis.call('HSETNX', KEYS[1], 'epoch', ARGV[2])
        local frame = cjson.decode(ARGV[1])
        frame['id'] = redis.call('HINCRBY', KEYS[1], 'last_id', 1)
        frame['epoch'] = redis.call('HGET', KEYS[1], 'epoch')
        local encoded = cjson.encode(frame)
        redis.call('ZADD', KEYS[2], frame['id'], encoded)
        local grown = #encoded + ARGV[5]
        local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
        if over > 0 then
            for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do
                grown = grown - #old - ARGV[5]
            end
            redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
        end
        redis.call('EXPIRE', KEYS[1], ARGV[4])
        redis.call('EXPIRE', KEYS[2], ARGV[4])
        return {encoded, grown}
    """
    # The room's epoch and last id (a new room gets its epoch here).
    POSITION = r"""#!lua
        redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
        redis.call('EXPIRE', KEYS[1], ARGV[2])
        return redis.call('HMGET', KEYS[1], 'epoch', 'last_id')
    """
    # What the rooms hold is counted in bytes and kept within ROOMS_BUDGET, as in
    # memory: `used` orders the rooms by last use, `sizes` says what each counts
    # for, `bytes` sums them up. Past the budget (or ROOM_IDLE), the rooms used
    # least recently go, a few at a time, but not those with members: the lobby's
    # `busy` counts them (the news tells it), and `alive` says when a process last
    # said it keeps some there (on entering, and at each keep-alive round), so the
    # rooms of a process that died go too. The names of the rooms let go come back:
    # their own keys are in other slots, and are deleted next.
    ACCOUNT = r"""#!lua
        local used, sizes, total_bytes, alive, busy = unpack(KEYS)
        local room, grown, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
        local budget, idle = tonumber(ARGV[4]), ARGV[5]
        if redis.call('HSETNX', sizes, room, 0) == 1 then  -- a room starts
            grown = grown + tonumber(ARGV[6])
        end
        if ARGV[8] == '1' then  -- someone entered: one member at least
            redis.call('ZADD', alive, now, room)
            redis.call('ZADD', busy, 'GT', 1, room)
        end
        redis.call('ZADD', used, now, room)
        redis.call('HINCRBY', sizes, room, grown)
        local total = redis.call('INCRBY', total_bytes, grown)
        for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, idle) end
        local gone = {}
        local oldest = redis.call('ZRANGE', used, 0, 9, 'WITHSCORES')
        for i = 1, #oldest, 2 do
            local other, last = oldest[i], tonumber(oldest[i + 1])
            if total <= budget and last > now - idle then break end
            local here = tonumber(redis.call('ZSCORE', busy, other) or 0) > 0
            local kept = tonumber(redis.call('ZSCORE', alive, other) or 0)
            if here and kept > now - tonumber(ARGV[7]) then
                redis.call('ZADD', used, now, other)  -- in use: kept
            elseif other ~= room then
                total = redis.call('DECRBY', total_bytes, redis.call('HGET', sizes, other) or 0)
                redis.call('HDEL', sizes, other)
                for _, key in ipairs({used, alive, busy}) do redis.call('ZREM', key, other) end
                gone[#gone + 1] = other
            end
        end
        return gone
    """
    # A member takes the first of "name", "name (2)"... that no one else has.
    CLAIM = r"""
        local function claim(members, names, member, nickname, expiry, idle)
            local name, n = nickname, 1
            while true do
                local owner = redis.call('HGET', names, name)
                if not owner or owner == member then break end
                n = n + 1
                name = nickname .. ' (' .. n .. ')'
            end
            redis.call('HSET', names, name, member)
            redis.call('ZADD', members, expiry, member .. '\n' .. name)
            redis.call('EXPIRE', members, idle)
            redis.call('EXPIRE', names, idle)
            return name
        end
    """
    JOIN = (
        "#!lua\n"
        + CLAIM
        + "return claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])"
    )
    LEAVE = r"""#!lua
        redis.call('ZREM', KEYS[1], ARGV[1] .. '\n' .. ARGV[2])
        if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then
            redis.call('HDEL', KEYS[2], ARGV[2])
        end
    """
    # A room's members: those expired are removed and returned, so that exactly one
    # process announces each.
    # Lists come back as one JSON text: redis-py reads a reply element by element in
    # Python, and a hundred names took longer than all the rest of a connect.
    PRESENT = r"""
        local function json_array(texts)  -- of texts that are JSON already
            return '[' .. table.concat(texts, ',') .. ']'
        end
        local function present(members, names, now, listed, idle)
            local gone = redis.call('ZRANGEBYSCORE', members, '-inf', now, 'LIMIT', 0, 500)
            if #gone > 0 then redis.call('ZREM', members, unpack(gone)) end
            for _, entry in ipairs(gone) do
                local member, name = string.match(entry, '^(.-)\n(.*)$')
                if redis.call('HGET', names, name) == member then
                    redis.call('HDEL', names, name)
                end
            end
            local count = redis.call('ZCARD', members)
            if count > 0 then redis.call('EXPIRE', members, idle) end
            local listing = {}
            for i, entry in ipairs(redis.call('ZRANGE', members, 0, listed - 1)) do
                listing[i] = cjson.encode(string.match(entry, '\n(.*)$'))
            end
            return {gone, count, json_array(listing)}
        end
    """
    PRESENCE = (
        "#!lua\n"
        + PRESENT
        + "return present(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])"
    )
    # Entering a room: its position (a new room gets its epoch), what the member
    # missed, its name, and who is here. (For a room's first member in a process,
    # ACCOUNT goes with it, in the same round trip.)
    ENTER = (
        "#!lua\n"
        + CLAIM
        + PRESENT
        + r"""
        local room, history, members, names = unpack(KEYS)
        redis.call('HSETNX', room, 'epoch', ARGV[1])
        redis.call('EXPIRE', room, ARGV[2])
        redis.call('EXPIRE', history, ARGV[2])
        local position = redis.call('HMGET', room, 'epoch', 'last_id')
        local epoch, last_id = position[1], tonumber(position[2]) or 0
        local since = tonumber(ARGV[3])
        if ARGV[4] ~= '' and ARGV[4] ~= epoch then since = 0 end  -- another numbering's
        local missed = json_array(redis.call('ZRANGEBYSCORE', history, since + 1, last_id))
        local name = claim(members, names, ARGV[5], ARGV[6], ARGV[7], ARGV[2])
        local here = present(members, names, ARGV[8], ARGV[9], ARGV[2])
        return {epoch, last_id, missed, name, here}
    """
    )


# Where rooms live: in Redis ##################################################


class RedisRooms(RedisScripts):
    """The same rooms kept in Redis, so that every chat.py process shares them.

    Per room: a hash (epoch, last id), a sorted set of messages scored by id, a
    sorted set of members scored by when they expire, and a hash of the names in
    use, all under `chat:{<room key>}:`. The braces are a Redis Cluster hash tag:
    a room's keys share a slot, so each script stays on one node. What all rooms
    share has keys of its own, `chat:{rooms}:…`, and a script of its own (ACCOUNT).
    Each process keeps its own members alive; a member of a process that died
    expires and is announced as gone. Every key expires after ROOM_IDLE unused.
    """

    # What all rooms share, in a slot of its own: the budget's keys (ACCOUNT), and
    # the lobby's list of rooms by how many members they had when last counted.
    USED, SIZES = "chat:{rooms}:used", "chat:{rooms}:sizes"
    BYTES, ALIVE, BUSY = "chat:{rooms}:bytes", "chat:{rooms}:alive", "chat:{rooms}:busy"

    def __init__(self, url: str):
        self.redis = redis_client(url, decode_responses=True, **REDIS_OPTIONS)
        scripts = ("POST", "POSITION", "ACCOUNT", "ENTER", "JOIN", "LEAVE", "PRESENCE")
        self.scripts = {
            script: self.redis.register_script(getattr(self, script))
            for script in scripts
        }
        self.local: dict[str, dict[str, str]] = {}  # room -> our members -> their entry
        self.keeper: asyncio.Task | None = None
        self.lobby: list[tuple[str, int]] = []  # what the lobby showed last...
        self.lobby_until = 0.0  # ...until then (time.monotonic())
        self.lobby_lock = asyncio.Lock()

    @staticmethod
    def prefix(name: str) -> str:
        return "chat:{" + room_key(name) + "}"

    @classmethod
    def keys(cls, name: str) -> tuple[str, str, str, str]:
        prefix = cls.prefix(name)
        return tuple(
            f"{prefix}:{key}" for key in ("room", "history", "members", "names")
        )

    def call(self, pipeline, script: str, keys: list, args: list) -> None:
        """Queue a script on a pipeline (see in_one_round_trip)."""
        pipeline.evalsha(self.scripts[script].sha, len(keys), *keys, *args)

    async def in_one_round_trip(self, queue) -> list:
        """The commands queue(pipeline) queues, sent at once; errors are returned.
        Scripts a restarted Redis forgot are loaded, and the lot is sent again
        (redis-py's pipelines would first ask if they are known, every time)."""
        from redis.exceptions import NoScriptError

        async with self.redis.pipeline(transaction=False) as pipeline:
            queue(pipeline)
            results = await pipeline.execute(raise_on_error=False)
        if any(isinstance(result, NoScriptError) for result in results):
            for script in self.scripts.values():
                await self.redis.script_load(script.script)
            return await self.in_one_round_trip(queue)
        return results

    def accounting(self, name: str, grown: int, entered: bool = False) -> tuple:
        """ACCOUNT's keys and arguments: the room grew by `grown` bytes, used now."""
        args = [name, grown, time.time(), ROOMS_BUDGET, ROOM_IDLE, ROOM_BYTES]
        keys = [self.USED, self.SIZES, self.BYTES, self.ALIVE, self.BUSY]
        return keys, [*args, MEMBER_TTL, int(entered)]

    async def forget(self, gone: list[str]) -> None:
        """Delete the keys of the rooms ACCOUNT let go."""
        if gone:
            async with self.redis.pipeline(transaction=False) as deleting:
                for name in gone:
                    deleting.delete(*self.keys(name))
                await deleting.execute()

    async def post(self, name: str, frame: dict) -> dict:
        room, history, _, _ = self.keys(name)
        args = [json.dumps(frame), new_epoch(), HISTORY_SIZE, ROOM_IDLE, ENTRY_BYTES]
        encoded, grown = await self.scripts["POST"](keys=[room, history], args=args)
        await self.forget(await self.scripts["ACCOUNT"](*self.accounting(name, grown)))
        return json.loads(encoded)

    async def position(self, name: str) -> tuple[str, int]:
        room, _, _, _ = self.keys(name)
        epoch, last_id = await self.scripts["POSITION"](
            keys=[room], args=[new_epoch(), ROOM_IDLE]
        )
        return epoch, int(last_id or 0)

    async def enter(
        self, name: str, since: int, epoch: str, member: str, nickname: str
    ) -> Arrival:
        """One round trip: see MemoryRooms.enter. The first member of a room here
        also has it counted (ACCOUNT); the room is then in use until the last goes."""
        args = [new_epoch(), ROOM_IDLE, since, epoch, member, nickname]
        args += [time.time() + MEMBER_TTL, time.time(), MAX_LISTED]
        if name in self.local:  # (counted already, and in use)
            entered = await self.scripts["ENTER"](keys=self.keys(name), args=args)
        else:
            entered = await self.enter_counted(name, args)
        room_epoch, last_id, missed, nickname, here = entered
        self.now_here(name, member, nickname)
        missed = [message_event(frame) for frame in json.loads(missed)]
        return Arrival(room_epoch, last_id, missed, nickname, self.present(name, *here))

    async def enter_counted(self, name: str, args: list) -> list:
        """ENTER, and ACCOUNT in the same round trip."""

        def queue(pipeline) -> None:
            self.call(pipeline, "ENTER", list(self.keys(name)), args)
            self.call(pipeline, "ACCOUNT", *self.accounting(name, 0, entered=True))

        entered, gone = map(raised, await self.in_one_round_trip(queue))
        await self.forget(gone)
        return entered

    async def between(self, name: str, first: int, last: int) -> list[dict]:
        kept = await self.redis.zrange(self.keys(name)[1], first, last, byscore=True)
        return [message_event(json.loads(entry)) for entry in kept]

    async def join(self, name: str, member: str, nickname: str) -> tuple[str, Presence]:
        """The member is in the room, under the name returned."""
        keys = self.keys(name)[2:]
        args = [member, nickname, time.time() + MEMBER_TTL, ROOM_IDLE]
        nickname = await self.scripts["JOIN"](keys=keys, args=args)
        self.now_here(name, member, nickname)
        return nickname, await self.presence(name)

    def now_here(self, name: str, member: str, nickname: str) -> None:
        """A member of this process, kept alive by it (keep_members_alive)."""
        self.local.setdefault(name, {})[member] = f"{member}\n{nickname}"
        if self.keeper is None:
            self.keeper = asyncio.create_task(self.keep_members_alive())

    async def leave(self, name: str, member: str, nickname: str) -> None:
        """One round trip; the news of it counts who is left (send_news)."""
        ours = self.local.get(name, {})
        entry = ours.pop(member, None)
        if not ours:
            self.local.pop(name, None)
        if entry:
            await self.scripts["LEAVE"](
                keys=self.keys(name)[2:], args=[member, nickname]
            )

    async def rename(
        self, name: str, member: str, old: str, nickname: str
    ) -> tuple[str, Presence]:
        await self.leave(name, member, old)
        return await self.join(name, member, nickname)

    async def presence(self, name: str) -> Presence:
        """Who is here (for the news, which then tells the lobby the count). Members
        whose process stopped keeping them alive are dropped, and announced as gone."""
        _, _, members, names = self.keys(name)
        args = [time.time(), MAX_LISTED, ROOM_IDLE]
        here = await self.scripts["PRESENCE"](keys=[members, names], args=args)
        presence = self.present(name, *here)
        async with self.redis.pipeline(transaction=False) as telling:
            if presence.count:
                telling.zadd(self.BUSY, {name: presence.count})
                telling.zadd(self.ALIVE, {name: time.time()})
            else:
                telling.zrem(self.BUSY, name)
            telling.expire(self.BUSY, ROOM_IDLE).expire(self.ALIVE, ROOM_IDLE)
            await telling.execute()
        return presence

    @staticmethod
    def present(name: str, gone: list, count: int, listed: str) -> Presence:
        """What PRESENT said: who is here, and who is gone (announced here)."""
        for entry in gone:
            announce(name, "leave", entry.split("\n", 1)[1])
        return Presence(count, json.loads(listed))

    async def active(self) -> list[tuple[str, int]]:
        """The lobby's list, read from Redis at most once per LOBBY_REFRESH for all
        of this process's viewers: open lobbies cost Redis per process, not per page."""
        async with self.lobby_lock:
            if time.monotonic() >= self.lobby_until:
                self.lobby = await self.busiest()
                self.lobby_until = time.monotonic() + LOBBY_REFRESH
        return self.lobby

    async def busiest(self) -> list[tuple[str, int]]:
        """The rooms with most members, counting those still kept alive (a process
        may have died): two round trips, and a third to tell the list the counts."""
        names = await self.redis.zrevrange(self.BUSY, 0, LOBBY_SIZE - 1)
        async with self.redis.pipeline(transaction=False) as counting:
            for name in names:
                counting.zcount(self.keys(name)[2], time.time(), "+inf")
            counts = dict(zip(names, await counting.execute()))
        async with self.redis.pipeline(transaction=False) as telling:
            if here := {name: count for name, count in counts.items() if count}:
                telling.zadd(self.BUSY, here, xx=True)
            if empty := [name for name, count in counts.items() if not count]:
                telling.zrem(self.BUSY, *empty)
            await telling.execute()
        return sorted(here.items(), key=lambda room: -room[1])

    async def keep_members_alive(self) -> None:
        """Renew this process's members: a process that dies stops renewing, and
        its members fade away. Each round also drops the members of vanished
        processes and checks that every room's hub is up to date."""
        while True:
            await asyncio.sleep(MEMBER_TTL / 3)
            try:
                await self.keep_rooms()
            except outages() as error:
                close_rooms(error)

    ROUND = 5  #: commands a room takes in a keep-alive round

    async def keep_rooms(self) -> None:
        """One round for all of this process's rooms: one pipelined round trip,
        however many rooms. It tells that the rooms are alive, so that ACCOUNT keeps
        them. An error that is not an outage stays its room's."""
        names, now = list(self.local), time.time()

        def queue(pipeline) -> None:
            for name in names:
                room, history, members, member_names = self.keys(name)
                entries = self.local[name].values()
                pipeline.zadd(members, dict.fromkeys(entries, now + MEMBER_TTL))
                args = [now, MAX_LISTED, ROOM_IDLE]
                self.call(pipeline, "PRESENCE", [members, member_names], args)
                pipeline.expire(room, ROOM_IDLE).expire(history, ROOM_IDLE)
                pipeline.hget(room, "last_id")
            if names:
                pipeline.zadd(self.ALIVE, dict.fromkeys(names, now), gt=True)

        results = await self.in_one_round_trip(queue)
        for n, name in enumerate(names):
            ours = results[n * self.ROUND : (n + 1) * self.ROUND]
            if error := next((r for r in ours if isinstance(r, Exception)), None):
                print(f"chat.py: room {name}: Redis said: {error}", file=sys.stderr)
                continue
            _, here, _, _, last_id = ours
            self.present(name, *here)
            if name in hubs:
                await hubs[name].catch_up(int(last_id or 0))


def raised(result):
    """A pipeline's result, or its error raised."""
    if isinstance(result, Exception):
        raise result
    return result


def redis_client(url: str, asynchronous: bool = True, **options):
    """A redis-py client for a Redis URL, or for the master its sentinels name."""
    import redis.asyncio
    import redis.asyncio.sentinel
    import redis.sentinel

    if sentinel := sentinel_of(url):
        sentinels, master, db = sentinel
        kind = redis.asyncio.sentinel if asynchronous else redis.sentinel
        asking = {
            key: value for key, value in options.items() if key.startswith("socket")
        }
        return kind.Sentinel(sentinels, sentinel_kwargs=asking).master_for(
            master, db=db, **options
        )
    if not asynchronous:  # (check_redis, once at the start)
        return redis.Redis.from_url(url, **options)
    # The rooms': a crowd waits for REDIS_CONNECTIONS in turn.
    options["max_connections"] = REDIS_CONNECTIONS
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, timeout=None, **options)
    return redis.asyncio.Redis(connection_pool=pool)


# The pages: what they say ####################################################

# What the pages say, in the visitor's language (Accept-Language; English unless
# Russian comes first). "{name}" is filled in by the page; a dict is a plural.

WORDS = {
    "en": {
        "lobby_title": "Chat rooms",
        "description": "A real-time chat: pick a room, share its link, talk.",
        "which_room": "What chat room would you like to enter?",
        "enter": "Enter",
        "your_name": "Your name",
        "optional": "(optional)",
        "active_rooms": "Active rooms",
        "none_yet": "none yet",
        "online": "{n} online",
        "bad_room": "A room name is 1–100 letters, digits, _ or -, without spaces.",
        "join_here": "Join from a phone or laptop on this network:",
        "all_rooms": "all rooms",
        "who_is_online": "Who is online",
        "messages": "Messages",
        "message": "Message",
        "placeholder": "Message (Enter sends, Shift+Enter: new line)",
        "send": "Send",
        "connecting": "connecting…",
        "connected_as": "connected as {name}",
        "offline": "offline",
        "reconnecting": "offline — reconnecting in {n} s",
        "waiting": "{n} waiting to send",
        "online_count": "{n} online:",
        "joined": "{names} joined",
        "left": "{names} left",
        "and_more": "{names} and {n} more",
        "renamed": "{old} is now {name}",
        "typing": "{name} is typing…",
        "new_messages": {"one": "{n} new message ↓", "other": "{n} new messages ↓"},
        "no_such_room": "No such room",
        "room_rules": "Room names are 1–100 letters, digits, _ or -.",
        "back": "Back to the lobby",
    },
    "ru": {
        "lobby_title": "Комнаты чата",
        "description": "Чат в реальном времени: выберите комнату, поделитесь ссылкой.",
        "which_room": "В какую комнату вы хотите войти?",
        "enter": "Войти",
        "your_name": "Ваше имя",
        "optional": "(необязательно)",
        "active_rooms": "Активные комнаты",
        "none_yet": "пока нет",
        "online": "{n} в сети",
        "bad_room": "Имя комнаты: 1–100 букв, цифр, _ или -, без пробелов.",
        "join_here": "Войти с телефона или ноутбука в этой сети:",
        "all_rooms": "все комнаты",
        "who_is_online": "Кто в сети",
        "messages": "Сообщения",
        "message": "Сообщение",
        "placeholder": "Сообщение (Enter — отправить, Shift+Enter — новая строка)",
        "send": "Отправить",
        "connecting": "подключение…",
        "connected_as": "вы в чате как {name}",
        "offline": "нет связи",
        "reconnecting": "нет связи — переподключение через {n} с",
        "waiting": "ждут отправки: {n}",
        "online_count": "в сети: {n}",
        "joined": "{names}: вход",
        "left": "{names}: выход",
        "and_more": "{names} и ещё {n}",
        "renamed": "{old} теперь {name}",
        "typing": "{name} печатает…",
        "new_messages": {
            "one": "{n} новое сообщение ↓",
            "few": "{n} новых сообщения ↓",
            "other": "{n} новых сообщений ↓",
        },
        "no_such_room": "Такой комнаты нет",
        "room_rules": "Имя комнаты: 1–100 букв, цифр, _ или -.",
        "back": "Вернуться к списку комнат",
    },
}


# The pages: how they look ####################################################

STYLE = r"""
:root {
  color-scheme: light dark;
  --bg: #ffffff; --fg: #1b1e24; --muted: #5a6070; --line: #858b98; --soft: #f3f4f7;
  --accent: #0b5cc2; --on-accent: #ffffff; --mine: #eaf1fd; --mention: #fff3c4;
  --error: #b3261e;
  --n0: #b3261e; --n1: #8f4a00; --n2: #665800; --n3: #1d7532;
  --n4: #00707a; --n5: #1d5fc4; --n6: #6a3fc1; --n7: #a3237a;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #14161b; --fg: #e7e9ee; --muted: #a7aebc; --line: #7c8391; --soft: #1e222a;
    --accent: #8ab8ff; --on-accent: #0b1220; --mine: #1b2840; --mention: #3a3213;
    --error: #ff8f85;
    --n0: #ff8f85; --n1: #ffb45e; --n2: #dccb55; --n3: #72d98d;
    --n4: #5fd3dc; --n5: #8ab8ff; --n6: #c4a6ff; --n7: #ff8ad0;
  }
}
* { box-sizing: border-box; }
html, body { background: var(--bg); color: var(--fg); }
body { margin: 0; font: 1.125rem/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 60rem; margin: 0 auto; padding: .75rem; height: 100dvh;
       display: flex; flex-direction: column; gap: .5rem; }
header { display: flex; align-items: baseline; justify-content: space-between; gap: 1rem; }
h1 { margin: 0; font-size: 1.75rem; line-height: 1.2; overflow-wrap: anywhere; }
h2 { margin: .6rem 0 .2rem; font-size: 1.25rem; }
a { color: var(--accent); }
label { font-weight: 600; }
input, textarea, button { font: inherit; color: inherit; }
input[type=text], textarea { flex: 1; min-width: 0; padding: .45rem .6rem; background: var(--bg);
  border: 1px solid var(--line); border-radius: .5rem; }
textarea { resize: none; max-height: 30vh; overflow-y: auto; }
::placeholder { color: var(--muted); opacity: 1; }
input[type=button], button { padding: .45rem 1.1rem; border: 0; border-radius: .5rem;
  background: var(--accent); color: var(--on-accent); font-weight: 600; cursor: pointer; }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
.row { display: flex; gap: .5rem; align-items: center; }
.row.compose { align-items: flex-end; }
.muted, #status, #typing { color: var(--muted); font-size: 1rem; }
#status { min-height: 1.45em; margin-top: -.4rem; }
.error { color: var(--error); }
/* Read out, not shown: hidden labels, and the repeated heading of grouped messages. */
.visually-hidden, .message.follow .meta {
  position: absolute; width: 1px; height: 1px; overflow: hidden;
  clip-path: inset(50%); white-space: nowrap; }
/* The lobby */
#rooms { padding-left: 1.2rem; }
#room-name-error:empty, #rooms:empty { display: none; }
#join { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; padding: .75rem;
        background: var(--soft); border-radius: .5rem; }
#join strong { font-size: 1.6rem; overflow-wrap: anywhere; }
#join svg { background: #fff; border-radius: .25rem; }
/* A room */
/* Who is online: one row that scrolls sideways, so the room does not move as people come. */
.who { display: flex; gap: .6rem; align-items: baseline; min-height: 1.6em; font-size: 1rem; }
#member-count { flex: none; }
#members { display: flex; gap: .9rem; margin: 0; padding: 0 0 .2rem; list-style: none;
           overflow-x: auto; white-space: nowrap; }
#members li::before { content: "● "; color: var(--n3); }
.log-box { flex: 1; min-height: 6rem; position: relative; display: flex; }
#chat-log { flex: 1; overflow-y: auto; overscroll-behavior: contain; padding: .5rem .75rem;
            border: 1px solid var(--line); border-radius: .5rem; }
.event { padding: .1rem .5rem; border-radius: .4rem; overflow-wrap: anywhere; }
.message { margin-top: .5rem; }
.message.follow { margin-top: 0; }
.message .meta { display: flex; gap: .5rem; align-items: baseline; }
.author { font-weight: 700; }
.n0 { color: var(--n0); } .n1 { color: var(--n1); } .n2 { color: var(--n2); }
.n3 { color: var(--n3); } .n4 { color: var(--n4); } .n5 { color: var(--n5); }
.n6 { color: var(--n6); } .n7 { color: var(--n7); }
time { color: var(--muted); font-size: .875rem; }
.text { white-space: pre-wrap; }
.mine { background: var(--mine); }
.mention { background: var(--mention); box-shadow: inset 3px 0 var(--n1); }
.notice { color: var(--muted); font-size: .95rem; margin: .2rem 0; }
.notice.error { color: var(--error); }
.day { display: flex; align-items: center; gap: .75rem; margin: .75rem 0 .25rem;
       color: var(--muted); font-size: .875rem; font-weight: 600; }
.day::before, .day::after { content: ""; flex: 1; border-top: 1px solid var(--line); }
#new-messages { position: absolute; bottom: .75rem; left: 50%; transform: translateX(-50%);
                box-shadow: 0 2px 8px #0006; }
#typing { min-height: 1.4em; }
"""


# The tab's icon, inline: a page that asks for /favicon.ico logs a 404.
FAVICON = (
    "data:image/svg+xml,<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 32 32'>"
    "<path fill='%230b5cc2' d='M4 4h24a3 3 0 0 1 3 3v14a3 3 0 0 1-3 3H13l-7 6v-6H4a3 3"
    " 0 0 1-3-3V7a3 3 0 0 1 3-3z'/></svg>"
)


# The pages: templates ########################################################

# Django templates, kept in memory by its locmem loader: "base.html" holds what
# every page shares; the lobby, a room and "no such room" extend it.
PAGES = {}


PAGES["base.html"] = r"""<!DOCTYPE html>
<html lang="{{ language }}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, interactive-widget=resizes-content">
<meta name="description" content="{{ words.description }}">
<link rel="icon" href="{{ favicon|safe }}">
<title>{% block title %}{% endblock %}</title>
<style nonce="{{ nonce }}">{{ style|safe }}</style>
</head>
<body>
<main>
{% block main %}{% endblock %}
</main>
{{ words|json_script:"words" }}
{{ prefix|json_script:"prefix" }}
<script nonce="{{ nonce }}">
  // Where the chat lives: "/", or under a host project's prefix ("/demo/").
  const prefix = JSON.parse(document.getElementById('prefix').textContent);
  const words = JSON.parse(document.getElementById('words').textContent);
  const plurals = new Intl.PluralRules(document.documentElement.lang);

  // The page's words with their "{slots}" filled: strings, and names in <bdi>
  // (an Arabic name keeps its own direction inside an English line).
  function phrase(key, slots = {}) {
    let wording = words[key];
    if (typeof wording === 'object') wording = wording[plurals.select(slots.n)] || wording.other;
    return wording.split(/\{(\w+)\}/).flatMap(function (part, i) {
      if (i % 2 === 0) return [part];
      if (part === 'n') return [String(slots.n)];
      return [slots[part]].flat().flatMap(function (name, j) {
        const isolated = document.createElement('bdi');
        isolated.textContent = name;
        return j ? [', ', isolated] : [isolated];
      });
    });
  }
  function wording(key, slots) {
    return phrase(key, slots).map((part) => part.textContent ?? part).join('');
  }
  // Enter acts, unless an input method is composing: then Enter confirms a word
  // (keyCode 229: Safari's composition-ending Enter). Shift+Enter: a new line.
  function onEnter(input, action) {
    input.addEventListener('keydown', function (e) {
      if (e.key !== 'Enter' || e.shiftKey || e.isComposing || e.keyCode === 229) return;
      e.preventDefault();
      action();
    });
  }
</script>
{% block script %}{% endblock %}
</body>
</html>
"""


PAGES["lobby.html"] = r"""{% extends "base.html" %}
{% block title %}{{ words.lobby_title }}{% endblock %}
{% block main %}
  <h1>{{ words.lobby_title }}</h1>
  {% if join_url %}
  <section id="join" aria-labelledby="join-here">
    <div role="img" aria-label="QR code: {{ join_url }}">{{ join_qr|safe }}</div>
    <p id="join-here">{{ words.join_here }}<br><strong id="join-url">{{ join_url }}</strong></p>
  </section>
  {% endif %}
  <label for="room-name-input">{{ words.which_room }}</label>
  <div class="row">
    <input id="room-name-input" type="text" maxlength="{{ max_room }}" autocomplete="off"
           aria-describedby="room-name-error">
    <input id="room-name-submit" type="button" value="{{ words.enter }}">
  </div>
  <p id="room-name-error" class="error" role="alert"></p>
  <label for="name-input">{{ words.your_name }} <span class="muted">{{ words.optional }}</span></label>
  <div class="row">
    <input id="name-input" type="text" maxlength="{{ max_name }}" autocomplete="nickname">
  </div>
  <h2>{{ words.active_rooms }}</h2>
  <ul id="rooms"></ul>
  <p id="no-rooms" class="muted">{{ words.none_yet }}</p>
{% endblock %}
{% block script %}
<script nonce="{{ nonce }}">
  const roomInput = document.querySelector('#room-name-input');
  const roomError = document.querySelector('#room-name-error');
  const nameInput = document.querySelector('#name-input');
  nameInput.value = localStorage.getItem('chat-name') || '';
  nameInput.onchange = () => localStorage.setItem('chat-name', nameInput.value.trim());

  // The server's rule for room names, checked here so a bad one is explained
  // beside the box instead of by a "no such room" page.
  function isRoomName(name) {
    return /^[\p{L}\p{M}\p{N}_-]+$/u.test(name) && [...name].length <= roomInput.maxLength;
  }
  roomInput.focus();
  onEnter(roomInput, () => document.querySelector('#room-name-submit').click());
  roomInput.oninput = function () {
    roomError.textContent = '';
    roomInput.removeAttribute('aria-invalid');
  };
  document.querySelector('#room-name-submit').onclick = function () {
    localStorage.setItem('chat-name', nameInput.value.trim());
    const roomName = roomInput.value.trim();
    if (!roomName) return;
    if (!isRoomName(roomName)) {
      roomError.textContent = wording('bad_room');
      roomInput.setAttribute('aria-invalid', 'true');
      return roomInput.focus();
    }
    window.location.pathname = prefix + 'chat/' + encodeURIComponent(roomName) + '/';
  };

  // The active rooms, refreshed in place: a link keeps its focus across updates.
  const listed = new Map();  // room name → its <li>
  function roomItem(name) {
    const link = document.createElement('a');
    link.href = prefix + 'chat/' + encodeURIComponent(name) + '/';
    link.textContent = name;
    link.dir = 'auto';
    const item = document.createElement('li');
    item.count = document.createElement('span');
    item.append(link, ' — ', item.count);
    listed.set(name, item);
    return item;
  }
  function showRooms(rooms) {
    const list = document.querySelector('#rooms');
    const focused = document.activeElement;
    const names = new Set(rooms.map((room) => room.name));
    for (const [name, item] of listed) {
      if (!names.has(name)) { item.remove(); listed.delete(name); }
    }
    rooms.forEach(function (room, i) {
      const item = listed.get(room.name) || roomItem(room.name);
      const count = wording('online', {n: room.count});
      if (item.count.textContent !== count) item.count.textContent = count;
      if (list.children[i] !== item) list.insertBefore(item, list.children[i] || null);
    });
    // (Moving a focused link blurs it.)
    if (focused !== document.activeElement && focused.isConnected) focused.focus();
    document.querySelector('#no-rooms').hidden = rooms.length > 0;
  }
  async function refreshRooms() {
    if (document.hidden) return;  // nobody is looking
    try {
      showRooms((await (await fetch(prefix + 'chat/rooms.json')).json()).rooms);
    } catch (error) { /* offline: keep the last list */ }
  }
  refreshRooms();
  setInterval(refreshRooms, {{ lobby_refresh_ms }});
  document.addEventListener('visibilitychange', refreshRooms);
</script>
{% endblock %}
"""


PAGES["404.html"] = r"""{% extends "base.html" %}
{% block title %}{{ words.no_such_room }}{% endblock %}
{% block main %}
  <h1>{{ words.no_such_room }}</h1>
  <p>{{ words.room_rules }}</p>
  <p><a href="{{ prefix }}chat/">{{ words.back }}</a></p>
{% endblock %}
"""


PAGES["room.html"] = r"""{% extends "base.html" %}
{% block title %}{{ room_name }} · chat{% endblock %}
{% block main %}
  <header>
    <h1 dir="auto">{{ room_name }}</h1>
    <a href="{{ prefix }}chat/">{{ words.all_rooms }}</a>
  </header>
  <div id="status" role="status">{{ words.connecting }}</div>
  <div class="row">
    <label for="name-input">{{ words.your_name }}</label>
    <input id="name-input" type="text" maxlength="{{ max_name }}" autocomplete="nickname">
  </div>
  <section class="who" aria-label="{{ words.who_is_online }}">
    <span id="member-count" class="muted"></span>
    <ul id="members" tabindex="0"></ul>
  </section>
  <div class="log-box">
    <!-- Not read out as it grows: #announcer speaks new messages, not the history. -->
    <div id="chat-log" role="log" aria-live="off" aria-label="{{ words.messages }}" tabindex="0"></div>
    <button id="new-messages" type="button" hidden></button>
  </div>
  <div id="announcer" class="visually-hidden" aria-live="polite"></div>
  <div id="typing" aria-live="off"></div>
  <div class="row compose">
    <label for="chat-message-input" class="visually-hidden">{{ words.message }}</label>
    <textarea id="chat-message-input" rows="1" maxlength="{{ max_message }}" autocomplete="off"
              enterkeyhint="send" placeholder="{{ words.placeholder }}"></textarea>
    <input id="chat-message-submit" type="button" value="{{ words.send }}">
  </div>
{% endblock %}
{% block script %}
{{ room_name|json_script:"room-name" }}
{% include "room.js" %}
{% endblock %}
"""


# The pages: a room's script ##################################################

# Included by room.html, so it has the page's context (the nonce above all).
PAGES["room.js"] = r"""<script nonce="{{ nonce }}">
  const roomName = JSON.parse(document.getElementById('room-name').textContent);
  const log = document.querySelector('#chat-log');
  const status = document.querySelector('#status');
  const messageInput = document.querySelector('#chat-message-input');
  const nameInput = document.querySelector('#name-input');
  const newMessages = document.querySelector('#new-messages');
  nameInput.value = localStorage.getItem('chat-name') || '';

  const MAX_SHOWN = 1000;            // events the page keeps; older ones are dropped
  const GROUP_TIME = 5 * 60 * 1000;  // one author's messages this close share a heading
  let chatSocket = null;
  let online = false;      // true from "welcome" until the socket closes
  let lastId = 0;          // the newest message shown: we resume after it
  let epoch = '';          // changes when the room's numbering starts again
  let retries = 0;
  let away = false;        // the page is hidden, kept by the browser for "back"
  let me = '';             // our name, as the server knows it
  let lastTyping = 0;
  let typingTimer = null;
  let unseen = 0;          // arrived while the reader was scrolled up
  let unread = 0;          // arrived while the tab was hidden
  let lastDay = '';        // the date of the newest message shown
  const title = document.title;
  const outbox = [];       // what was typed while offline

  // The transcript: one element per event. Its `value` is what the tutorial's
  // textarea held, one line per event, so its tests read it unchanged.
  Object.defineProperty(log, 'value', {
    get: () => Array.from(log.children, (event) => (event.line ? event.line + '\n' : '')).join(''),
  });
  function atBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  }
  function toBottom() {
    log.scrollTop = log.scrollHeight;
    unseen = 0;
    newMessages.hidden = true;
  }
  newMessages.onclick = toBottom;
  log.onscroll = () => { if (atBottom()) toBottom(); };

  // A reader at the bottom stays there; one reading older lines is not moved,
  // and a button says how many arrived below.
  function show(item, line, live) {
    const following = atBottom();
    item.line = line;
    log.append(item);
    while (log.childElementCount > MAX_SHOWN) log.firstElementChild.remove();
    if (following) toBottom();
    else if (live) {
      newMessages.textContent = wording('new_messages', {n: ++unseen});
      newMessages.hidden = false;
    }
  }
  function element(tag, className, text) {
    const made = document.createElement(tag);
    made.className = className;
    if (text !== undefined) made.append(...[text].flat());
    return made;
  }
  function clock(when) {
    return when.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit', hour12: false});
  }
  // One of eight colours per name, the same in every window.
  function colourOf(name) {
    let hash = 0;
    for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    return 'n' + (hash % 8);
  }
  // http(s) addresses become links, built as elements: nothing typed is parsed as markup.
  function withLinks(text) {
    const parts = [];
    let end = 0;
    for (const match of text.matchAll(/https?:\/\/[^\s<>"]+/gi)) {
      let address = match[0];  // without the sentence's punctuation after it
      while (/[.,;:!?'")\]]$/.test(address) && !isBalanced(address)) address = address.slice(0, -1);
      const link = element('a', '', address);
      link.href = address;
      link.target = '_blank';
      link.rel = 'noopener noreferrer nofollow';
      parts.push(text.slice(end, match.index), link);
      end = match.index + address.length;
    }
    parts.push(text.slice(end));
    return parts;
  }
  function isBalanced(address) {  // https://en.wikipedia.org/wiki/Ada_(language)
    return address.endsWith(')') && address.split('(').length >= address.split(')').length;
  }
  function mentionsMe(text) {
    const at = text.toLowerCase().indexOf('@' + me.toLowerCase());
    const next = text.slice(at + me.length + 1);
    return me !== '' && at >= 0 && !/^[\p{L}\p{N}_]/u.test(next);
  }
  // Our own messages and those naming us stand out (history arrives before we know our name).
  function mark(item) {
    item.classList.toggle('mine', item.author === me);
    item.classList.toggle('mention', item.author !== me && mentionsMe(item.text));
  }
  function showMessage(frame, live) {
    const when = new Date(frame.ts);
    const before = log.lastElementChild;
    if (when.toDateString() !== lastDay) {  // a new day: a line with its date
      lastDay = when.toDateString();
      const date = {weekday: 'long', day: 'numeric', month: 'long'};
      show(element('div', 'day', when.toLocaleDateString(document.documentElement.lang, date)));
    }
    const item = element('div', 'event message');
    Object.assign(item, {author: frame.user, text: frame.message, when: when});
    const follows = before && before.author === frame.user && when - before.when < GROUP_TIME;
    if (follows) item.classList.add('follow');
    const time = element('time', '', clock(when));
    time.dateTime = frame.ts;
    const author = element('bdi', 'author ' + colourOf(frame.user), frame.user);
    const text = element('div', 'text', withLinks(frame.message));
    text.dir = 'auto';
    item.append(element('div', 'meta', [author, time]), text);
    mark(item);
    const line = clock(when) + ' ' + frame.user + ': ' + frame.message;
    show(item, line, live);
    if (!live) return;
    document.querySelector('#announcer').textContent = line;  // read out by screen readers
    if (document.hidden) document.title = '(' + ++unread + ') ' + title;
  }
  function showNotice(kind, symbol, parts) {  // (not counted by the button: not a message)
    const item = element('div', 'event notice ' + kind, [symbol + ' ', ...parts]);
    show(item, item.textContent);
    if (kind === 'error') document.querySelector('#announcer').textContent = item.textContent;
  }
  document.addEventListener('visibilitychange', function () {
    if (!document.hidden) { unread = 0; document.title = title; }
  });
  function setStatus(text) {
    if (outbox.length) text += ' — ' + wording('waiting', {n: outbox.length});
    status.textContent = text;
  }
  // Who is online: the welcome names them, then each join, leave or rename says
  // only what changed (a frame with every name, to every member, would not scale).
  let members = new Set();
  function showMembers(frame) {
    document.querySelector('#member-count').textContent = wording('online_count', {n: frame.count});
    document.querySelector('#members').replaceChildren(...[...members].sort().map(
      (name) => element('li', '', element('bdi', '', name))
    ));
  }
  function named(users) {
    if (users.length <= 3) return {names: users};
    return {names: phrase('and_more', {names: users.slice(0, 3), n: users.length - 3})};
  }
  function adoptEpoch(newEpoch) {
    if (newEpoch !== epoch) { epoch = newEpoch; lastId = 0; }
  }

  const handlers = {
    message(frame) {
      adoptEpoch(frame.epoch);
      if (frame.id <= lastId) return;                          // already shown
      if (online && frame.id > lastId + 1) { chatSocket.close(); return; }  // a gap: resume
      lastId = frame.id;
      showMessage(frame, online);  // before "welcome": history, not read out
    },
    welcome(frame) {
      adoptEpoch(frame.epoch);
      lastId = Math.max(lastId, frame.last_id);
      online = true;
      retries = 0;
      me = frame.user;
      log.querySelectorAll('.message').forEach(mark);
      members = new Set(frame.members);
      showMembers(frame);
      while (outbox.length) chatSocket.send(JSON.stringify(outbox.shift()));
      setStatus(wording('connected_as', {name: me}));
    },
    join(frame) {
      const others = frame.users.filter((name) => name !== me);  // we know we came
      if (others.length) showNotice('join', '→', phrase('joined', named(others)));
      frame.users.forEach((name) => members.add(name));
      showMembers(frame);
    },
    leave(frame) {
      showNotice('leave', '←', phrase('left', named(frame.users)));
      frame.users.forEach((name) => members.delete(name));
      showMembers(frame);
    },
    rename(frame) {
      showNotice('rename', '✎', phrase('renamed', {old: frame.old, name: frame.user}));
      members.delete(frame.old);
      members.add(frame.user);
      showMembers(frame);
      if (frame.old === me) {
        me = frame.user;
        setStatus(wording('connected_as', {name: me}));
        log.querySelectorAll('.message').forEach(mark);
      }
    },
    typing(frame) {
      const typing = document.querySelector('#typing');
      typing.replaceChildren(...phrase('typing', {name: frame.user}));
      clearTimeout(typingTimer);
      typingTimer = setTimeout(() => typing.replaceChildren(), 3000);
    },
    error(frame) { showNotice('error', '⚠', [frame.message]); },
  };

  function connect() {
    const query = new URLSearchParams({since: lastId, epoch: epoch});
    const name = nameInput.value.trim() || me;  // a guest keeps its name when reconnecting
    if (name) query.set('name', name);
    chatSocket = new WebSocket(
      (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host +
      prefix + 'ws/chat/' + encodeURIComponent(roomName) + '/?' + query
    );
    chatSocket.onmessage = function (e) {
      const frame = JSON.parse(e.data);
      (handlers[frame.type] || handlers.error)(frame);
    };
    chatSocket.onclose = function () {
      online = false;
      if (away) return;
      // Back off (0.5 s, 1 s, 2 s … 8 s) with jitter, so a restarted server is not stampeded.
      const delay = Math.min(8000, 500 * 2 ** retries++) * (0.5 + Math.random() / 2);
      setStatus(wording('reconnecting', {n: Math.ceil(delay / 1000)}));
      setTimeout(connect, delay);
    };
  }

  function send(frame) {
    if (online) chatSocket.send(JSON.stringify(frame));
    else if (frame.message) { outbox.push(frame); setStatus(wording('offline')); }
  }

  // The message box grows with its lines, up to a third of the screen.
  function fitInput() {
    messageInput.style.height = 'auto';
    const borders = messageInput.offsetHeight - messageInput.clientHeight;
    messageInput.style.height = messageInput.scrollHeight + borders + 'px';
  }
  messageInput.focus();
  onEnter(messageInput, () => document.querySelector('#chat-message-submit').click());
  messageInput.oninput = function () {
    fitInput();
    if (Date.now() - lastTyping > {{ typing_interval_ms }}) {
      lastTyping = Date.now();
      send({type: 'typing'});
    }
  };
  document.querySelector('#chat-message-submit').onclick = function () {
    const text = messageInput.value.trimEnd();
    if (!text.trim()) return;
    send({message: text});
    lastTyping = 0;
    messageInput.value = '';
    fitInput();
    toBottom();  // whoever writes wants to see the answer
  };
  nameInput.onchange = function () {
    localStorage.setItem('chat-name', nameInput.value.trim());
    if (nameInput.value.trim()) send({type: 'rename', name: nameInput.value.trim()});
  };
  // Leaving the page: leave the room too (a browser may keep the page, socket and
  // all, in case of "back"), and come back if the page is shown again.
  window.addEventListener('pagehide', function () { away = true; chatSocket.close(); });
  window.addEventListener('pageshow', function (event) {
    if (event.persisted) { away = false; connect(); }
  });
  connect();
</script>"""


# Serving: Daphne #############################################################


def serve(args: argparse.Namespace, shared: socket.socket | None = None) -> None:
    """Run Daphne on a socket `shared` by workers, or on its own port (then it says
    where to go)."""
    sock = shared or listen(args.host, args.port)
    port = sock.getsockname()[1]
    if args.host in WILDCARDS:  # the lobby shows where to join, and its QR code
        settings.CHAT_JOIN_URL = join_url(port)

    # Importing Daphne's server installs Twisted's asyncio reactor: only when serving.
    from daphne.server import Server

    skip_autobahn_option_dump()
    # Behind a proxy every connection comes from the proxy: it limits them (README).
    per_address = 0 if args.proxy_headers else 2 * args.max_per_address
    server = guarded(Server, per_address)(
        whole_chat(),
        endpoints=[daphne_endpoint(sock, shared=shared is not None)],
        ready_callable=lambda: serving(server, args.host, port, not shared),
        websocket_max_message_size=MAX_FRAME,
        websocket_max_frame_size=MAX_FRAME,
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_TIMEOUT,
        signal_handlers=False,  # ours (see serving) close the sockets before stopping
        verbosity=0,
        **(PROXY_HEADERS if args.proxy_headers else {}),
    )
    server.run()
    if not server.listening_addresses:  # the port was taken after all (Daphne said so)
        sys.exit(1)


#: What --proxy-headers tells Daphne: the client is the one the proxy names.
PROXY_HEADERS = {
    "proxy_forwarded_address_header": "X-Forwarded-For",
    "proxy_forwarded_port_header": "X-Forwarded-Port",
    "proxy_forwarded_proto_header": "X-Forwarded-Proto",
}


def skip_autobahn_option_dump() -> None:
    """Autobahn pretty-prints its 29 options for a debug line on every connection,
    whether or not anything logs at that level (Daphne, as chat.py runs it, does
    not): 0.14 ms, a tenth of what a connect costs chat.py. The line stays empty."""
    import autobahn.websocket.protocol

    autobahn.websocket.protocol.pformat = lambda value: ""


def serving(server, host: str, port: int, banner: bool) -> None:
    """Daphne is about to serve: finish setting it up, and say where to go."""
    from twisted.internet import reactor, task

    # Autobahn drops a connection it refuses without a word; a close frame says why
    # (1009: a frame over MAX_FRAME; 4008: too slow, after what was queued).
    server.ws_factory.setProtocolOptions(
        failByDrop=False, closeHandshakeTimeout=CATCH_UP_TIME
    )
    task.LoopingCall(close_slow_readers, server).start(1, now=False)

    def on_signal(signum, frame):
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, signal.SIG_IGN)  # already stopping
        reactor.callFromThread(lambda: spawn(shut_down(server, reactor)))

    # (Under --reload, Django's reloader owns the main thread, and Ctrl-C.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    if banner:
        print_banner(host, port)


def listen(host: str, port: int) -> socket.socket:
    """Open the listening socket ourselves (workers share it, a single process checks
    with it): a clear error when the port is taken, and the real port number when
    asked for port 0."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        fail(f"cannot listen on {host}:{port}: {os.strerror(error.errno or 0)}")


def daphne_endpoint(sock: socket.socket, shared: bool) -> str:
    """Where Daphne listens. Workers share our socket, through Daphne's fd: endpoint.
    A single process closes the socket it checked, and Twisted's own tcp: endpoint
    binds that port again: unlike fd:, it needs none of Twisted's plugins, whose
    loading costs 21 ms of startup and 0.9 MB (measured)."""
    if shared:
        return f"fd:fileno={sock.detach()}"
    host, port = sock.getsockname()[:2]
    sock.close()
    interface = host.replace(":", r"\:")  # colons escaped, as endpoint strings want
    return f"tcp:port={port}:interface={interface}"


SPARE_FILES = 50  #: open files kept for everything but client connections


def open_file_limit() -> int:
    """Raise this process's open-file limit as far as the system lets it (often
    from 1,024): each connection is an open file. Returns the limit."""
    try:
        import resource  # (not on Windows)
    except ImportError:
        return 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (hard, 10240):  # (macOS says "unlimited", and allows OPEN_MAX)
        with contextlib.suppress(ValueError, OSError):
            if limit != resource.RLIM_INFINITY and limit > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
                return limit
    return soft


async def shut_down(server, reactor) -> None:
    """Ctrl-C or SIGTERM: every member is told we are going away (1001, so pages
    reconnect to the next server) and leaves its room, so that other processes show
    it gone; then the server stops.

    ASGI's websocket.close cannot say 1001 through Daphne (autobahn's sendClose takes
    1000 or 3000-4999 from applications), so the frame goes out on each of Daphne's
    WebSocket connections directly."""
    for protocol in open_websockets(server):
        protocol.sendCloseFrame(code=1001, reasonUtf8=b"server shutting down")
    deadline = time.monotonic() + SHUTDOWN_GRACE
    while open_sockets and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # each closing handshake ends in disconnect()
    with contextlib.suppress(*store_errors()):
        for room in list(pending_news):
            await send_news(room, pending_news.pop(room))
    for hub in list(hubs.values()):
        await hub.stop()
    reactor.stop()


def close_slow_readers(server) -> None:
    """A browser whose send buffer stays full (Twisted pauses the connection's
    producer) for SLOW_READER_GRACE is too far behind: it is closed (4008) behind
    what was queued for it, and gets no more. Its page reads the rest, then
    reconnects with since= and loses nothing."""
    now = time.monotonic()
    for protocol in open_websockets(server):
        if not protocol.transport.producerPaused:
            behind_since.pop(protocol, None)
        elif now - behind_since.setdefault(protocol, now) > SLOW_READER_GRACE:
            protocol.sendClose(code=CLOSE_TOO_SLOW, reason="too far behind, resume")


def open_websockets(server) -> list:
    """Daphne's open WebSocket connections (autobahn protocols)."""
    from daphne.ws_protocol import WebSocketProtocol

    return [
        protocol
        for protocol in list(server.connections)
        if isinstance(protocol, WebSocketProtocol)
        and protocol.state == protocol.STATE_OPEN
    ]


# Serving: the door ###########################################################
# What a connection may make the server read, before Daphne reads it.


class GuardedConnection(ProtocolWrapper):
    """A connection whose every HTTP request is looked at before Twisted reads it:
    Twisted reads a whole body (past 100 KB into a temporary file) before Daphne
    hands the request to Django, so a body is refused here, unread. Only GET and
    HEAD pass (405), with at most MAX_BODY bytes of body (413). Once it is a
    WebSocket, its frames go straight on: autobahn limits them (MAX_FRAME)."""

    def __init__(self, factory: "Guard", wrapped) -> None:
        super().__init__(factory, wrapped)
        self.head = b""  # the start of a request not yet looked at
        self.body_left = 0  # bytes of an allowed body still to come
        self.websocket = False

    def makeConnection(self, transport) -> None:
        super().makeConnection(transport)
        self.address = transport.getPeer().host
        per_address = self.factory.per_address
        per_address[self.address] += 1
        if self.factory.cap and per_address[self.address] > self.factory.cap:
            self.refuse(429, "Too Many Requests")

    def connectionLost(self, reason) -> None:
        per_address = self.factory.per_address
        per_address[self.address] -= 1
        if not per_address[self.address]:
            del per_address[self.address]
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self.websocket:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:
            return  # refused: what follows is not read
        data, self.head = self.head + data, b""
        checked = 0  # data[:checked] may be read
        while checked < len(data) and not self.websocket:
            if self.body_left:
                step = min(self.body_left, len(data) - checked)
                checked, self.body_left = checked + step, self.body_left - step
                continue
            end = data.find(b"\r\n\r\n", checked)
            if end < 0:
                self.head = data[checked:]
                if len(self.head) > MAX_HEAD:
                    return self.refuse(431, "Request Header Fields Too Large")
                break
            refusal = self.look_at(data[checked:end])
            if refusal:
                return self.refuse(*refusal)
            checked = end + 4
        self.wrappedProtocol.dataReceived(data if self.websocket else data[:checked])

    def look_at(self, head: bytes) -> tuple[int, str] | None:
        """Why a request (line and headers) is refused, or None; notes its body."""
        method, _, _ = head.partition(b" ")
        if method not in (b"GET", b"HEAD"):
            return 405, "Method Not Allowed"
        for line in head.lower().split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip(), value.strip()
            if name == b"transfer-encoding":
                return 413, "Content Too Large"  # a body of unknown length
            if name == b"content-length":
                if not value.isdigit() or len(value) > 9 or int(value) > MAX_BODY:
                    return 413, "Content Too Large"
                self.body_left = int(value)
            if name == b"upgrade" and value == b"websocket":
                self.websocket = True
        return None

    def refuse(self, status: int, reason: str) -> None:
        peer = self.transport.getPeer()
        log(f"refused {peer.host}:{peer.port}: HTTP {status} {reason}")
        body = f"{reason}\n".encode()
        allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"{allow}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        self.loseConnection()


class Guard(WrappingFactory):
    """Daphne's HTTP factory, its connections guarded, at most `cap` from one
    address (0: no cap) so that slow requests cannot take every socket either."""

    protocol = GuardedConnection

    def __init__(self, factory, cap: int) -> None:
        super().__init__(factory)
        self.cap, self.per_address = cap, Counter()


def guarded(server_class, cap: int):
    """Daphne's Server, listening through a Guard: Daphne listens with whatever its
    `http_factory` holds when it starts, so here that is the factory, wrapped."""

    class GuardedServer(server_class):
        @property
        def http_factory(self) -> Guard:
            return self.guard

        @http_factory.setter
        def http_factory(self, factory) -> None:
            self.guard = Guard(factory, cap)

    return GuardedServer


# Serving: workers, and from a program ########################################


def run_workers(args: argparse.Namespace) -> None:
    """--workers N: N Daphne processes accept from one socket (the kernel spreads
    the connections) and share the rooms through Redis. Ctrl-C stops them all."""
    sock = listen(args.host, args.port)
    if sock.family != socket.AF_INET:
        fail("--workers listens on IPv4 addresses only")
    port, workers = sock.getsockname()[1], []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:  # a worker
            serve(args, sock)
            os._exit(0)
        workers.append(pid)
    sock.close()
    print_banner(args.host, port, args.workers)

    def stop_workers(signum, frame):
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop_workers)
    signal.signal(signal.SIGTERM, stop_workers)
    for pid in workers:
        os.waitpid(pid, 0)


def in_an_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Running:
    """A chat of its own, in a child process (Twisted's reactor runs once per
    process): `url`, then `stop()`; or `with chat.start() as server:`."""

    def __init__(self, flags: tuple[str, ...]) -> None:
        command = [sys.executable, os.path.abspath(__file__), *flags]
        if "--port" not in flags:
            command += ["--port", "0"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: deque[str] = deque(maxlen=200)  # its last lines, as they come
        urls = []
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("chat.py: open "):
                urls.append(line.split()[-1].removesuffix("/chat/"))
            if line.startswith("chat.py: room for"):  # the banner's last line
                break
        if not urls:
            self.process.wait()
            raise RuntimeError("".join(self.output).strip() or "chat.py did not start")
        loopback = [url for url in urls if "//127." in url or "//[::1]" in url]
        self.url = (loopback or urls)[0]
        lines = [self.process.stdout]
        reader = threading.Thread(target=self.output.extend, args=lines, daemon=True)
        reader.start()  # (a child whose output nobody reads would stop at a full pipe)

    def stop(self, timeout: float = 10) -> int:
        """Stop it as Ctrl-C does (every socket gets 1001); its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exception) -> None:
        self.stop()


def start(*flags: str) -> Running:
    """A chat that serves as soon as this returns, at `.url` (a free port unless
    --port is among the flags), until `.stop()`: for tests, notebooks, programs."""
    return Running(flags)


# Command line ################################################################


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        fail(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="chat.py", description="A real-time chat: lobby, rooms and WebSockets."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=8000, help="port (0 picks a free one)"
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get("REDIS_URL"),
        help="share rooms through this Redis (default: $REDIS_URL, else in memory)",
    )
    parser.add_argument(
        "--allowed-host",
        metavar="NAME",
        action="append",
        default=[],
        help="one more host name to answer to, e.g. behind a proxy (repeatable)",
    )
    parser.add_argument(
        "--rate-limit",
        metavar="N",
        type=float,
        default=RATE_LIMIT,
        help=f"frames a second per connection, 0 for no limit (default {RATE_LIMIT})",
    )
    parser.add_argument(
        "--max-per-address",
        metavar="N",
        type=int,
        default=MAX_PER_ADDRESS,
        help="WebSockets open from one client address, 0 for no cap"
        f" (default {MAX_PER_ADDRESS})",
    )
    parser.add_argument(
        "--debug", action="store_true", help="Django's DEBUG: tracebacks in pages"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no log line per arrival and departure"
    )
    parser.add_argument(
        "--reload", action="store_true", help="restart when chat.py is saved"
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=1,
        help="serve with N processes sharing one port (needs --redis)",
    )
    parser.add_argument(
        "--proxy-headers",
        action="store_true",
        help="behind a proxy: take client addresses from X-Forwarded-For",
    )
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(f"chat.py: {message}", file=sys.stderr)
    raise SystemExit(1)


def check_redis(redis_url: str) -> None:
    try:
        client = redis_client(
            redis_url, asynchronous=False, socket_connect_timeout=3, socket_timeout=3
        )
        version = client.info("server")["redis_version"]
    except (*store_errors(), ValueError) as error:
        why = str(error).split(" : <")[0]  # (a sentinel's error ends with a long repr)
        fail(f"cannot reach Redis at {redis_url}: {why}")
    if int(version.split(".")[0]) < 7:  # (the scripts' "#!lua" line is Redis 7's)
        fail(f"chat.py needs Redis 7 or later; {redis_url} is Redis {version}")


WILDCARDS = ("0.0.0.0", "::", "")  #: hosts that mean every address: workshop mode


def join_url(port: int) -> str:
    """Workshop mode: the address people in the room should open (the banner's first)."""
    return f"http://{machine_addresses()[0]}:{port}/chat/"


@functools.cache
def qr_code(url: str):
    import segno  # (only in workshop mode)

    return segno.make(url, error="m")


def print_banner(host: str, port: int, workers: int = 1) -> None:
    """Where to open the chat: with a wildcard host (workshop mode), every address
    of this machine, so that people in the room can type one in, and a QR code of
    the first, for phones."""
    wildcard = host in WILDCARDS
    hosts = machine_addresses() if wildcard else [f"[{host}]" if ":" in host else host]
    for shown in hosts:
        print(f"chat.py: open http://{shown}:{port}/chat/", flush=True)
    redis_url = knob("REDIS_URL", None)
    layer = f"Redis at {redis_url}" if redis_url else "in memory"
    processes = f", {workers} worker processes" if workers > 1 else ""
    print(f"chat.py: channel layer: {layer}{processes}. Ctrl-C stops.", flush=True)
    rate, cap = knob("RATE_LIMIT", RATE_LIMIT), knob("MAX_PER_ADDRESS", MAX_PER_ADDRESS)
    print(
        f"chat.py: limits: {f'{rate:g} frames/s' if rate else 'no rate limit'}"
        f" per connection and address, {cap or 'any number of'} sockets an address,"
        f" {MAX_MESSAGE} characters a message, {HISTORY_SIZE} messages of history a room",
        flush=True,
    )
    files = open_file_limit()
    print(
        f"chat.py: room for about {files - SPARE_FILES:,} connections a process"
        f" (open-file limit {files:,})",
        flush=True,
    )
    if wildcard:
        print(f"chat.py: people in the room can scan this to open {join_url(port)}")
        qr_code(join_url(port)).terminal(compact=True)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """Exactly `python chat.py ...`: serve until stopped. (A program that goes on
    while a chat runs beside it wants start().)"""
    global main_ran
    if main_ran or in_an_event_loop():
        # Twisted's reactor runs once per process, and not inside another loop.
        fail("main() runs once per process, outside any event loop: use chat.start()")
    main_ran = True
    args = parse_args(argv)
    open_file_limit()  # (raised before workers or the reloader's server start)
    if not settings.configured:
        configure_alone()
    use_redis(args.redis)
    if args.workers > 1 and not args.redis:
        fail("--workers needs --redis: that is how the workers share rooms")
    if args.redis:
        check_redis(args.redis)
    settings.CHAT_HOSTS += [args.host.lower(), *(h.lower() for h in args.allowed_host)]
    settings.CHAT_RATE_LIMIT = args.rate_limit
    settings.CHAT_MAX_PER_ADDRESS = args.max_per_address
    settings.DEBUG = args.debug
    settings.CHAT_QUIET = args.quiet
    if args.reload:
        # Django's autoreloader: a child process serves, and is started afresh
        # whenever a loaded file (chat.py above all) is saved.
        autoreload.run_with_reloader(serve, args)
    elif args.workers > 1:
        run_workers(args)
    else:
        serve(args)


if __name__ == "__main__":
    main()
