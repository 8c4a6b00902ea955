"""Write the key reference of docs/config.md from the pydantic schema (`--check`: exit 1 if out of date)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's posttrain, whatever is installed

from posttrain.config_docs import DOC, updated  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="do not write; exit 1 when docs/config.md is out of date")
    p.add_argument("--file", default=str(DOC), help="the file to update (default: docs/config.md)")
    args = p.parse_args(argv)
    path = Path(args.file)
    text = path.read_text()
    new = updated(text)
    if new == text:
        print(f"{path}: up to date")
        return 0
    if args.check:
        print(f"{path}: out of date; run python scripts/gen_config_docs.py", file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"{path}: written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
