"""Commands on a trained model and its tokenizer: sample, export to Hugging Face's format, import from it.

    smollm lm sample --run runs/x --prompt "Once upon a time"
    smollm lm sample --checkpoint runs/x/ckpt_001000.pt --tokenizer runs/x/tokenizer --prompt "Once"
    smollm lm export-hf --run runs/x --out hf_model
    smollm lm import-hf --hf-dir hf_model --out runs/imported/ckpt.pt

They live here, beside the trainer, because they join the model and the tokenizer, and the model package knows no
tokenizer. A run directory (--run) holds both: its newest ckpt_*.pt and tokenizer/. Like the trainer, they refuse a
checkpoint whose .sha256 sidecar does not match, and never write into the run they read. Outputs are created
exclusively (--force lets them replace our own file names) and never through a symbolic link (smollm_stack.files).
"""

import argparse
import codecs
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from smollm_stack.files import atomic_file, make_dir, publish, refuse_link, write_atomic
from smollm_stack.model import load_model
from smollm_stack.model.generate import generate_batch, stream
from smollm_stack.model.hf import export_hf, import_hf
from smollm_stack.train.store.checkpoint import verify
from smollm_stack.train.store.rundir import RunDir


def checkpoint_and_tokenizer(args) -> tuple[Path, Path]:
    """--run RUNDIR (its newest checkpoint and RUNDIR/tokenizer), or --checkpoint and --tokenizer."""
    if args.run is None:
        if args.checkpoint is None or args.tokenizer is None:
            raise ValueError("give --run RUNDIR, or both --checkpoint and --tokenizer")
        return Path(args.checkpoint), Path(args.tokenizer)
    run = Path(args.run)
    checkpoints = RunDir(run).checkpoints()
    if not checkpoints:
        raise FileNotFoundError(f"--run {run}: no ckpt_*.pt in it")
    return Path(args.checkpoint or checkpoints[-1]), Path(args.tokenizer or run / "tokenizer")


def newest_intact(run: Path) -> Path | None:
    """The newest checkpoint of a run that its checksum vouches for (only read: readers never write into a run)."""
    for path in reversed(RunDir(run).checkpoints()):
        try:
            verify(path)
            return path
        except ValueError:
            continue
    return None


def verified(checkpoint: Path, run: str | None) -> Path:
    """The checkpoint, once its .sha256 sidecar matches; refusing a damaged one names the run's newest intact one."""
    try:
        verify(checkpoint)
    except ValueError as e:
        if run is None:
            raise
        intact = newest_intact(Path(run))
        offer = f"add --checkpoint {intact} to use its newest intact one" if intact else "it has no intact one"
        raise ValueError(f"{e}; --run {run}: {offer}") from None
    return checkpoint


def load_tokenizer(path: Path):
    from smollm_stack.tokenizer import Tokenizer  # compiles Numba code on import: only the commands that need it pay

    return Tokenizer.load(path)


def load_pair(args, device="cpu"):
    """The verified checkpoint's model and the tokenizer of --run, or of --checkpoint and --tokenizer."""
    checkpoint, tok_dir = checkpoint_and_tokenizer(args)
    model, tokenizer = load_model(verified(checkpoint, args.run), device), load_tokenizer(tok_dir)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"{tok_dir} has {len(tokenizer)} tokens, more than the model's vocab_size")
    return model, tokenizer


def refuse_existing(path: Path, force: bool, flag: str):
    """Never write through a link, nor over what we may not have made: an existing output needs --force."""
    refuse_link(path)
    if path.exists() and not force:
        raise FileExistsError(f"{flag} {path} exists: choose another name, or add --force to overwrite it")


def sample(args):
    model, tokenizer = load_pair(args, args.device)
    eos_id = tokenizer.special_token_id(args.eos) if args.eos in tokenizer.special_tokens else None
    prompts = [tokenizer.encode(p) for p in args.prompt]
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = max(model.config.context_length - max(map(len, prompts)), 0)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos_id, seed=args.seed)
    sampling["vocab_limit"] = len(tokenizer)  # a padded model vocabulary has ids no token has: never draw them
    start = time.perf_counter()
    if len(prompts) == 1:  # print the tokens as they come
        print(args.prompt[0], end="", flush=True)
        tokens = (token for (token,) in stream(model, prompts, max_new, **sampling))
        count = -1  # texts yields a piece per token, then the decoder's flush
        for text in texts(tokenizer, tokens):
            print(text, end="", flush=True)
            count += 1
        print()
    else:
        outputs = generate_batch(model, prompts, max_new, **sampling)
        print("\n\n".join(p + tokenizer.decode(ids) for p, ids in zip(args.prompt, outputs)))
        count = sum(map(len, outputs))
    seconds = time.perf_counter() - start
    print(f"{count} tokens in {seconds:.2f} s: {count / seconds:.1f} tokens/s on {torch.device(args.device).type}",
          file=sys.stderr)  # fmt: skip


def texts(tokenizer, tokens):
    """The text of each token as it comes, then what is left: an incremental UTF-8 decoder holds back the bytes of
    a character that a later token completes, so the pieces join to tokenizer.decode(all tokens)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for token in tokens:
        yield decoder.decode(tokenizer.vocab[token])
    yield decoder.decode(b"", final=True)


def export(args):
    out = Path(args.out)
    refuse_existing(out, args.force, "--out")
    model, tokenizer = load_pair(args)
    from smollm_stack.tokenizer.hf import special_roles, tokenizer_config  # lazily, as load_tokenizer

    special_ids = {s: tokenizer.special_token_id(s) for s in tokenizer.special_tokens}
    token_ids = {f"{role}_id": special_ids[s] for role, s in special_roles(tokenizer.special_tokens).items()}
    make_dir(out.parent, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))  # ours alone (mode 0700)
    try:  # build the whole directory aside, then move its files in: a failure leaves no half export
        export_hf(model, staging, token_ids)
        tokenizer.save(staging)
        config = tokenizer_config(special_ids, model_max_length=model.config.context_length)
        write_atomic(staging / "tokenizer_config.json", json.dumps(config, indent=2))
        make_dir(out, exist_ok=args.force)  # without --force, created here or refused: no check-then-write race
        files = sorted(staging.iterdir())
        for file in files:  # a link planted at one of our names refuses the export before any file moves in
            refuse_link(out / file.name)
        for file in files:  # --force replaces our file names only, leaves anything else alone
            publish(str(file), out / file.name, exclusive=not args.force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(out)


def import_(args):
    hf_dir, out = Path(args.hf_dir), Path(args.out)
    tok_out = Path(args.tokenizer_out) if args.tokenizer_out else out.parent / "tokenizer"
    has_tokenizer = any((hf_dir / name).is_file() for name in ("tokenizer.json", "vocab.json"))
    refuse_existing(out, args.force, "--out")
    if has_tokenizer:
        refuse_existing(tok_out, args.force, "--tokenizer-out")
    model = import_hf(hf_dir)
    tokenizer = load_tokenizer(hf_dir) if has_tokenizer else None
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"{hf_dir}: the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size")
    make_dir(out.parent, exist_ok=True)
    with atomic_file(out, exclusive=not args.force) as f:  # the checks above were early; this one is exact
        torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, f)
    print(out)
    if tokenizer is not None:
        tokenizer.save(make_dir(tok_out, exist_ok=args.force))
        print(tok_out)
    else:
        print(f"{hf_dir} has no tokenizer: wrote the weights only", file=sys.stderr)


def add_source(p: argparse.ArgumentParser):
    p.add_argument("--run", help="a run directory: its newest ckpt_*.pt and its tokenizer/")
    p.add_argument("--checkpoint", help="a checkpoint (.pt), instead of (or to choose one within) --run")
    p.add_argument("--tokenizer", help="a directory written by Tokenizer.save, instead of RUNDIR/tokenizer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smollm lm", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("sample", help="generate text (streamed as it comes) and report tokens/s")
    add_source(p)
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch, generated at once")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: fill the context")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens, 0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, 1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eos", default="<|endoftext|>", help="special token that ends the sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(run_command=sample)

    p = commands.add_parser("export-hf", help="write a checkpoint and its tokenizer as a Hugging Face directory")
    add_source(p)
    p.add_argument("--out", required=True, help="output directory (must not exist, unless --force)")
    p.add_argument("--force", action="store_true", help="write into an existing --out, replacing our file names")
    p.set_defaults(run_command=export)

    p = commands.add_parser("import-hf", help="turn a LlamaForCausalLM directory into a checkpoint and a tokenizer")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True, help="output .pt file (must not exist, unless --force)")
    p.add_argument("--tokenizer-out", help="for the tokenizer, if --hf-dir has one (default: OUT's dir/tokenizer)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out / --tokenizer-out")
    p.set_defaults(run_command=import_)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be at least 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        args.run_command(args)
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # OSError: missing files, existing outputs
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
