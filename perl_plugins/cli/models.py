"""``perl-plugins models``: the model aliases and where each comes from."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from perl_plugins.models.aliases import describe_models


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="perl-plugins models", description="List model aliases for --model_name_or_path and where each comes from."
    )
    parser.add_argument("--json", action="store_true", help="print JSON: {'models': [...]}")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    listing = describe_models()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for model in listing["models"]:
        print(f"{model['name']}\n    source:  {model['source']}\n    license: {model['license']}")
        print(f"    status:  {model['status']}")
    return 0
