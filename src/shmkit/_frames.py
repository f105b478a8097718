"""Safe parsing of the dtype text carried by numpy array messages (channels layer helper).

Queue and Broadcast frames carry a dtype as text read back from shared memory, which any
process with write access may have scribbled on, so it is parsed here and never evaluated.
"""

from __future__ import annotations

import ast
import re

# The dtype text of a plain array is `dtype.str`: byte order, type code, size, unit.
DTYPE_STR = re.compile(r"[<>|=][A-Za-z][0-9]{0,10}(\[[0-9A-Za-z]{1,12}\])?")

# A structured dtype travels as repr(numpy.lib.format.dtype_to_descr(dtype)): lists and
# tuples of strings and integers. It is parsed here, not with ast.literal_eval: the text comes
# from shared memory, and literal_eval turns deeply nested or long operator chains into
# RecursionError or MemoryError (or worse on other Python versions).
_ESCAPE = r"""\\(?:[\\'"abfnrtv]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})"""
_DESCR_TOKENS = re.compile(rf"""\s*(?:
    (?P<str>'(?:[^'\\\n]|{_ESCAPE})*'|"(?:[^"\\\n]|{_ESCAPE})*")
  | (?P<int>-?[0-9]{{1,20}})
  | (?P<punct>[()\[\],])
)""", re.VERBOSE)
_DESCR_DEPTH = 64


def parse_descr(text: str):
    """The value of a dtype description written by repr(dtype_to_descr(...)).

    Raises:
        ValueError: anything but strings, integers, lists and tuples nested at most
            _DESCR_DEPTH deep.
    """
    tokens = []
    pos, end = 0, len(text)
    while pos < end:
        m = _DESCR_TOKENS.match(text, pos)
        if m is None:
            if text[pos:].isspace():
                break
            raise ValueError(f"unexpected character at {pos} in the dtype description")
        if m.group("str") is not None:
            # one flat string literal: its escapes are decoded by the Python parser
            tokens.append(("value", ast.literal_eval(m.group("str"))))
        elif m.group("int") is not None:
            tokens.append(("value", int(m.group("int"))))
        else:
            tokens.append(("punct", m.group("punct")))
        pos = m.end()
    tokens.append(("end", None))

    def value(i: int, depth: int):
        kind, tok = tokens[i]
        if kind == "value":
            return tok, i + 1
        if kind != "punct" or tok not in "([":
            raise ValueError("malformed dtype description")
        if depth >= _DESCR_DEPTH:
            raise ValueError("dtype description nested too deeply")
        close = ")" if tok == "(" else "]"
        items, comma, i = [], False, i + 1
        while tokens[i] != ("punct", close):
            item, i = value(i, depth + 1)
            items.append(item)
            comma = tokens[i] == ("punct", ",")
            if comma:
                i += 1
            elif tokens[i] != ("punct", close):
                raise ValueError("malformed dtype description")
        if tok == "[":
            return items, i + 1
        if len(items) == 1 and not comma:
            return items[0], i + 1  # a parenthesised value, not a tuple
        return tuple(items), i + 1

    result, i = value(0, 0)
    if tokens[i][0] != "end":
        raise ValueError("malformed dtype description")
    return result
