"""`python -m softprompt`: the command line, as `torchrun -m softprompt` and `accelerate launch -m
softprompt` start it on each of their processes."""

from .cli import main

if __name__ == "__main__":
    main()
