"""``tidings`` command line (SPEC 4). Every option also reads ``TIDINGS_<OPTION>``."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tidings._version import __version__

__all__ = ["main"]

log = logging.getLogger("tidings.cli")


def _env(option: str, default: Any = None) -> Any:
    return os.environ.get("TIDINGS_" + option.upper().replace("-", "_"), default)


def _add(parser: argparse.ArgumentParser, option: str, help: str, default: Any = None,
         type: Any = str) -> None:
    env = _env(option)
    parser.add_argument(
        f"--{option}", type=type, default=type(env) if env is not None else default,
        help=f"{help} [env TIDINGS_{option.upper().replace('-', '_')}]",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidings", description="Real-time channels server.")
    parser.add_argument("--version", action="version", version=f"tidings {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the standalone server")
    _add(serve, "host", "interface to bind", "127.0.0.1")
    _add(serve, "port", "port to bind", 8000, int)
    _add(serve, "broker", "broker URL (default: memory://, one process)", None)
    _add(serve, "workers", "worker processes", 1, int)
    _add(serve, "api-key", "admin key required by the HTTP API", None)
    _add(serve, "api-key-publish", "HTTP API key allowed only publish and broadcast", None)
    _add(serve, "jwt-secret", "HS256 secret; connections then need a JWT", None)
    _add(serve, "jwt-algorithm", "pinned JWT algorithm: HS256/384/512, RS256/384/512, "
         "ES256/384/512", "HS256")
    _add(serve, "jwt-public-key", "PEM file of the RS*/ES* public key (auth on)", None)
    _add(serve, "jwt-jwks", "JWKS file; the token's kid picks the key (auth on)", None)
    _add(serve, "jwt-leeway", "seconds of clock skew allowed on exp/nbf", 5.0, float)
    _add(serve, "admins", "comma list of users allowed wide wildcards and private channels",
         None)
    _add(serve, "allowed-origins", "comma list of browser origins allowed to open websockets",
         None)
    _add(serve, "max-connections-per-user", "0: unlimited", 0, int)
    _add(serve, "max-connections-per-ip", "0: unlimited", 0, int)
    _add(serve, "max-subscriptions", "subscriptions per connection", 1000, int)
    _add(serve, "rate", "frames per second per connection (0: off)", 0.0, float)
    _add(serve, "config", "TOML or JSON file with any of these options and history rules", None)
    _add(serve, "history-size", "publications kept per channel (0: off)", 1000, int)
    _add(serve, "history-ttl", "seconds publications are kept (0: off)", 600.0, float)
    _add(serve, "overflow", "slow-client policy: disconnect or drop", "disconnect")
    _add(serve, "log-level", "debug, info, warning, error", "info")
    _add(serve, "server", "HTTP/websocket server: tidings (built in, fastest) or uvicorn",
         "tidings")
    _add(serve, "loop", "event loop: auto (uvloop when installed), asyncio or uvloop", "auto")

    pub = sub.add_parser("publish", help="publish one JSON value through the HTTP API")
    pub.add_argument("channel")
    pub.add_argument("data", help="a JSON value (plain text is sent as a string)")
    _add(pub, "url", "server base URL", "http://127.0.0.1:8000")
    _add(pub, "api-key", "HTTP API key", None)

    subs = sub.add_parser("subscribe", help="print each publication as one JSON line")
    subs.add_argument("pattern")
    _add(subs, "url", "server base URL", "http://127.0.0.1:8000")

    migrate = sub.add_parser("migrate", help="create the broker's tables if missing "
                             "(postgresql://; idempotent, also done on first use)")
    _add(migrate, "broker", "broker URL", "memory://")

    for name, what in (("asyncapi", "print the AsyncAPI 3 document of the wire protocol"),
                       ("typescript", "print TypeScript types of every frame")):
        schema_cmd = sub.add_parser(name, help=what)
        schema_cmd.add_argument("--app", default=None, metavar="MODULE:HUB",
                                help="also the typed channels of this hub (hub.channel)")

    bench = sub.add_parser(
        "bench", help="tidings side by side with its peers (benchmarks/compare.py)",
        epilog="Any other option goes to benchmarks.compare as it is (--rounds, "
               "--latency-read, --loadgen-policy, ...: python -m benchmarks.compare --help).")
    bench.add_argument("--quick", action="store_true", help="a run of under a minute")
    bench.add_argument("--subscribers", type=int, nargs="*", default=None)
    bench.add_argument("--stacks", nargs="*", default=None,
                       help="stacks or groups (peers, brokers, quick) to run (default peers)")
    bench.add_argument("--huge", action="store_true", help="also 50,000 idle connections")
    bench.add_argument("--json", dest="json_out", default=None, help="write results here")
    bench.add_argument("--repeat", type=int, default=1, metavar="K",
                       help="run each phase K times, keep the best (losses never hidden)")
    bench.add_argument("--publisher", choices=["batched", "single", "both"], default="batched",
                       help="32 frames a write (batched), one frame a write (single), or both")
    return parser


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    file = Path(path)
    try:
        text = file.read_text("utf-8")
        data = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"tidings: cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"tidings: config {path} must hold a table/object")
    return data


def _serve(args: argparse.Namespace) -> int:
    from tidings.core.config import HistoryRule, Limits
    from tidings.hub import Hub
    from tidings.server.lean import loop_factory
    from tidings.server.runner import SERVERS, run

    config = _load_config(args.config)
    for key, value in config.items():
        attr = key.replace("-", "_")
        if attr not in ("history", "permissions", "channels") and hasattr(args, attr):
            setattr(args, attr, value)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tidings.security.redact import install

    install(secrets=[s for s in (args.api_key, args.api_key_publish, args.jwt_secret) if s])
    if args.workers < 1:
        raise SystemExit("tidings: --workers must be >= 1")
    if args.server not in SERVERS:
        raise SystemExit(f"tidings: --server must be one of {', '.join(SERVERS)}")
    try:
        loop_factory(args.loop)  # refuses an unknown loop, or uvloop when missing
    except ValueError as exc:
        raise SystemExit(f"tidings: --loop: {exc}") from None
    if args.overflow not in ("disconnect", "drop"):
        raise SystemExit("tidings: --overflow must be 'disconnect' or 'drop'")
    try:
        rules = [HistoryRule(r["pattern"], int(r["size"]), float(r["ttl"]))
                 for r in config.get("history", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise SystemExit(f"tidings: bad [[history]] rule in config: {exc}") from None
    auth = _authenticator(args)
    _warn_exposed(args.host, auth is not None, bool(args.api_key))
    settings: dict[str, Any] = {
        "history_size": args.history_size, "history_ttl": args.history_ttl,
        "history_rules": rules,
        "limits": Limits(overflow=args.overflow, rate=args.rate or None,
                         max_subscriptions=args.max_subscriptions,
                         max_connections_per_user=args.max_connections_per_user,
                         max_connections_per_ip=args.max_connections_per_ip),
        "api_key": args.api_key, "api_key_publish": args.api_key_publish, "auth": auth,
        "rules": _permission_rules(config), "admins": _list(args.admins),
        "allowed_origins": _list(args.allowed_origins),
        "channels": _channel_schemas(config, args.config),
    }
    if args.workers > 1:  # each worker is a node; the supervisor runs the relay
        from tidings.server.supervisor import run_workers

        try:
            return run_workers(settings, host=args.host, port=args.port, workers=args.workers,
                               broker=args.broker, log_level=args.log_level.lower(),
                               server=args.server, loop=args.loop)
        except (ValueError, TypeError, ImportError, OSError) as exc:
            raise SystemExit(f"tidings: {exc}") from None
    try:
        hub = Hub(args.broker or "memory://", **settings)
    except (ValueError, ImportError) as exc:
        raise SystemExit(f"tidings: {exc}") from None
    run(hub, host=args.host, port=args.port, log_level=args.log_level.lower(),
        server=args.server, loop=args.loop)
    return 0


def _list(value: Any) -> list[str]:
    """A comma list from the command line, or a list from the config file."""
    if not value:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def _authenticator(args: argparse.Namespace) -> Any:
    """A JWTAuth when any --jwt-* key source is given, else None (anonymous)."""
    if not (args.jwt_secret or args.jwt_public_key or args.jwt_jwks):
        return None
    from tidings.security.auth import JWTAuth

    try:
        public_key = Path(args.jwt_public_key).read_bytes() if args.jwt_public_key else None
        return JWTAuth(args.jwt_secret or None, algorithm=args.jwt_algorithm,
                       public_key=public_key, jwks=args.jwt_jwks or None,
                       leeway=args.jwt_leeway)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"tidings: JWT configuration: {exc}") from None


def _channel_schemas(config: dict[str, Any], path: str | None) -> list[tuple[str, Any]]:
    """``[[channels]] pattern = "orders/+"  schema = "order.schema.json"`` (a
    path relative to the config file, or the schema itself as a table):
    JSON Schemas every publish on a matching channel must satisfy."""
    from tidings.core.channels import JsonSchema, JsonSchemaChecker

    tables = config.get("channels", [])
    if not isinstance(tables, list):
        raise SystemExit("tidings: 'channels' in the config must be a list of tables")
    folder = Path(path).parent if path else Path()
    declared: list[tuple[str, Any]] = []
    for table in tables:
        try:
            if (not isinstance(table, dict) or set(table) - {"pattern", "schema", "name"}
                    or not {"pattern", "schema"} <= set(table)):
                raise ValueError("each needs 'pattern' and 'schema' (and maybe 'name'), "
                                 f"not {table!r:.200}")
            pattern, schema = str(table["pattern"]), table["schema"]
            name = table.get("name")
            if isinstance(schema, str):
                declared_type = JsonSchema.load(folder / schema, name)
            elif isinstance(schema, dict):
                declared_type = JsonSchema(schema, name)
            else:
                raise ValueError("'schema' must be a file name or a table")
            JsonSchemaChecker(pattern, declared_type)  # a bad schema stops the start, here
        except (ValueError, ImportError) as exc:
            raise SystemExit(f"tidings: bad [[channels]] entry in config: {exc}") from None
        declared.append((pattern, declared_type))
    return declared


def _permission_rules(config: dict[str, Any]) -> list[Any]:
    from tidings.core.permissions import Rule

    tables = config.get("permissions", [])
    if not isinstance(tables, list):
        raise SystemExit("tidings: 'permissions' in the config must be a list of tables")
    try:
        return [Rule.from_dict(t) for t in tables]
    except (TypeError, ValueError, AttributeError) as exc:
        raise SystemExit(f"tidings: bad [[permissions]] rule in config: {exc}") from None


def _warn_exposed(host: str, auth: bool, api_key: bool) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return
    if not auth:
        log.warning("binding %s with no authentication: anyone who can reach this "
                    "address can subscribe and publish (see --jwt-secret)", host)
    if not api_key:
        log.warning("binding %s with no --api-key: anyone who can reach this address "
                    "can call the HTTP API", host)


def _publish(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError:
        data = args.data
    body = json.dumps({"channel": args.channel, "data": data}).encode()
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["X-API-Key"] = args.api_key
    request = urllib.request.Request(args.url.rstrip("/") + "/api/publish", data=body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"tidings: HTTP {exc.code}: {exc.read().decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"tidings: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if "error" in reply:
        print(f"tidings: {reply['error']}", file=sys.stderr)
        return 1
    print(json.dumps(reply["result"]))
    return 0


def _ws_url(base: str) -> str:
    base = base.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):] + "/ws"
    if base.startswith("http://"):
        return "ws://" + base[len("http://"):] + "/ws"
    return base + "/ws"


async def _subscribe_loop(url: str, pattern: str) -> None:
    from tidings.client.client import Client

    async with Client(url) as client, client.subscribe(pattern) as subscription:
        async for pub in subscription:
            print(json.dumps({"type": "publication", **pub.to_dict()}), flush=True)


def _subscribe(args: argparse.Namespace) -> int:
    try:
        asyncio.run(_subscribe_loop(_ws_url(args.url), args.pattern))
    except KeyboardInterrupt:
        return 0
    return 0


def _bench(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    sys.path.insert(0, os.getcwd())  # benchmarks/ lives in the source checkout
    try:
        from benchmarks import compare
    except ImportError:
        print("tidings bench: run it from a source checkout (benchmarks/ is not installed)"
              " with the bench extra (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    argv = ["--quick"] if args.quick else []
    if args.subscribers:
        argv += ["--subscribers", *map(str, args.subscribers)]
    if args.stacks:
        argv += ["--stacks", *args.stacks]
    if args.huge:
        argv.append("--huge")
    if args.json_out:
        argv += ["--json", args.json_out]
    if args.repeat != 1:
        argv += ["--repeat", str(args.repeat)]
    if args.publisher != "batched":
        argv += ["--publisher", args.publisher]
    result: int = compare.main([*argv, *extra])  # compare refuses what it does not know
    return result


def _migrate(url: str) -> int:
    from tidings.brokers import create_broker
    from tidings.exceptions import BrokerError

    broker = create_broker(url)
    migrate = getattr(broker, "migrate", None)
    if migrate is None:
        print("nothing to create: this broker keeps no schema")
        return 0
    try:
        asyncio.run(migrate())
    except BrokerError as exc:
        print(f"tidings migrate: {exc}", file=sys.stderr)
        return 1
    print("schema ready")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":  # only bench passes options on
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "serve":
        return _serve(args)
    if args.command == "publish":
        return _publish(args)
    if args.command == "subscribe":
        return _subscribe(args)
    if args.command == "bench":
        return _bench(args, extra)
    if args.command == "migrate":
        return _migrate(args.broker)
    if args.command in ("asyncapi", "typescript"):
        from tidings.server.cli_schema import print_asyncapi, print_typescript

        if args.command == "asyncapi":
            return print_asyncapi(args.app)
        return print_typescript(args.app)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
