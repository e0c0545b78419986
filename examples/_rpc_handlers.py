"""The worker side of examples/rpc.py: a handler that answers, raises and sends events."""

from anyfork import rpc


def count_words(text):
    words = text.split()
    if not words:
        raise ValueError("no words in an empty text")
    for i, word in enumerate(words, 1):
        rpc.event("counted", i, word)  # reaches the caller before the result
    return len(words)
