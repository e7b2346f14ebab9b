"""The ``visalign`` command. Subcommands import their heavy dependencies only when they run."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from apps.train import ALGORITHMS

# name -> (module with main(argv), one-line help). Only commands that exist are listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("apps.demo", "the main job on the shapes world, offline on a CPU: pairs, Diffusion-DPO, before/after"),
    "generate": ("apps.generate", "sample images or videos from a pipeline (+ LoRA), with metadata"),
    "pairs": ("apps.pairs", "sample K per prompt, score with a reward, write preference pairs and rankings"),
    "evaluate": ("apps.evaluate", "compare a base model and its adapters: rewards, oracle, win rates, drift, grid"),
    "train": ("apps.train", f"train: {', '.join(ALGORITHMS)} (visalign train ALGO --help: its options)"),
    "export": ("apps.export", "a training checkpoint as a Diffusers LoRA, or a LoRA fused into its base (--fuse)"),
    "score": ("apps.score", "score images or videos with a reward: JSONL, CSV summary, histogram"),
    "compare": ("apps.compare", "Gradio app: base vs adapters side by side, reward scores, votes as preference data"),
    "toy": ("apps.toy", "the shapes world: render | pretrain | evaluate the shipped toy models"),
    "serve-reward": ("apps.serve_reward", "serve any registered reward over HTTP on loopback (for remote:URL)"),
}


def build_parser() -> argparse.ArgumentParser:
    from visalign import __version__

    parser = argparse.ArgumentParser(
        prog="visalign",
        description="Align diffusion and flow models with human and AI preferences.",
        epilog="Run 'visalign COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"visalign {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, --version or an unknown command: argparse explains
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        module = importlib.import_module(COMMANDS[name][0])
        module.main(rest)
    except KeyboardInterrupt:
        print("visalign: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from visalign.errors import VisalignError

        if debug or not isinstance(e, (VisalignError, FileNotFoundError)):
            raise
        print(f"visalign {name}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
