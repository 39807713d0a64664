# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "Django>=4.2,<6.1",
#     "channels>=4.2,<5",
#     "daphne>=4.2.2,<5",
#     "channels-redis>=4.2,<5",
# ]
# ///
"""chat.py — a real-time chat in one file: Django + Channels + Daphne.

    pip install -r requirements.txt && python chat.py      # then open the URL it prints
    pip install -r requirements.txt pytest pytest-asyncio selenium websockets && python -m pytest

A lobby at /chat/, rooms at /chat/<room>/, each room's WebSocket at /ws/chat/<room>/.
It needs no database and no Redis: rooms live in Channels' in-memory layer. Give it a Redis
URL (--redis URL or REDIS_URL) and any number of chat.py processes share the same rooms.
`daphne chat:application` serves it too.
"""

# Imports #####################################################################

import argparse
import hashlib
import os
import secrets
import socket
import sys
import time
import unicodedata

import django
import redis
import redis.asyncio
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import Http404, HttpResponse, JsonResponse
from django.template import engines
from django.urls import path, re_path
from django.views.generic import RedirectView

# Configuration ###############################################################

MAX_MESSAGE = 2000  #: characters per chat message
MAX_ROOM_NAME = 100  #: characters per room name
CHANNEL_CAPACITY = 100  #: messages a member's channel holds before the layer drops more

#: How chat.py talks to Redis. channels-redis waits in BZPOPMIN for 5 s at a time, so a
#: socket timeout of 5 s or less (redis-py 8's default) kills every idle member with a
#: TimeoutError (channels_redis#422); a health check notices a dead server all the same.
REDIS_OPTIONS = {
    "socket_timeout": 15,
    "socket_connect_timeout": 5,
    "socket_keepalive": True,
    "health_check_interval": 10,
}


def channel_layers(redis_url: str | None) -> dict:
    """Channels' in-process layer by default; channels-redis when given a Redis URL."""
    if not redis_url:
        backend = {"BACKEND": "channels.layers.InMemoryChannelLayer"}
        backend["CONFIG"] = {"capacity": CHANNEL_CAPACITY}
    else:
        backend = {"BACKEND": "channels_redis.core.RedisChannelLayer"}
        hosts = [{"address": redis_url, **REDIS_OPTIONS}]
        backend["CONFIG"] = {"hosts": hosts, "capacity": CHANNEL_CAPACITY}
    return {"default": backend}


def use_redis(redis_url: str | None) -> None:
    """Switch the channel layer before serving (the command line's --redis)."""
    settings.CHAT_REDIS_URL = redis_url
    settings.CHANNEL_LAYERS = channel_layers(redis_url)


if not settings.configured:
    settings.configure(
        DEBUG=False,
        # A fresh key per start is fine: nothing signed outlives the process.
        SECRET_KEY=os.environ.get("CHAT_SECRET_KEY") or secrets.token_urlsafe(50),
        ALLOWED_HOSTS=["127.0.0.1", "localhost", "[::1]"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[
            "django.middleware.security.SecurityMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.clickjacking.XFrameOptionsMiddleware",
        ],
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates"}],
        CHAT_REDIS_URL=os.environ.get("REDIS_URL") or None,
        CHANNEL_LAYERS=channel_layers(os.environ.get("REDIS_URL")),
    )
    django.setup()


# Templates ###################################################################

STYLE = """
  :root { color-scheme: light dark; --accent: #0b63ce; --muted: #667; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 1.15rem/1.5 system-ui, sans-serif; }
  main { max-width: 52rem; margin: 0 auto; padding: 1rem; display: flex;
         flex-direction: column; gap: .6rem; height: 100dvh; }
  h1 { margin: 0; font-size: 1.6rem; }
  input, button, textarea { font: inherit; }
  input[type=text] { flex: 1; min-width: 0; padding: .5rem .7rem; }
  input[type=button] { padding: .5rem 1.2rem; background: var(--accent); color: #fff;
                       border: 0; border-radius: .4rem; cursor: pointer; }
  .row { display: flex; gap: .5rem; }
  #chat-log { flex: 1; width: 100%; resize: none; padding: .7rem; }
  #status { color: var(--muted); font-size: 1rem; }
  @media (prefers-color-scheme: dark) { :root { --accent: #3b8bf0; --muted: #aab; } }
"""

LOBBY_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Chat rooms</title>
<style>{{ style }}</style>
</head>
<body>
<main>
  <h1>Chat rooms</h1>
  <label for="room-name-input">What chat room would you like to enter?</label>
  <div class="row">
    <input id="room-name-input" type="text" maxlength="100" autocomplete="off">
    <input id="room-name-submit" type="button" value="Enter">
  </div>
</main>
<script>
  const roomInput = document.querySelector('#room-name-input');
  roomInput.focus();
  roomInput.onkeyup = function (e) {
    if (e.key === 'Enter') document.querySelector('#room-name-submit').click();
  };
  document.querySelector('#room-name-submit').onclick = function () {
    const roomName = roomInput.value.trim();
    if (roomName) window.location.pathname = '/chat/' + encodeURIComponent(roomName) + '/';
  };
</script>
</body>
</html>
"""

ROOM_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ room_name }} · chat</title>
<style>{{ style }}</style>
</head>
<body>
<main>
  <h1>{{ room_name }}</h1>
  <div id="status" role="status">connecting…</div>
  <label for="chat-log" class="row">Messages</label>
  <textarea id="chat-log" readonly aria-live="polite"></textarea>
  <div class="row">
    <label for="chat-message-input" hidden>Message</label>
    <input id="chat-message-input" type="text" maxlength="{{ max_message }}" autocomplete="off"
           placeholder="Type a message, press Enter">
    <input id="chat-message-submit" type="button" value="Send">
  </div>
</main>
{{ room_name|json_script:"room-name" }}
<script>
  const roomName = JSON.parse(document.getElementById('room-name').textContent);
  const log = document.querySelector('#chat-log');
  const status = document.querySelector('#status');
  const messageInput = document.querySelector('#chat-message-input');

  const chatSocket = new WebSocket(
    (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host +
    '/ws/chat/' + encodeURIComponent(roomName) + '/'
  );
  chatSocket.onopen = function () { status.textContent = 'connected'; };
  chatSocket.onclose = function () { status.textContent = 'disconnected — reload to rejoin'; };

  // Every server frame carries a readable "message"; errors are marked as such.
  chatSocket.onmessage = function (e) {
    const data = JSON.parse(e.data);
    const line = data.type === 'error' ? '⚠ ' + data.message : data.message;
    log.value += line + '\\n';
    log.scrollTop = log.scrollHeight;
  };

  messageInput.focus();
  messageInput.onkeyup = function (e) {
    if (e.key === 'Enter') document.querySelector('#chat-message-submit').click();
  };
  document.querySelector('#chat-message-submit').onclick = function () {
    if (!messageInput.value.trim() || chatSocket.readyState !== WebSocket.OPEN) return;
    chatSocket.send(JSON.stringify({message: messageInput.value}));
    messageInput.value = '';
  };
</script>
</body>
</html>
"""

lobby_template = engines["django"].from_string(LOBBY_PAGE)
room_template = engines["django"].from_string(ROOM_PAGE)

# Rooms #######################################################################


def is_valid_room(name: str) -> bool:
    """1-100 letters (any script, with their marks), digits, '_' or '-'."""
    return 0 < len(name) <= MAX_ROOM_NAME and all(
        ch in "_-" or unicodedata.category(ch)[0] in "LMN" for ch in name
    )


def group_name(room: str) -> str:
    """Channels group names must be short ASCII: hash the room's exact name.

    Hashing keeps look-alike names ('cafe' with a Cyrillic 'с', or 'é' vs 'e') apart.
    """
    return "room." + hashlib.sha256(room.encode()).hexdigest()[:32]


# HTTP views ##################################################################


def lobby(request):
    return HttpResponse(lobby_template.render({"style": STYLE}))


def room(request, room_name: str):
    if not is_valid_room(room_name):
        raise Http404("No such room")
    context = {"style": STYLE, "room_name": room_name, "max_message": MAX_MESSAGE}
    return HttpResponse(room_template.render(context))


async def healthz(request):
    """200 while the channel layer works, 503 when its Redis is unreachable."""
    redis_url = settings.CHAT_REDIS_URL
    reachable = await redis_answers(redis_url) if redis_url else True
    body = {
        "status": "ok" if reachable else "unavailable",
        "layer": "redis" if redis_url else "memory",
        "pid": os.getpid(),
    }
    return JsonResponse(body, status=200 if reachable else 503)


async def redis_answers(redis_url: str) -> bool:
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2)
    try:
        return await client.ping()
    except (redis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


urlpatterns = [
    path("", RedirectView.as_view(url="/chat/")),
    path("chat/", lobby),
    path("chat/<str:room_name>/", room),
    path("healthz", healthz),
]

# The consumer ################################################################


def message_frame(text: str) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"type": "message", "message": text, "ts": now}


def error_frame(why: str) -> dict:
    return {"type": "error", "message": why}


class Refused(Exception):
    """A client frame the server will not relay; its text says why."""


def message_text(content) -> str:
    """The text of a client's {"message": ...} frame, or Refused saying what is wrong."""
    text = content.get("message") if isinstance(content, dict) else None
    if not isinstance(text, str):
        raise Refused('expected a JSON object like {"message": "hello"}')
    if not text.strip():
        raise Refused("empty message")
    if len(text) > MAX_MESSAGE:
        raise Refused(f"message longer than {MAX_MESSAGE} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        raise Refused("message contains control characters")
    return text


class ChatConsumer(AsyncJsonWebsocketConsumer):
    room_group_name: str | None = None

    async def connect(self):
        self.room_name = self.scope["url_route"]["kwargs"].get("room_name", "")
        if not is_valid_room(self.room_name):
            await self.close()  # before accept(): the handshake is refused (403)
            return
        self.room_group_name = group_name(self.room_name)
        await self.channel_layer.group_add(self.room_group_name, self.channel_name)
        await self.accept()

    async def disconnect(self, close_code):
        if self.room_group_name:
            await self.channel_layer.group_discard(
                self.room_group_name, self.channel_name
            )

    # Frames from the browser: anything malformed is answered, never relayed.
    async def receive(self, text_data=None, bytes_data=None):
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
        try:
            text = message_text(content)
        except Refused as why:
            await self.send_json(error_frame(str(why)))
            return
        await self.channel_layer.group_send(
            self.room_group_name, {"type": "chat.message", "frame": message_frame(text)}
        )

    # Events from the room's group, one per message, for every member.
    async def chat_message(self, event):
        await self.send_json(event["frame"])


# Routing and application #####################################################

websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<room_name>[^/]+)/$", ChatConsumer.as_asgi()),
    # Any other path reaches the consumer without a room, and is refused there.
    re_path(r"", ChatConsumer.as_asgi()),
]

application = ProtocolTypeRouter(
    {
        "http": get_asgi_application(),
        # The browser's Origin header must name one of ALLOWED_HOSTS: other sites'
        # pages cannot open a socket in the name of a visitor.
        "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
    }
)

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
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(f"chat.py: {message}", file=sys.stderr)
    raise SystemExit(1)


def check_redis(redis_url: str) -> None:
    try:
        redis.Redis.from_url(
            redis_url, socket_connect_timeout=3, socket_timeout=3
        ).ping()
    except (redis.RedisError, OSError, ValueError) as error:
        fail(f"cannot reach Redis at {redis_url}: {error}")


def listen(host: str, port: int) -> socket.socket:
    """Open the listening socket ourselves: a clear error when the port is taken,
    and the real port number when asked for port 0."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        fail(f"cannot listen on {host}:{port}: {os.strerror(error.errno or 0)}")


def daphne_endpoint(sock: socket.socket) -> str:
    """Hand our socket to Daphne. Its fd: endpoint adopts IPv4 sockets only, so an
    IPv6 one is closed and its (now known) port given to Daphne to bind again."""
    if sock.family == socket.AF_INET:
        return f"fd:fileno={sock.detach()}"
    host, port = sock.getsockname()[:2]
    sock.close()
    interface = host.replace(":", r"\:")  # colons escaped, as endpoint strings want
    return f"tcp6:port={port}:interface={interface}"


def print_banner(url: str) -> None:
    redis_url = settings.CHAT_REDIS_URL
    layer = f"Redis at {redis_url}" if redis_url else "in memory"
    print(f"chat.py: open {url}", flush=True)
    print(f"chat.py: channel layer: {layer}. Ctrl-C stops.", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    use_redis(args.redis)
    if args.redis:
        check_redis(args.redis)
    host = f"[{args.host}]" if ":" in args.host else args.host
    if host not in settings.ALLOWED_HOSTS:
        settings.ALLOWED_HOSTS.append(host)
    sock = listen(args.host, args.port)
    url = f"http://{host}:{sock.getsockname()[1]}/chat/"

    # Importing Daphne's server installs Twisted's asyncio reactor: only when serving.
    from daphne.server import Server

    server = Server(
        application,
        endpoints=[daphne_endpoint(sock)],
        ready_callable=lambda: print_banner(url),
        verbosity=0,
    )
    server.run()


if __name__ == "__main__":
    main()
