"""`modernbert-train train RECIPE.yaml [key=value ...]`: one process here, or one rank under a launcher."""
from __future__ import annotations

import argparse

EPILOG = """examples:
  modernbert-train train yamls/tiny/phase1.yaml
  modernbert-train train yamls/tiny/phase1.yaml max_duration=40ba optimizer.lr=1e-3 run_name=try2
  modernbert-train train yamls/phase1.yaml --print-config
  composer -n 8 -m modernbert_train.train yamls/phase1.yaml      # 8 GPUs, same arguments
Overrides use dotted keys of the recipe (omegaconf): data.micro_batch_size=16, model.config.attn_backend=sdpa.
Relaunching the same command continues from the newest checkpoint in the run's save_folder; a second process on
the same save_folder is refused (run.lock names the holder), and a resume may not change the architecture.
Checkpoints are pickles: model.init_from's and the one a resume starts from are read with weights-only loaders
first (no code runs); one holding anything else is refused unless model.trust_checkpoint=true (full unpickling,
for this run only). Checkpoints this trainer writes never need it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="training recipe YAML (yamls/phase1.yaml, yamls/tiny/phase1.yaml, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe keys to override")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe (defaults <- file <- overrides) and exit")


def run(args: argparse.Namespace) -> int:
    from modernbert_train.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(recipe.to_yaml(), end="")
        return 0
    from modernbert_train.train.trainer import train

    result = train(recipe)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(f"done: {result.steps} steps, {result.tokens:,} tokens, last loss {loss}; run directory {result.run_dir}")
    return 0
