"""Handlers for examples/pool.py and examples/executor.py (imported by the workers)."""

import os

from anyfork import rpc

WORDS = None  # loaded once, in the template: every worker shares it


def load_words(n):
    global WORDS
    WORDS = [f"word{i}" for i in range(n)]


def lookup(i):
    rpc.event("looked up", i)  # progress, from the worker itself
    return WORDS[i], os.getpid()


def square(x):
    return x * x
