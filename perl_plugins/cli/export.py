"""``perl-plugins export CKPT --out DIR [--merge]``: see :mod:`perl_plugins.checkpoint.export`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from perl_plugins.checkpoint.export import ExportError, export
from perl_plugins.checkpoint.store import CheckpointError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="perl-plugins export", description="Export an adapter_ckpt checkpoint as a peft adapter or a merged model."
    )
    parser.add_argument("checkpoint", help="a checkpoint-<step> directory written with --plugins adapter_ckpt")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base: a standalone model")
    parser.add_argument("--base", default=None, help="--merge: base model path or hub id (default: the training base)")
    parser.add_argument("--adapter", default=None, help="adapter to export (default: the one being trained)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        path = export(args.checkpoint, args.out, merge=args.merge, base=args.base, adapter=args.adapter)
    except (CheckpointError, ExportError, OSError) as exc:
        print(f"perl-plugins: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
