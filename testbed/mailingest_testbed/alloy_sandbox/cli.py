"""The command line of the Alloy sandbox: ``mailingest sandbox`` and
``python -m mailingest_testbed.alloy_sandbox`` (options, then serve in the foreground)."""

from __future__ import annotations

import argparse
import sys

from .faults import Faults
from .model import DEFAULT_MAX_UPLOAD_BYTES
from .server import SandboxServer

__all__ = ["add_arguments", "faults_from_args", "main", "run_from_args"]


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mailingest sandbox`` / ``python -m mailingest_testbed.alloy_sandbox``."""
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    a("--port", type=int, default=8080, help="port to bind, 0 for any free port (default 8080)")
    a("--base-path", default="/v1", help="API base path (default /v1)")
    a("--token", default=None, help="API token; with --secret, Basic auth is required")
    a("--secret", default=None, help="API secret; with --token, Basic auth is required")
    a("--agents", default=None, help="comma-separated agent e-mails allowed as note authors")
    a("--entities", default=None, help="comma-separated entities; others get 400/4013")
    a("--extensions", default=None, help="comma-separated allowed extensions (default: any)")
    a("--allow-reupload", action="store_true", help="a second PUT replaces bytes instead of 409")
    a(
        "--digests-only",
        action="store_true",
        help="keep only the size and SHA-256 of uploaded bodies (benchmarks); downloads get 404",
    )
    a(
        "--max-upload-bytes",
        type=int,
        default=DEFAULT_MAX_UPLOAD_BYTES,
        help="largest accepted body in bytes, larger gets 413/4131 (default 50 MiB)",
    )
    a("--error-500", type=float, default=0.0, help="fraction of /v1 requests answered 500/5000")
    a("--error-503", type=float, default=0.0, help="fraction of /v1 requests answered 503/5031")
    a("--rate-429", type=float, default=0.0, help="fraction of /v1 requests answered 429/4033")
    a(
        "--retry-after-fraction",
        type=float,
        default=0.5,
        help="fraction of 429s carrying Retry-After (default 0.5)",
    )
    a(
        "--retry-after-seconds",
        type=float,
        default=1.0,
        help="Retry-After value in seconds (default 1)",
    )
    a("--latency-ms", type=float, default=0.0, help="delay added to every /v1 request, in ms")
    a(
        "--slow-fraction",
        type=float,
        default=0.0,
        help="fraction of responses delayed by --slow-ms (the request is still applied)",
    )
    a("--slow-ms", type=float, default=0.0, help="delay of a slow response, in ms")
    a(
        "--drop-fraction",
        type=float,
        default=0.0,
        help="fraction of requests whose connection is closed without a response",
    )
    a(
        "--drop-after-apply",
        action="store_true",
        help="apply dropped requests before closing (default: not applied)",
    )
    a(
        "--refuse-fraction",
        type=float,
        default=0.0,
        help="fraction of describes/uploads refused with a final 400 (4002/4001), not applied",
    )
    a(
        "--late-commit-fraction",
        type=float,
        default=0.0,
        help="fraction of describes/uploads held --late-commit-ms before being applied",
    )
    a(
        "--late-commit-ms",
        type=float,
        default=0.0,
        help="how long a late commit is held (neither applied nor answered), in ms",
    )
    a(
        "--clock-offset-ms",
        type=int,
        default=0,
        help="shift every timestamp written (bodies, Date header) by this many ms, may be < 0",
    )
    a("--seed", type=int, default=None, help="seed of the fault RNG (default: random)")
    a("--verbose", action="store_true", help="log every request to stderr")


def faults_from_args(args: argparse.Namespace) -> Faults:
    """The ``Faults`` the options of ``add_arguments`` ask for (``FaultsError`` if bad)."""
    return Faults(
        error_500=args.error_500,
        error_503=getattr(args, "error_503", 0.0),
        rate_429=args.rate_429,
        retry_after_fraction=args.retry_after_fraction,
        retry_after_seconds=getattr(args, "retry_after_seconds", 1.0),
        latency_ms=args.latency_ms,
        slow_fraction=args.slow_fraction,
        slow_ms=args.slow_ms,
        drop_fraction=args.drop_fraction,
        drop_after_apply=getattr(args, "drop_after_apply", False),
        seed=args.seed,
        refuse_fraction=getattr(args, "refuse_fraction", 0.0),
        late_commit_fraction=getattr(args, "late_commit_fraction", 0.0),
        late_commit_ms=getattr(args, "late_commit_ms", 0.0),
        clock_offset_ms=getattr(args, "clock_offset_ms", 0),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Build a SandboxServer from parsed options and serve in the foreground."""
    try:
        faults = faults_from_args(args)
        server = SandboxServer(
            args.host,
            args.port,
            token=args.token,
            secret=args.secret,
            agents=_csv(args.agents),
            entities=_csv(args.entities),
            faults=faults,
            max_upload_bytes=args.max_upload_bytes,
            base_path=getattr(args, "base_path", "/v1"),
            extensions=_csv(getattr(args, "extensions", None)),
            allow_reupload=getattr(args, "allow_reupload", False),
            verbose=getattr(args, "verbose", False),
            keep_bodies=not getattr(args, "digests_only", False),
        )
    except (ValueError, OSError) as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    print(f"Alloy sandbox on http://{server._url_host}:{server.port}{server.base_path}", flush=True)
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailingest_testbed.alloy_sandbox", description="Alloy document-API emulator"
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
