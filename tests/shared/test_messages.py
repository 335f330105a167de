"""shared.messages: an error's message cut to one line, one sentence, or the class it names."""

from __future__ import annotations

from shared.messages import first_line, first_sentence, one_line, refused_global


def test_first_line_keeps_the_whole_first_line() -> None:
    err = RuntimeError("CUDA out of memory. Tried to allocate 2 GiB.\nSee the docs.")
    assert first_line(err) == "CUDA out of memory. Tried to allocate 2 GiB."


def test_first_sentence_drops_the_advice_after_it() -> None:
    err = RuntimeError("PytorchStreamReader failed reading zip archive. Try again.\nmore")
    assert first_sentence(err) == "PytorchStreamReader failed reading zip archive"


def test_an_empty_message_gives_the_type_name() -> None:
    assert first_line(KeyError()) == "KeyError"
    assert first_sentence(EOFError("  \n")) == "EOFError"


def test_refused_global_names_the_class_torch_refused() -> None:
    err = RuntimeError(
        "Weights only load failed.\nUnsupported global: GLOBAL argparse.Namespace was not an "
        "allowed global by default."
    )
    assert refused_global(err) == "argparse.Namespace"
    assert refused_global(RuntimeError("Weights only load failed.")) is None


def test_one_line_folds_the_whole_message_and_cuts_it_at_the_limit() -> None:
    err = RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): a.weight,\n\tb.bias")
    assert one_line(err) == "Error(s) in loading state_dict: Missing key(s): a.weight, b.bias"
    assert one_line(err, 14) == "Error(s) in lo..."
    assert one_line(ValueError(" \n ")) == "ValueError"
