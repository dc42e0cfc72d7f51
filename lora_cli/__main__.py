"""`python -m lora_cli ...`: the entry point `accelerate launch` and `torchrun` use."""

from lora_cli.cli import main

main()
