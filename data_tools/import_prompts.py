#!/usr/bin/env python3
"""Import a released, already expanded prompt list (plain text, one prompt per line; e.g. Self-Forcing's
vidprom_filtered_extended.txt, which you download yourself) as a `prompts` artifact with expander "imported".

It runs the `make-prompts` stage itself, so the artifact has the same format, fingerprint rules and manifest as
any other: equivalent to

    tmd make-prompts --source FILE --expander imported --min-words 1 --max-words 0 \\
        --set clean=false --set min_ascii_letter_ratio=0 --set drop_vbench=false --set provenance=...

Only empty lines and exact duplicates (case and punctuation ignored) are dropped; the text is kept as released.
Prints the artifact path on stdout. Example:

    python data_tools/import_prompts.py vidprom_filtered_extended.txt --name self-forcing-vidprom \\
        --provenance "gdhe17/Self-Forcing: vidprom_filtered_extended.txt"
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="text file, one (expanded) prompt per line")
    parser.add_argument("--name", help="artifact name (default: the id)")
    parser.add_argument("--provenance", help="where the list comes from (default: the file name)")
    parser.add_argument("--license", default="", help="licence note (default: detected; VidProM-derived lists "
                                                      "are CC-BY-NC-4.0)")
    parser.add_argument("--limit", type=int, help="keep at most N prompts (seeded subset, file order)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; prompt i gets seed + i")
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("TMD_HOME", "tmd-home")),
                        help="tmd home (env TMD_HOME, default ./tmd-home)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)

    from tmdcli.errors import TmdError
    from tmdcli.stages import make_prompts as stage
    from tmdcli.stages.common import execute

    if args.file.suffix.lower() not in (".txt", ".text", ".lst"):
        print(f"error: {args.file} is not a .txt prompt list", file=sys.stderr)
        print("hint: for CSV/Parquet/JSONL use `tmd make-prompts --source FILE --expander none`", file=sys.stderr)
        return 2
    cfg = stage.MakePromptsConfig(
        source=str(args.file), expander="imported", limit=args.limit, seed=args.seed, name=args.name,
        clean=False, min_ascii_letter_ratio=0.0, min_words=1, max_words=0, nsfw_threshold=None,
        drop_vbench=False, dedupe=True, provenance=args.provenance or f"imported from {args.file.name}",
        license=args.license,
    )
    try:
        execute(stage, cfg, home=args.home, dry_run=args.dry_run)
    except TmdError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
