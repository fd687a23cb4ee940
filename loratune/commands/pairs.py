"""`loratune pairs`: a run answers a file's prompts; each wrong answer becomes a preference pair (the reference
chosen, the run's answer rejected) for a DPO run on top of it (`--reference RUN`)."""

from __future__ import annotations

import json
from pathlib import Path


def pairs_command(args) -> int:
    from ..core.files import atomic_write
    from ..inference.mistakes import mistake_pairs

    found = mistake_pairs(args.run_dir, args.data, adapter=args.adapter, max_new_tokens=args.max_new_tokens)
    print(f"{found.data}: {found.answered} prompts answered, {found.right} right, {found.wrong} wrong")
    if found.empty:
        print(f"{found.empty} wrong answers were empty: no pair for them (an empty answer has no tokens to prefer)")
    if not found.pairs:
        print("no pairs written: there is no wrong answer to prefer the reference to")
        return 0
    out = Path(args.out) if args.out else found.run_dir / "pairs.jsonl"
    atomic_write(out, "".join(json.dumps(row) + "\n" for row in found.pairs))
    print(f"{len(found.pairs)} pairs written to {out} (chosen: the reference answer, rejected: the run's answer)")
    return 0
