"""`python -m dbcore` (and `torchrun -m dbcore`): the command line."""

from dbcore.cli import main

main(prog_name="dbcore")
