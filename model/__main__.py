"""Command line: sample from a checkpoint, and move checkpoints to and from Hugging Face's Llama format.

    python -m model sample --checkpoint runs/x/ckpt_001000.pt --tokenizer runs/tok --prompt "Once upon a time"
    python -m model export-hf --checkpoint runs/x/ckpt_001000.pt --out hf_model
    python -m model import-hf --hf-dir hf_model --out imported.pt
"""

import argparse
import dataclasses
import sys
import time

import torch

from model.checkpoint import load_model
from model.generate import generate
from model.hf import export_hf, import_hf


def sample(args):
    from tokenizer import Tokenizer  # the tokenizer compiles Numba code on import: only this command needs it

    model = load_model(args.checkpoint, args.device)
    tokenizer = Tokenizer.load(args.tokenizer)
    try:
        eos_id = tokenizer.special_token_id(args.eos)
    except ValueError:
        eos_id = None  # a tokenizer without that special token: stop at --max-new-tokens only
    prompt_ids = tokenizer.encode(args.prompt)
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = max(model.config.context_length - len(prompt_ids), 0)
    start = time.perf_counter()
    new_ids = generate(model, prompt_ids, max_new, args.temperature, args.top_p, eos_id, args.seed)
    seconds = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(new_ids))
    device = torch.device(args.device)
    print(
        f"{len(new_ids)} tokens in {seconds:.2f} s: {len(new_ids) / seconds:.1f} tokens/s on {device.type}",
        file=sys.stderr,
    )


def export(args):
    print(export_hf(load_model(args.checkpoint), args.out))


def import_(args):
    model = import_hf(args.hf_dir)
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, args.out)
    print(args.out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("sample", help="generate text from a checkpoint and report tokens/s")
    p.add_argument("--checkpoint", required=True, help="a trainer checkpoint (.pt)")
    p.add_argument("--tokenizer", required=True, help="directory written by Tokenizer.save")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: fill the context")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, 1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eos", default="<|endoftext|>", help="special token that ends the sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(run=sample)

    p = commands.add_parser("export-hf", help="write a checkpoint as a Hugging Face LlamaForCausalLM directory")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=export)

    p = commands.add_parser("import-hf", help="turn a LlamaForCausalLM directory into a checkpoint")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True, help="output .pt file")
    p.set_defaults(run=import_)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
