"""`python -m lora_lab`: the command-line trainer."""

from lora_lab.trainer.cli import main

raise SystemExit(main())
