#!/usr/bin/env python3
"""Writes a JSON log of few, long lines, for timing `metaorch trace` on them.

Takes a log written by metaorch (`metaorch bench load --log-file ...`) and copies its
lines in order, each with its `message` lengthened by 8 to 256 KiB of text (as a
logged upstream reply or error page would be), until the output reaches SIZE_MB.
The same input gives the same output.

    scripts/long-lines-log.py IN.log OUT.log SIZE_MB
"""

import json
import random
import sys


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, dst, size_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(42)
    words = "the upstream answered at length about retries limits caches and costs".split()
    text = " ".join(rng.choice(words) for _ in range(80_000))
    limit = size_mb * 1_000_000
    written = 0
    with open(src, encoding="utf-8") as lines, open(dst, "w", encoding="utf-8") as out:
        for line in lines:
            doc = json.loads(line)
            n = rng.randint(8 << 10, 256 << 10)
            at = rng.randrange(len(text) - n)
            doc["message"] = f"{doc['message']}: {text[at:at + n]}"
            written += out.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n")
            if written >= limit:
                break


if __name__ == "__main__":
    main()
