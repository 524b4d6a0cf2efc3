"""`python -m bench [--suite NAME] [--quick] [--out DIR] [--no-plots]`, from the repository root."""
import sys

from bench.harness import main

sys.exit(main())
