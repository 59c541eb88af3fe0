"""The search strategies behind ``evomerge.evolution.make_strategy``."""
