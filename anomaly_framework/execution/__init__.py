"""How a run executes: torchrun process groups and Ctrl-C handling."""
