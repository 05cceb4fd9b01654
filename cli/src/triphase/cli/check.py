"""`triphase check`: probe HTTP endpoints from where the command runs (the chart's `helm test` pod checks
the operator through its Service this way). Every URL must answer 2xx within the timeout, and every
--expect text must appear in one of the answers; otherwise one line says what failed and it exits 1."""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

MAX_BODY_BYTES = 16 * 1024 * 1024  # an answer is read this far, no further


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", action="append", required=True, help="URL that must answer 2xx (repeatable)")
    parser.add_argument("--expect", action="append", default=[],
                        help="text that must appear in one of the answers (repeatable)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise ValueError("--timeout must be positive")
    answers = []
    for url in args.url:
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as response:
                answers.append(response.read(MAX_BODY_BYTES).decode("utf-8", "replace"))
        except urllib.error.HTTPError as exc:
            sys.stderr.write(f"triphase check: {url} answered {exc.code}\n")
            return 1
        except (urllib.error.URLError, OSError) as exc:
            sys.stderr.write(f"triphase check: {url}: {getattr(exc, 'reason', exc)}\n")
            return 1
    missing = [text for text in args.expect if not any(text in answer for answer in answers)]
    if missing:
        sys.stderr.write(f"triphase check: no answer contains {missing[0]!r}\n")
        return 1
    sys.stdout.write(f"ok: {len(args.url)} endpoint(s)\n")
    return 0
