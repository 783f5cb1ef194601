"""What remains of this run's budgets (the world's `budget` interface).

`budget.remaining()` returns all four at once (`fuel`, `memory_bytes`,
`time_ms`, `tokens`); the functions below read one each. Every value
counts down from the run's limit."""

from wit_world.imports import budget as _budget


def remaining():
    """The run's remaining budgets: `.fuel`, `.memory_bytes`, `.time_ms`,
    `.tokens`."""
    return _budget.remaining()


def fuel():
    """CPU fuel left (about one unit per WebAssembly instruction)."""
    return _budget.remaining().fuel


def memory_bytes():
    """Bytes the agent's memories may still grow by."""
    return _budget.remaining().memory_bytes


def time_ms():
    """Milliseconds until the run's deadline."""
    return _budget.remaining().time_ms


def tokens():
    """LLM tokens (input plus output) still available."""
    return _budget.remaining().tokens
