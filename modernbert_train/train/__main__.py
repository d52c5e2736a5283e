"""`python -m modernbert_train.train RECIPE.yaml [key=value ...]`, the form launchers use:
`composer -n 8 -m modernbert_train.train yamls/phase1.yaml`."""
import sys

from modernbert_train.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
