"""``smollm consolidate STEP_DIR --out ckpt.pt``: a sharded checkpoint (``--parallel fsdp``) as one file.

The file is train.store.checkpoint's format, so ``smollm lm sample`` / ``export-hf`` read it and ``--resume``
under DDP continues from it. Runs in one process, whatever number of processes wrote the shards.
"""

import argparse
import sys

from smollm_stack.train.store.sharded import consolidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smollm consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("step_dir", help="a ckpt_XXXXXX.dcp directory written by --parallel fsdp")
    parser.add_argument("--out", required=True, help="the .pt file to write (must not exist, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out checkpoint of ours")
    args = parser.parse_args(argv)
    try:
        print(consolidate(args.step_dir, args.out, args.force))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
